"""Video list data for the training scripts: a ``path label`` list file, clips read with
:class:`pyvidfast.io.VideoReader` (exact frame indices, seeking to keyframes, resizing in the reader).

Every random choice of a sample (start frame, crop) comes from a per-sample seed handed in by the sampler, so a
run is reproducible whatever the worker count, and ``--resume`` replays exactly the batches an uninterrupted run
would have seen.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.flux import FlexiSampling
from pyvidfast.io import VideoReader

SLOTS = 4096  # sample seeds of one step differ only below this: seed // SLOTS identifies the step


@dataclass(frozen=True)
class ClipSpec:
    frames: int = 16  # frames per clip
    stride: int = 4  # take every stride-th frame
    size: int = 224  # square crop side
    short_side: int | None = None  # resize the short side to this before cropping (default: size)


def read_list(list_file: str | Path) -> list[tuple[Path, int]]:
    """``path [label]`` lines (label defaults to -1); relative paths are taken from the list file's folder."""
    list_file = Path(list_file)
    entries = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise ValueError(f"{list_file}:{line_no}: expected 'path [label]'; got {line!r}")
        path = Path(parts[0])
        entries.append((path if path.is_absolute() else list_file.parent / path, int(parts[1]) if len(parts) > 1 else -1))
    if not entries:
        raise ValueError(f"list_file: {list_file} lists no videos")
    return entries


class VideoList(Dataset):
    """Items are ``(index, seed)`` pairs; returns ``(clip uint8 [T, H, W, 3], label, seed)`` with a random start
    and crop drawn from ``seed``, or ``views`` for multi-view evaluation."""

    def __init__(self, list_file: str | Path, spec: ClipSpec):
        self.entries = read_list(list_file)
        self.spec = spec
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = item
        return self.sample(index, seed, self.spec), self.entries[index][1], seed

    def sample(self, index: int, seed: int, spec: ClipSpec) -> Tensor:
        """One training clip of ``spec``: random start and crop drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        last_start = max(self._count(index) - self._span(spec), 0)
        start = int(torch.randint(last_start + 1, (1,), generator=generator))
        frames = self._decode(index, start, spec)
        height, width = frames.shape[1:3]
        top = int(torch.randint(height - spec.size + 1, (1,), generator=generator))
        left = int(torch.randint(width - spec.size + 1, (1,), generator=generator))
        return self._crop(frames, top, left, spec)

    def views(self, index: int, num_clips: int, num_crops: int) -> Tensor:
        """Evaluation views uint8 [num_clips * num_crops, T, H, W, 3]: clips evenly spaced over the video, crops
        evenly spaced along its long side (1 crop = centre)."""
        last_start = max(self._count(index) - self._span(self.spec), 0)
        views = []
        for clip in range(num_clips):
            start = round(last_start * (clip + 0.5) / num_clips)
            frames = self._decode(index, start, self.spec)
            height, width = frames.shape[1:3]
            for crop in range(num_crops):
                share = 0.5 if num_crops == 1 else crop / (num_crops - 1)
                top = round((height - self.spec.size) * (share if height > width else 0.5))
                left = round((width - self.spec.size) * (share if width >= height else 0.5))
                views.append(self._crop(frames, top, left, self.spec))
        return torch.stack(views)

    @staticmethod
    def _span(spec: ClipSpec) -> int:
        return (spec.frames - 1) * spec.stride + 1

    def _count(self, index: int) -> int:
        if index not in self._counts:
            with VideoReader(self.entries[index][0]) as reader:
                self._counts[index] = len(reader)
        return self._counts[index]

    def _decode(self, index: int, start: int, spec: ClipSpec) -> Tensor:
        """Frames start, start + stride, ... resized so the short side is ``short_side``; indices past the end
        repeat the last frame (short videos loop their tail)."""
        last = self._count(index) - 1
        indices = [min(start + i * spec.stride, last) for i in range(spec.frames)]
        with VideoReader(self.entries[index][0]) as reader:
            width, height = reader.metadata.width, reader.metadata.height
            short = spec.short_side or spec.size
            scale = short / min(width, height)
            size = (max(short, round(height * scale)), max(short, round(width * scale)))
            return reader.get_frames(indices, size=size)

    @staticmethod
    def _crop(frames: Tensor, top: int, left: int, spec: ClipSpec) -> Tensor:
        size = spec.size
        return frames[:, top:top + size, left:left + size].contiguous()


class FlexiVideoList(VideoList):
    """Flux flexi-sampling: every clip of a step, on every rank, gets the (frames, resolution) that
    ``flexi.draw`` picks from the step's seed, so a batch stacks and ``--resume`` replays the same settings."""

    def __init__(self, list_file: str | Path, stride: int, flexi: FlexiSampling):
        super().__init__(list_file, ClipSpec(stride=stride))
        self.flexi = flexi

    def setting(self, seed: int) -> tuple[int, int]:
        """(frames, resolution) of the step that sample ``seed`` belongs to."""
        return self.flexi.draw(torch.Generator().manual_seed(seed // SLOTS))

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = item
        frames, size = self.setting(seed)
        return self.sample(index, seed, replace(self.spec, frames=frames, size=size)), self.entries[index][1], seed


def collate(batch: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, list[int]]:
    clips, labels, seeds = zip(*batch)
    return torch.stack(clips), torch.tensor(labels), list(seeds)


class StepSampler:
    """Batch sampler over training steps: step s of epoch e takes the s-th slice of a permutation drawn from
    (seed, e); each rank takes its contiguous share of the global batch. Yields lists of (index, sample seed),
    the sample seed being a function of (seed, step, slot in the global batch) only."""

    def __init__(self, size: int, global_batch: int, rank: int, world: int, seed: int, start_step: int,
                 total_steps: int):
        if global_batch % world:
            raise ValueError(f"batch_size: the global batch {global_batch} must be a multiple of the {world} ranks")
        if size < global_batch:
            raise ValueError(f"batch_size: the list holds {size} videos, fewer than one global batch {global_batch}")
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.steps_per_epoch = size // global_batch

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self):
        local = self.global_batch // self.world
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            batch = order[position * self.global_batch:(position + 1) * self.global_batch]
            first = self.rank * local
            yield [(int(batch[first + j]), sample_seed(self.seed, step, first + j)) for j in range(local)]


def sample_seed(seed: int, step: int, slot: int) -> int:
    return (seed * 1_000_003 + step) * SLOTS + slot
