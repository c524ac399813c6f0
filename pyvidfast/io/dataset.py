"""The one video ``Dataset`` of the package (training, evaluation and users alike) over a list file.

A list file holds one video per line: ``path [label]`` (Kinetics / Something-Something style). The label is the
last whitespace-separated field when it is an integer, so paths may hold spaces; without one the label is -1
(pretraining lists). Blank lines and lines starting with ``#`` are skipped; relative paths start at ``root``, else at
the list file's folder.

Frames come from :class:`pyvidfast.io.VideoReader` at the indices a sampler of :mod:`pyvidfast.io.sampling` picks,
resized, converted to float and normalized in the reader's one fused pass, then cropped.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.io import sampling
from pyvidfast.io.reader import VideoReader
from pyvidfast.ops import IMAGENET_MEAN, IMAGENET_STD


def read_list_file(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """``(path, label)`` per listed video (see the module docstring for the grammar)."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    items = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        labelled = len(parts) == 2 and parts[1].lstrip("-").isdigit()
        path = Path(parts[0] if labelled else line)
        items.append((str(path if path.is_absolute() else base / path), int(parts[1]) if labelled else -1))
    if not items:
        raise ValueError(f"list_file: {list_file} lists no videos")
    return items


@dataclass(frozen=True)
class DenseClips:
    """Sampler of clips of ``clip_len`` frames ``stride`` apart (:func:`sampling.dense`): one clip from a random
    start (drawn from the dataset's seeded generator in training), or, with ``num_clips``, that many clips spread
    evenly over the video (multi-view testing, :func:`sampling.dense_views`)."""

    clip_len: int = 16
    stride: int = 4
    num_clips: int | None = None

    def __call__(self, reader: VideoReader, generator: torch.Generator | None = None) -> list:
        if self.num_clips is None:
            return sampling.dense(len(reader), self.clip_len, self.stride, generator=generator)
        return sampling.dense_views(len(reader), self.clip_len, self.stride, self.num_clips)


@dataclass(frozen=True)
class SegmentClips:
    """Sampler of ``num_segments`` frames, one per equal part of the video (:func:`sampling.segments`; TSN /
    UniFormerV2 sparse sampling): a random frame per part when called with a generator (training), the middle one
    without; with ``num_clips``, that many interleaved views (multi-view testing, :func:`sampling.segment_views`)."""

    num_segments: int = 8
    num_clips: int | None = None

    def __call__(self, reader: VideoReader, generator: torch.Generator | None = None) -> list:
        if self.num_clips is None:
            return sampling.segments(len(reader), self.num_segments, random=generator is not None,
                                     generator=generator)
        return sampling.segment_views(len(reader), self.num_segments, self.num_clips)

