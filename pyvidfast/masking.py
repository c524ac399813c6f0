"""Mask generators of VideoMAE V2's dual masking (official ``dataset/masking_generator.py``); True = masked.

* Tube masking (encoder): one random spatial mask with ``int(ratio * H' * W')`` masked cells, repeated over all T'
  temporal positions.
* Running-cell masking (decoder): a 2x2 cell holds the queue ``[1] * int(4 * ratio) + [0] * rest``; at temporal
  position t the queue is rotated by ``start + t + 1``, laid out row-major into the 2x2 cell and tiled over the
  grid. ``start`` (one of 4) is drawn per sample, so exactly ``ratio`` of every frame is masked and every position
  is kept in 2 of any 4 consecutive temporal tokens (ratio 0.5).

Masks are bool ``[T', H' * W']`` per sample, or ``[B, T' * H' * W']`` (raster (t, h, w) order, the model's token
order) from the batched helpers. Randomness comes from an explicit ``torch.Generator`` so data loading can derive
it from (seed, step, sample) and reproduce it on resume.
"""

import torch
from torch import Tensor


def tube_mask(grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Tube mask bool [T', H'*W']: the same ``int(ratio * H' * W')`` cells masked in every frame."""
    frames, height, width = grid
    per_frame = height * width
    num_masked = int(ratio * per_frame)
    order = torch.randperm(per_frame, generator=generator)
    spatial = torch.zeros(per_frame, dtype=torch.bool)
    spatial[order[:num_masked]] = True
    return spatial.expand(frames, per_frame).clone()


def running_cell_mask(grid: tuple[int, int, int], ratio: float = 0.5, start: int | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """Running-cell mask bool [T', H'*W'] with queue pointer ``start`` (drawn from 0..3 when None)."""
    frames, height, width = grid
    if height % 2 or width % 2:
        raise ValueError(f"grid: running-cell masking needs an even token grid; got {height}x{width}")
    num_masked = int(4 * ratio)
    if not 0 < num_masked < 4:
        raise ValueError(f"ratio: running-cell masking needs 0.25 <= ratio < 1; got {ratio}")
    if start is None:
        start = int(torch.randint(4, (1,), generator=generator))
    queue = torch.tensor([True] * num_masked + [False] * (4 - num_masked))
    steps = torch.arange(frames)[:, None] + start + 1
    cells = queue[(torch.arange(4)[None, :] + steps) % 4].view(frames, 2, 2)
    return cells.repeat(1, height // 2, width // 2).view(frames, height * width)


def dual_masks(batch_seeds: list[int], grid: tuple[int, int, int], mask_ratio: float = 0.9,
               decoder_mask_ratio: float = 0.5) -> tuple[Tensor, Tensor | None]:
    """Encoder tube masks and decoder running-cell masks, bool [B, N], one sample per seed. With
    ``decoder_mask_ratio`` 0 the decoder mask is None (V1: the decoder predicts every encoder-masked token)."""
    masks, decode_masks = [], []
    for seed in batch_seeds:
        generator = torch.Generator().manual_seed(seed)
        masks.append(tube_mask(grid, mask_ratio, generator).flatten())
        if decoder_mask_ratio > 0:
            decode_masks.append(running_cell_mask(grid, decoder_mask_ratio, generator=generator).flatten())
    return torch.stack(masks), (torch.stack(decode_masks) if decode_masks else None)


__all__ = ["dual_masks", "running_cell_mask", "tube_mask"]
