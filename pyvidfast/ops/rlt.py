"""Run-length tokenization (RLT, "Don't Look Twice"): drop patches that repeat the previous tubelet.

``rlt_mask`` returns which tokens are kept and how many tubelets each kept token stands for; ``rlt_tokenize``
also gathers the kept patches, normalized and flattened like a Conv3d patch-embedding weight, packed across the
batch with ``cu_seqlens`` bounds (no padding).

Private (tests, benchmarks): ``torch.ops.vidfast._rlt_last_schedule()`` names the schedule the calling thread's
last CPU ``rlt_tokenize`` ran, ``"mask_first"`` or ``"mask_beside"`` (``"none"`` before any); see docs/rlt.md.
"""

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# rlt_tokenize's cu_seqlens (and its CUDA gather's grid) count tokens in int32.
MAX_TOKENS = 2**31 - 1


class PackedTokens(NamedTuple):
    """Kept tokens of a batch, packed clip after clip."""

    patches: Tensor  # [N, 3 * tubelet * patch * patch], order [c][dt][ph][pw]
    positions: Tensor  # int32 [N, 3]: (t', h', w') on the token grid
    lengths: Tensor  # int32 [N]: tubelets each token stands for, 1..T'
    cu_seqlens: Tensor  # int32 [B + 1]: clip b owns tokens cu_seqlens[b]:cu_seqlens[b+1]

    def max_seqlen(self) -> int:
        """Longest clip, in tokens (a host int, as varlen attention wants)."""
        if self.cu_seqlens.numel() < 2:
            return 0
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())