def crop_offsets(length: int, crop: int, num_crops: int) -> list[int]:
    """Starts of ``num_crops`` crops evenly spaced along a side of ``length`` (1: the centre)."""
    if num_crops == 1:
        return [(length - crop) // 2]
    return [round((length - crop) * i / (num_crops - 1)) for i in range(num_crops)]


class VideoDataset(Dataset):
    """Model-ready clips and labels: ``dataset[i] = (frames, label)``.

    Args:
        list_file: ``path [label]`` per line (see :func:`read_list_file`).
        sampler: ``sampler(reader) -> indices`` (a list of ints, or a list of clips for multi-view testing);
            default: 16 frames uniformly. Examples: :class:`DenseClips`, ``lambda r: sampling.segments(len(r), 8,
            random=True)``, ``lambda r: sampling.per_second(r.timestamps(), 1.0, max_frames=64)``.
        size: ``(height, width)`` to resize the frames to, or one int: the short side (aspect ratio kept).
        crop: side of square crops cut after resizing (None: no crop). ``num_crops`` crops are spaced evenly along
            the long side (1: the centre); each view (clip x crop) stacks in front: ``[V, ...]``.
        layout: ``"CTHW"`` (video models) or ``"THWC"``.
        dtype, mean, std: as :meth:`VideoReader.get_frames` (default: float32 normalized with ImageNet's; pass
            the model's ``data_config.mean``/``std``).
        threads: FFmpeg threads per reader; 1 suits DataLoader workers (each worker decodes one video at a time).

    ``dataset[(i, seed)]`` draws every random choice from ``seed`` instead: the sampler is called as
    ``sampler(reader, generator=g)`` with ``g`` seeded by it, and the one crop is placed at random from ``g``
    (training: a run is reproducible whatever the worker count). Each item opens, reads and closes its video inside
    the calling process, so forked DataLoader workers work.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        sampler: Callable[..., Sequence] | None = None,
        size: int | tuple[int, int] = (224, 224),
        layout: str = "CTHW",
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        root: str | os.PathLike | None = None,
        threads: int = 1,
        crop: int | None = None,
        num_crops: int = 1,
    ):
        if layout not in ("CTHW", "THWC"):
            raise ValueError(f"layout: expected 'CTHW' or 'THWC'; got {layout!r}")
        self.items = read_list_file(list_file, root)
        self.sampler = sampler or (lambda reader: sampling.uniform(len(reader), 16))
        self.size, self.crop, self.num_crops = size, crop, num_crops
        self.layout, self.dtype, self.threads = layout, dtype, threads
        self.mean, self.std = (mean, std) if dtype != torch.uint8 else (None, None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        if isinstance(item, tuple):
            index, seed = item
            generator = torch.Generator().manual_seed(seed)
            return self.read(index, self.sampler, self.size, self.crop, generator=generator), self.items[index][1]
        return self.read(item, self.sampler, self.size, self.crop, self.num_crops), self.items[item][1]

    def read(self, index: int, sampler: Callable[..., Sequence], size: int | tuple[int, int],
             crop: int | None = None, num_crops: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Frames of video ``index`` for any sampler, size and crop (those of the dataset in ``dataset[i]``);
        with a ``generator``, the sampler gets it and the one crop is placed at random from it."""
        with VideoReader(self.items[index][0], threads=self.threads) as reader:
            indices = list(sampler(reader) if generator is None else sampler(reader, generator=generator))
            views = [list(v) for v in indices] if indices and not isinstance(indices[0], int) else None
            flat = [f for v in views for f in v] if views else indices
            if isinstance(size, int):
                size = short_side_size(reader.metadata.height, reader.metadata.width, size)
            frames = reader.get_frames(flat, size=size, layout=self.layout, dtype=self.dtype, mean=self.mean,
                                       std=self.std)
        time_dim = 0 if self.layout == "THWC" else 1
        clips = frames.split([len(v) for v in views], dim=time_dim) if views else [frames]
        if crop is not None:
            clips = [c for clip in clips for c in self._crops(clip, crop, num_crops, generator)]
        return torch.stack(clips) if views or len(clips) > 1 else clips[0]

    def _crops(self, frames: Tensor, crop: int, num_crops: int, generator: torch.Generator | None) -> list[Tensor]:
        h_dim = 1 if self.layout == "THWC" else 2
        height, width = frames.shape[h_dim], frames.shape[h_dim + 1]
        if crop > min(height, width):
            raise ValueError(f"crop: {crop} exceeds the resized frames {height}x{width}")
        if generator is not None:
            top = int(torch.randint(height - crop + 1, (1,), generator=generator))
            left = int(torch.randint(width - crop + 1, (1,), generator=generator))
            offsets = [(top, left)]
        elif height > width:
            offsets = [(top, (width - crop) // 2) for top in crop_offsets(height, crop, num_crops)]
        else:
            offsets = [((height - crop) // 2, left) for left in crop_offsets(width, crop, num_crops)]
        return [frames.narrow(h_dim, top, crop).narrow(h_dim + 1, left, crop).contiguous() for top, left in offsets]


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) scaled so the short side is ``short`` (the long side rounded, never below it)."""
    scale = short / min(height, width)
    return max(short, round(height * scale)), max(short, round(width * scale))
