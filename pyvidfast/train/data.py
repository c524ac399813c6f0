"""Training data: the step sampler, per-sample seeds and batches over :class:`pyvidfast.io.VideoDataset`.

Every random choice of a sample (start frame, crop, a task's masks) comes from a per-sample seed handed in by the
sampler, so a run is reproducible whatever the worker count, the split of the global batch between ranks and
gradient-accumulation micro-batches, and ``--resume`` replays exactly the batches an uninterrupted run would have
seen.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.io import DenseClips, VideoDataset
from pyvidfast.io.dataset import SegmentClips

SLOTS = 4096  # sample seeds of one step differ only below this: seed // SLOTS identifies the step
BAD_SAMPLE_POLICIES = ("fail", "skip")
MAX_SUBSTITUTES = 16  # --on-bad-sample skip: videos tried after a broken one before giving up
READ_ERRORS = (ValueError, RuntimeError, OSError)  # what a broken, truncated or missing video raises


class BadSampleError(ValueError):
    """A training video that cannot be read (``--on-bad-sample fail``, or too many in a row); names the file."""


@dataclass
class Batch:
    """What a task's objective gets: normalized clips, labels (-1 where the list has none) and sample seeds."""

    video: Tensor  # float [B, 3, T, H, W], normalized with the model's mean/std
    labels: Tensor  # int64 [B]
    seeds: list[int]  # one per sample; seed // SLOTS is the same for every sample of a step, on every rank
    skipped: list[str] = field(default_factory=list)  # "path: error" of each broken video replaced in the batch

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.video.to(device, non_blocking=True), self.labels.to(device), self.seeds, self.skipped)

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
    size)`` drawn per step from the step's seed (Flux flexi-sampling), so a batch stacks on every rank.

    ``on_bad_sample``: a video that cannot be read (broken, truncated, missing, too short) raises naming it
    (``"fail"``) or is skipped (``"skip"``): the next video of the list that reads takes its place with the same
    seed, so every batch keeps its size on every rank (the official VideoMAE loader also retries another video),
    and the item carries the skipped files as a fourth element (the loop counts and logs them)."""

    def __init__(self, videos: VideoDataset, stride: int,
                 shape: tuple[int, int] | Callable[[torch.Generator], tuple[int, int]], sampling: str = "dense",
                 on_bad_sample: str = "fail"):
        clip_sampler(sampling, 1, stride)  # checks the name
        self.videos, self.stride, self._shape, self.sampling = videos, stride, shape, sampling
        self.on_bad_sample = on_bad_sample

    @property
    def on_bad_sample(self) -> str:
        return self._on_bad_sample

    @on_bad_sample.setter
    def on_bad_sample(self, policy: str) -> None:
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample: expected one of {BAD_SAMPLE_POLICIES}; got {policy!r}")
        self._on_bad_sample = policy

    def __len__(self) -> int:
        return len(self.videos)

    def shape(self, seed: int) -> tuple[int, int]:
        """(frames, size) of the clips of the step that sample ``seed`` belongs to."""
        if isinstance(self._shape, tuple):
            return self._shape
        return self._shape(torch.Generator().manual_seed(seed // SLOTS))

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        """``(clip, label, seed)``; after skipped videos ``(clip, label, seed, ["path: error", ...])``."""
        index, seed = item
        skipped = []
        for attempt in range(MAX_SUBSTITUTES + 1):
            current = (index + attempt) % len(self.videos)
            try:
                sample = self._read(current, seed), self.videos.items[current][1], seed
                return (*sample, skipped) if skipped else sample
            except READ_ERRORS as error:
                path = self.videos.items[current][0]
                if self.on_bad_sample == "fail":
                    raise BadSampleError(f"bad sample: cannot read {path} ({error}); --on-bad-sample skip trains on "
                                      "without it") from error
                skipped.append(f"{path}: {error}")
        raise BadSampleError(f"bad sample: {MAX_SUBSTITUTES + 1} videos in a row from index {index} cannot be read "
                           f"(last: {skipped[-1]}); is the list file right?")

    def _read(self, index: int, seed: int) -> Tensor:
        frames, size = self.shape(seed)
        return self.videos.read(index, clip_sampler(self.sampling, frames, self.stride), size, crop=size,
                                generator=torch.Generator().manual_seed(seed))


def collate(samples: list[tuple]) -> Batch:
    """Items ``(clip, label, seed)`` or ``(clip, label, seed, skipped files)`` -> one :class:`Batch`."""
    clips, labels, seeds = zip(*(sample[:3] for sample in samples))
    skipped = [path for sample in samples if len(sample) > 3 for path in sample[3]]
    return Batch(torch.stack(clips), torch.tensor(labels), list(seeds), skipped)


class StepSampler:
    """Batch sampler over training steps: step s of epoch e takes the s-th slice of a permutation drawn from
    (seed, e); each rank takes its contiguous share of the global batch and yields it as ``accum_steps``
    micro-batches in order. Yields lists of (index, sample seed), the sample seed being a function of (seed, step,
    slot in the global batch) only: the samples of a step and their seeds do not depend on the split between
    ranks and micro-batches."""

    def __init__(self, size: int, global_batch: int, rank: int, world: int, seed: int, start_step: int,
                 total_steps: int, accum_steps: int = 1):
        if accum_steps < 1:
            raise ValueError(f"accum_steps: expected a positive int; got {accum_steps}")
        if global_batch % (world * accum_steps):
            raise ValueError(f"batch_size: the global batch {global_batch} must be a multiple of the {world} ranks "
                             f"x {accum_steps} accumulation steps")
        if size < global_batch:
            raise ValueError(f"batch_size: the list holds {size} videos, fewer than one global batch {global_batch}")
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.start_step, self.total_steps, self.accum_steps = seed, start_step, total_steps, accum_steps
        self.steps_per_epoch = size // global_batch

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0) * self.accum_steps

    def __iter__(self):
        local = self.global_batch // self.world
        micro = local // self.accum_steps
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            batch = order[position * self.global_batch:(position + 1) * self.global_batch]
            for first in range(self.rank * local, (self.rank + 1) * local, micro):
                yield [(int(batch[slot]), sample_seed(self.seed, step, slot)) for slot in range(first, first + micro)]


def sample_seed(seed: int, step: int, slot: int) -> int:
    return (seed * 1_000_003 + step) * SLOTS + slot
