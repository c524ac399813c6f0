"""VideoMAE V2 dual-masking pretraining (``python -m pyvidfast.train pretrain``): masks, targets, loss.

Masks follow the official ``dataset/masking_generator.py``; True = masked.

* Tube masking (encoder): one random spatial mask with ``int(ratio * H' * W')`` masked cells, repeated over all T'
  temporal positions.
* Running-cell masking (decoder): a 2x2 cell holds the queue ``[1] * int(4 * ratio) + [0] * rest``; at temporal
  position t the queue is rotated by ``start + t + 1``, laid out row-major into the 2x2 cell and tiled over the
  grid. ``start`` (one of 4) is drawn per sample, so exactly ``ratio`` of every frame is masked and every position
  is kept in 2 of any 4 consecutive temporal tokens (ratio 0.5).

Masks are bool ``[T', H' * W']`` per sample, or ``[B, T' * H' * W']`` (raster (t, h, w) order, the model's token
order) from :func:`dual_masks`. Randomness comes from an explicit ``torch.Generator`` seeded by the sample's seed,
so ``--resume`` reproduces it. The loss is the MSE of per-patch normalized pixels on the tokens hidden from the
encoder and kept by the decoder (official ``engine_for_pretraining.py``).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyvidfast.train.data import Batch
from pyvidfast.train.tasks.base import Task, build_model, model_clips, model_options, register_task

# ----------------------------------------------------------------------------------------------------------------
# Masks


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


# ----------------------------------------------------------------------------------------------------------------
# Targets and loss


def pretrain_targets(video: Tensor, tubelet: int, patch: int, mean: Sequence[float], std: Sequence[float],
                     normalize: bool = True) -> Tensor:
    """Pixel targets [B, N, tubelet*p*p*3] of a video [B, 3, T, H, W] normalized with ``mean``/``std``, laid out
    like the official ``(t p0 p1 p2) c`` rearrange. With ``normalize``, each patch and channel is standardised over
    its tubelet*p*p pixels in [0, 1] units (unbiased std + 1e-6)."""
    batch, _, frames, height, width = video.shape
    mean_t = torch.tensor(mean, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    std_t = torch.tensor(std, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    pixels = video * std_t + mean_t
    grid = pixels.reshape(batch, 3, frames // tubelet, tubelet, height // patch, patch, width // patch, patch)
    patches = grid.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, -1, tubelet * patch * patch, 3)
    if normalize:
        patches = (patches - patches.mean(dim=-2, keepdim=True)) / (patches.var(dim=-2, keepdim=True).sqrt() + 1e-6)
    return patches.flatten(2)


def pretrain_loss(pred: Tensor, targets: Tensor, mask: Tensor, decode_mask: Tensor | None) -> Tensor:
    """Per-token MSE between the decoder's predictions ``pred`` [B, N_dec, P] (its kept tokens, raster order) and
    ``targets`` [B, N, P], averaged over the tokens hidden from the encoder (``mask``) AND kept by the decoder
    (not ``decode_mask``; every masked token when it is None)."""
    decoded = mask if decode_mask is None else ~decode_mask
    batch = pred.shape[0]
    targets = targets[decoded].reshape(batch, -1, targets.shape[-1])
    per_token = F.mse_loss(pred.float(), targets, reduction="none").mean(dim=-1)
    weight = mask[decoded].reshape(batch, -1).to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum()


# ----------------------------------------------------------------------------------------------------------------
# The task


@register_task
class VideoMAEPretraining(Task):
    """Dual masking: an encoder tube mask of ``--mask-ratio`` and a decoder running-cell mask of
    ``--decoder-mask-ratio`` per clip, drawn from the sample's seed; the model predicts the decoder's tokens."""

    name = "pretrain"

    def __init__(self, model, dataset, mask_ratio: float = 0.9, decoder_mask_ratio: float = 0.5):
        super().__init__(model, dataset)
        self.mask_ratio, self.decoder_mask_ratio = mask_ratio, decoder_mask_ratio
        config = model.data_config
        self.grid = (config.num_frames // config.tubelet_size, config.img_size // config.patch_size,
                     config.img_size // config.patch_size)

    @classmethod
    def build(cls, args) -> "VideoMAEPretraining":
        model = build_model(args.model, model_options(args))
        return cls(model, model_clips(args, model), args.mask_ratio, args.decoder_mask_ratio)

    def forward(self, batch: Batch) -> tuple[Tensor, dict]:
        mask, decode_mask = dual_masks(batch.seeds, self.grid, self.mask_ratio, self.decoder_mask_ratio)
        mask = mask.to(batch.video.device)
        decode_mask = None if decode_mask is None else decode_mask.to(batch.video.device)
        pred = self.model(batch.video, mask, decode_mask)
        config = self.model.data_config
        with torch.no_grad():
            targets = pretrain_targets(batch.video.float(), config.tubelet_size, config.patch_size, config.mean,
                                       config.std)
        return pretrain_loss(pred, targets, mask, decode_mask), {}
