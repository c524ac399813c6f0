"""Video list data for the training scripts: a ``path label`` list file, clips decoded with PyAV.

Every random choice of a sample (start frame, crop) comes from a per-sample seed handed in by the sampler, so a
run is reproducible whatever the worker count, and ``--resume`` replays exactly the batches an uninterrupted run
would have seen. Decoding goes through :func:`pyvidfast.samples.decode_frames` until ``pyvidfast.io`` provides a
frame reader; :class:`VideoList` is the one place to swap.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.samples import decode_frames


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


def frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return stream.frames
        return sum(1 for _ in container.decode(stream))


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
        generator = torch.Generator().manual_seed(seed)
        span = self._span()
        last_start = max(self._count(index) - span, 0)
        start = int(torch.randint(last_start + 1, (1,), generator=generator))
        frames = self._decode(index, start)
        height, width = frames.shape[1:3]
        top = int(torch.randint(height - self.spec.size + 1, (1,), generator=generator))
        left = int(torch.randint(width - self.spec.size + 1, (1,), generator=generator))
        return self._crop(frames, top, left), self.entries[index][1], seed

    def views(self, index: int, num_clips: int, num_crops: int) -> Tensor:
        """Evaluation views uint8 [num_clips * num_crops, T, H, W, 3]: clips evenly spaced over the video, crops
        evenly spaced along its long side (1 crop = centre)."""
        last_start = max(self._count(index) - self._span(), 0)
        views = []
        for clip in range(num_clips):
            start = round(last_start * (clip + 0.5) / num_clips)
            frames = self._decode(index, start)
            height, width = frames.shape[1:3]
            for crop in range(num_crops):
                share = 0.5 if num_crops == 1 else crop / (num_crops - 1)
                top = round((height - self.spec.size) * (share if height > width else 0.5))
                left = round((width - self.spec.size) * (share if width >= height else 0.5))
                views.append(self._crop(frames, top, left))
        return torch.stack(views)

    def _span(self) -> int:
        return (self.spec.frames - 1) * self.spec.stride + 1

    def _count(self, index: int) -> int:
        if index not in self._counts:
            self._counts[index] = frame_count(self.entries[index][0])
        return self._counts[index]

    def _decode(self, index: int, start: int) -> Tensor:
        """Frames from start (indices past the end repeat the last frame: short videos loop their tail)."""
        path = self.entries[index][0]
        count = self._count(index)
        stride = self.spec.stride if count >= self._span() else max(1, (count - 1) // max(self.spec.frames - 1, 1))
        available = min(self.spec.frames, (count - 1 - start) // stride + 1)
        frames = decode_frames(path, available, start=start, stride=stride, size=self._resized(path))
        if available < self.spec.frames:
            frames = torch.cat([frames, frames[-1:].expand(self.spec.frames - available, -1, -1, -1)])
        return frames

    def _resized(self, path: Path) -> tuple[int, int]:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
        short = self.spec.short_side or self.spec.size
        scale = short / min(width, height)
        return max(short, round(height * scale)), max(short, round(width * scale))

    def _crop(self, frames: Tensor, top: int, left: int) -> Tensor:
        size = self.spec.size
        return frames[:, top:top + size, left:left + size].contiguous()


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
    return (seed * 1_000_003 + step) * 4096 + slot