def rlt_mask(
    video: Tensor,
    tubelet: int = 2,
    patch: int = 16,
    threshold: float = 0.1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[Tensor, Tensor]:
    """Which tokens RLT keeps, and their run lengths.

    Args:
        video: uint8 ``[B, T, H, W, 3]`` (decoder layout, normalized inside with ``mean``/``std``) or floating
            ``[B, 3, T, H, W]`` (model layout, already normalized; ``mean``/``std`` unused).
        tubelet: frames per token; divides T.
        patch: pixels per token side; divides H and W.
        threshold: a token at t' >= 1 is kept iff the mean absolute normalized difference between the last frame
            of its tubelet and the first frame of the previous tubelet exceeds it (strictly). t' = 0 is always kept.

    Returns:
        ``keep`` bool ``[B, T', H', W']`` and ``lengths`` int32 of the same shape: for a kept token the number of
        tubelets up to the next kept token at the same (h', w') or the clip's end; 0 where dropped.
    """
    return torch.ops.vidfast.rlt_mask(video, tubelet, patch, float(threshold), _floats(mean), _floats(std))


def rlt_tokenize(
    video: Tensor,
    tubelet: int = 2,
    patch: int = 16,
    threshold: float = 0.1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out_dtype: torch.dtype = torch.float32,
) -> PackedTokens:
    """Kept tokens of RLT, packed without padding (see :func:`rlt_mask` for the arguments and the rule).

    ``patches @ conv3d.weight.reshape(D, -1).T + conv3d.bias`` equals a Conv3d patch embedding (kernel = stride =
    ``(tubelet, patch, patch)``) of the normalized video at ``positions``. Tokens of a clip come in (t', h', w')
    raster order, clips in batch order. Gradients flow to a floating ``video``. At most :data:`MAX_TOKENS`
    tokens (kept or not) per call: more is a ValueError.
    """
    out = torch.ops.vidfast.rlt_tokenize(
        video, tubelet, patch, float(threshold), _floats(mean), _floats(std), out_dtype
    )
    return PackedTokens(*out)


class RLTTokenizer(nn.Module):
    """Owns RLT's settings; ``forward(video)`` returns :class:`PackedTokens`."""

    def __init__(
        self,
        tubelet: int = 2,
        patch: int = 16,
        threshold: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        out_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.tubelet, self.patch, self.threshold = tubelet, patch, float(threshold)
        self.mean, self.std, self.out_dtype = _floats(mean), _floats(std), out_dtype

    def forward(self, video: Tensor) -> PackedTokens:
        return rlt_tokenize(video, self.tubelet, self.patch, self.threshold, self.mean, self.std, self.out_dtype)

    def extra_repr(self) -> str:
        return f"tubelet={self.tubelet}, patch={self.patch}, threshold={self.threshold}"


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _token_grid(video: Tensor, tubelet: int, patch: int) -> tuple[int, int, int, int]:
    """(B, T', H', W') with the same checks as the C++ kernels, for the fake kernels."""
    torch._check(video.dim() == 5, lambda: f"video: expected a 5-D tensor; got shape {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        torch._check(video.shape[4] == 3, lambda: "video: uint8 video must be [B, T, H, W, 3]")
        batch, frames, height, width = video.shape[:4]
    else:
        torch._check(video.shape[1] == 3, lambda: "video: floating video must be [B, 3, T, H, W]")
        batch, frames, height, width = video.shape[0], *video.shape[2:]
    torch._check(frames % tubelet == 0, lambda: "tubelet: must divide the frame count")
    torch._check(height % patch == 0 and width % patch == 0, lambda: "patch: must divide H and W")
    return batch, frames // tubelet, height // patch, width // patch


def _check_token_count(grid) -> None:
    """The fake kernel's copy of the op's check (csrc/rlt/rlt.cpp, ``check_token_count``): a ValueError for a
    token grid (B, T', H', W') of more than MAX_TOKENS tokens."""
    tokens = grid[0] * grid[1] * grid[2] * grid[3]
    if tokens > MAX_TOKENS:  # (a plain branch: under torch.compile, a guard on the sizes)
        raise ValueError(f"video: at most 2^31 - 1 tokens (B * T' * H' * W', counted in int32); got "
                         f"{' * '.join(map(str, grid))} = {tokens}")


@torch.library.register_fake("vidfast::rlt_mask")
def _rlt_mask_fake(video, tubelet=2, patch=16, threshold=0.1, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    grid = _token_grid(video, tubelet, patch)
    return video.new_empty(grid, dtype=torch.bool), video.new_empty(grid, dtype=torch.int32)


@torch.library.register_fake("vidfast::rlt_tokenize")
def _rlt_tokenize_fake(video, tubelet=2, patch=16, threshold=0.1, mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=None):
    grid = _token_grid(video, tubelet, patch)
    _check_token_count(grid)
    batch = grid[0]
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        video.new_empty((n, 3 * tubelet * patch * patch), dtype=out_dtype or torch.float32),
        video.new_empty((n, 3), dtype=torch.int32),
        video.new_empty((n,), dtype=torch.int32),
        video.new_empty((batch + 1,), dtype=torch.int32),
    )


def _rlt_tokenize_setup_context(ctx, inputs, output):
    # Only `video` has a gradient, and the backward needs only where each token came from (not the video).
    if not ctx.needs_input_grad[0]:
        return
    video, tubelet, patch = inputs[0], inputs[1], inputs[2]
    _, positions, _, cu_seqlens = output
    ctx.video_shape, ctx.video_dtype = video.shape, video.dtype
    ctx.tubelet, ctx.patch = tubelet, patch
    ctx.save_for_backward(positions, cu_seqlens)


def _rlt_tokenize_backward(ctx, grad_patches, *_):
    """Scatters the patch gradients back into the floating video [B, 3, T, H, W]."""
    positions, cu_seqlens = ctx.saved_tensors
    batch, _, frames, height, width = ctx.video_shape
    tub, p = ctx.tubelet, ctx.patch
    tp, hp, wp = frames // tub, height // p, width // p
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    clip = torch.repeat_interleave(torch.arange(batch, device=positions.device), counts)
    pos = positions.long()
    token = ((clip * tp + pos[:, 0]) * hp + pos[:, 1]) * wp + pos[:, 2]
    tokens = grad_patches.new_zeros((batch * tp * hp * wp, grad_patches.shape[1]))
    tokens[token] = grad_patches
    grid = tokens.view(batch, tp, hp, wp, 3, tub, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    grad_video = grid.reshape(batch, 3, frames, height, width).to(ctx.video_dtype)
    return grad_video, None, None, None, None, None, None


torch.library.register_autograd(
    "vidfast::rlt_tokenize", _rlt_tokenize_backward, setup_context=_rlt_tokenize_setup_context
)
