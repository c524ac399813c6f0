"""Training data: the step sampler, per-sample seeds and batches over :class:`pyvidfast.io.VideoDataset`.

Every random choice of a sample (start frame, crop, a task's masks) comes from a per-sample seed handed in by the
sampler, so a run is reproducible whatever the worker count, and ``--resume`` replays exactly the batches an
uninterrupted run would have seen.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.io import DenseClips, VideoDataset
from pyvidfast.io.dataset import SegmentClips

SLOTS = 4096  # sample seeds of one step differ only below this: seed // SLOTS identifies the step


@dataclass
class Batch:
    """What a task's objective gets: normalized clips, labels (-1 where the list has none) and sample seeds."""

    video: Tensor  # float [B, 3, T, H, W], normalized with the model's mean/std
    labels: Tensor  # int64 [B]
    seeds: list[int]  # one per sample; seed // SLOTS is the same for every sample of a step, on every rank

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.video.to(device, non_blocking=True), self.labels.to(device), self.seeds)

    @property
    def step_seed(self) -> int:
        return self.seeds[0] // SLOTS


SAMPLINGS = ("dense", "segments")


def clip_sampler(sampling: str, frames: int, stride: int, num_clips: int | None = None):
    """The dataset sampler of ``--sampling``: ``dense`` (``frames`` frames ``stride`` apart) or ``segments`` (one
    frame per segment, ``stride`` unused); ``num_clips`` views for testing."""
    if sampling == "dense":
        return DenseClips(frames, stride, num_clips)
    if sampling == "segments":
        return SegmentClips(frames, num_clips)
    raise ValueError(f"sampling: expected one of {SAMPLINGS}; got {sampling!r}")


class TrainingClips(Dataset):
    """Items ``(index, sample seed)`` of :class:`StepSampler` -> ``(clip, label, seed)``: ``frames`` frames
    ``stride`` apart from a random start (``sampling="segments"``: a random frame of each of ``frames`` equal
    parts), the short side resized to ``size`` and a random ``size`` x ``size`` crop, all drawn from the sample's
    seed. ``shape`` is ``(frames, size)``, or ``shape(generator) -> (frames,
    size)`` drawn per step from the step's seed (Flux flexi-sampling), so a batch stacks on every rank."""

    def __init__(self, videos: VideoDataset, stride: int,
                 shape: tuple[int, int] | Callable[[torch.Generator], tuple[int, int]], sampling: str = "dense"):
        clip_sampler(sampling, 1, stride)  # checks the name
        self.videos, self.stride, self._shape, self.sampling = videos, stride, shape, sampling

    def __len__(self) -> int:
        return len(self.videos)

    def shape(self, seed: int) -> tuple[int, int]:
        """(frames, size) of the clips of the step that sample ``seed`` belongs to."""
        if isinstance(self._shape, tuple):
            return self._shape
        return self._shape(torch.Generator().manual_seed(seed // SLOTS))

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = item
        frames, size = self.shape(seed)
        clip = self.videos.read(index, clip_sampler(self.sampling, frames, self.stride), size, crop=size,
                                generator=torch.Generator().manual_seed(seed))
        return clip, self.videos.items[index][1], seed


def collate(samples: list[tuple[Tensor, int, int]]) -> Batch:
    clips, labels, seeds = zip(*samples)
    return Batch(torch.stack(clips), torch.tensor(labels), list(seeds))


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
