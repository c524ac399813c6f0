"""A video classification ``Dataset`` over a list file (Kinetics / Something-Something style)."""

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.io import sampling
from pyvidfast.io.reader import VideoReader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_list_file(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """``path label`` per line (the label is the last whitespace-separated field, so paths may hold spaces);
    blank lines and lines starting with ``#`` are skipped. Relative paths are taken from ``root``, else from the
    list file's folder."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    items = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"list_file: line {number} of {list_file}: expected 'path label'; got {line!r}")
        path = Path(parts[0])
        items.append((str(path if path.is_absolute() else base / path), int(parts[1])))
    return items


class VideoDataset(Dataset):
    """Model-ready clips and labels: ``dataset[i] = (frames, label)``.

    Args:
        list_file: ``path label`` per line (see :func:`read_list_file`).
        sampler: ``sampler(reader) -> indices`` (a list of ints, or a list of clips for multi-view testing);
            default: 16 frames uniformly. Examples: ``lambda r: sampling.dense(len(r), 16, 4)``,
            ``lambda r: sampling.segments(len(r), 8, random=True)``,
            ``lambda r: sampling.per_second(r.timestamps(), 1.0, max_frames=64)``.
        size: ``(height, width)`` of the frames.
        layout: ``"CTHW"`` (video models) or ``"THWC"``. Multi-view clips stack in front: ``[V, ...]``.
        dtype, mean, std: as :meth:`VideoReader.get_frames` (default: float32 normalized with ImageNet's).
        threads: FFmpeg threads per reader; 1 suits DataLoader workers (each worker decodes one video at a time).

    Each item opens, reads and closes its video inside the calling process, so forked DataLoader workers work.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        sampler: Callable[[VideoReader], Sequence] | None = None,
        size: tuple[int, int] = (224, 224),
        layout: str = "CTHW",
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        root: str | os.PathLike | None = None,
        threads: int = 1,
    ):
        self.items = read_list_file(list_file, root)
        self.sampler = sampler or (lambda reader: sampling.uniform(len(reader), 16))
        self.size, self.layout, self.dtype, self.threads = size, layout, dtype, threads
        self.mean, self.std = (mean, std) if dtype != torch.uint8 else (None, None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        with VideoReader(path, threads=self.threads) as reader:
            indices = list(self.sampler(reader))
            views = [list(v) for v in indices] if indices and not isinstance(indices[0], int) else None
            flat = [f for v in views for f in v] if views else indices
            frames = reader.get_frames(flat, size=self.size, layout=self.layout, dtype=self.dtype, mean=self.mean,
                                       std=self.std)
        if views:
            time_dim = 0 if self.layout == "THWC" else 1
            frames = torch.stack(frames.split([len(v) for v in views], dim=time_dim))
        return frames, label
