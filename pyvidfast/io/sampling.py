"""Frame sampling strategies. Each returns frame indices for :meth:`pyvidfast.io.VideoReader.get_frames`.

All take the video's frame count first and never return an index outside ``[0, num_frames)``: clips longer than
the video repeat its last frame, as the models' reference loaders do. Random choices use ``generator`` (a
``torch.Generator``) when given, so a DataLoader worker seeded by PyTorch samples reproducibly.
"""

import math
from typing import Sequence

import torch
from torch import Tensor


def _check_count(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames: expected a positive frame count; got {num_frames}")


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (1,), generator=generator))


def dense(num_frames: int, clip_len: int, stride: int = 1, start: int | None = None,
          generator: torch.Generator | None = None) -> list[int]:
    """``clip_len`` frames ``stride`` apart (VideoMAE: 16 at stride 4) from ``start``, or from a random start
    where the whole clip fits (the video's start when it does not)."""
    _check_count(num_frames)
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len/stride: expected positive ints; got {clip_len}, {stride}")
    span = (clip_len - 1) * stride + 1
    if start is None:
        start = _randint(max(num_frames - span, 0), generator)
    elif not 0 <= start < num_frames:
        raise ValueError(f"start: expected a frame in [0, {num_frames}); got {start}")
    return [min(start + i * stride, num_frames - 1) for i in range(clip_len)]


def dense_views(num_frames: int, clip_len: int, stride: int = 1, num_views: int = 1) -> list[list[int]]:
    """Multi-view testing: ``num_views`` dense clips with starts spread evenly over the video (the first at the
    start, the last ending at the end)."""
    _check_count(num_frames)
    if num_views < 1:
        raise ValueError(f"num_views: expected a positive int; got {num_views}")
    span = (clip_len - 1) * stride + 1
    room = max(num_frames - span, 0)
    starts = [round(room * v / (num_views - 1)) if num_views > 1 else room // 2 for v in range(num_views)]
    return [dense(num_frames, clip_len, stride, start=s) for s in starts]


def segments(num_frames: int, num_segments: int, random: bool = False,
             generator: torch.Generator | None = None) -> list[int]:
    """One frame per segment (TSN / UniFormerV2 / FluxViT): the video is cut into ``num_segments`` equal parts and
    the middle frame (or, with ``random``, a random frame) of each is taken."""
    _check_count(num_frames)
    if num_segments < 1:
        raise ValueError(f"num_segments: expected a positive int; got {num_segments}")
    seg = num_frames / num_segments
    out = []
    for s in range(num_segments):
        lo = int(math.floor(seg * s))
        hi = max(int(math.floor(seg * (s + 1))) - 1, lo)
        out.append(lo + _randint(hi - lo, generator) if random else (lo + hi) // 2)
    return [min(i, num_frames - 1) for i in out]


def segment_views(num_frames: int, num_segments: int, num_views: int = 1) -> list[list[int]]:
    """Multi-view testing of segment sampling (UniFormerV2's sparse test loader): the video is cut into
    ``num_segments`` equal parts of ``(num_frames - 1) / num_segments`` frames; view ``v`` takes, in every part,
    the frame ``(v + 1) / (num_views + 1)`` of the way in, so the views interleave evenly."""
    _check_count(num_frames)
    if num_segments < 1 or num_views < 1:
        raise ValueError(f"num_segments/num_views: expected positive ints; got {num_segments}, {num_views}")
    seg = (num_frames - 1) / num_segments
    offset = seg / (num_views + 1)
    return [[min(int(round(seg * s)) + int(offset * (v + 1)), num_frames - 1) for s in range(num_segments)]
            for v in range(num_views)]

def uniform(num_frames: int, count: int) -> list[int]:
    """``count`` frames evenly spaced over the whole video, first and last included."""
    _check_count(num_frames)
    if count < 1:
        raise ValueError(f"count: expected a positive int; got {count}")
    if count == 1:
        return [(num_frames - 1) // 2]
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def per_second(timestamps: Tensor | Sequence[float], fps: float = 1.0, max_frames: int | None = None) -> list[int]:
    """Frames ``1 / fps`` seconds apart (Video-XL style), by presentation time: for each time t = 0, 1/fps, ...
    the last frame shown at or before t. Longer videos are capped at ``max_frames`` frames spread evenly.

    ``timestamps`` is :meth:`VideoReader.timestamps` (seconds per frame, increasing).
    """
    ts = torch.as_tensor(timestamps, dtype=torch.float64).reshape(-1)
    _check_count(ts.numel())
    if not fps > 0:
        raise ValueError(f"fps: expected a positive rate; got {fps}")
    end = float(ts[-1])
    times = torch.arange(0, int(math.floor(end * fps + 1e-9)) + 1, dtype=torch.float64) / fps
    idx = (torch.searchsorted(ts, times, right=True) - 1).clamp(min=0)
    out = torch.unique_consecutive(idx).tolist()
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames: expected a positive int; got {max_frames}")
        if len(out) > max_frames:
            out = [out[i] for i in uniform(len(out), max_frames)]
    return out
