"""Layers shared by every model family (``timm.layers`` is the model): each is defined once, here.

Every layer that mixes tokens takes an optional :class:`Packing`. Without one, input is a dense batch
``[B, N, C]`` and attention runs through torch SDPA; with one, input is a packed sequence ``[N, C]`` (the tokens of
all clips, clip after clip, no padding) and attention runs through :func:`pyvidfast.ops.varlen_attention`.
Parameter names are chosen by attribute names (``qkv``, ``proj``, ``fc1``, ``gamma``, ...) so each family keeps
its official checkpoint names; family-only pieces live in the family file and build on these.
"""

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyvidfast.ops import varlen_attention
from pyvidfast.ops.rlt import IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True)
class DataConfig:
    """What a model expects as input, so data pipelines ask the model (``model.data_config``) instead of
    hard-coding it: normalization ``mean``/``std`` of [0, 1] RGB, the native clip (``num_frames`` x ``img_size``
    square) and the token geometry (``tubelet_size`` frames x ``patch_size`` pixels square)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_frames: int = 16
    img_size: int = 224
    tubelet_size: int = 2
    patch_size: int = 16


def normalize_video(video: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``[B, T, H, W, 3]`` (decoder layout) -> normalized ``[B, 3, T, H, W]`` (model layout)."""
    if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"video: expected uint8 [B, T, H, W, 3]; got {video.dtype} {tuple(video.shape)}")
    mean_t = torch.tensor(mean, dtype=dtype, device=video.device).view(1, 3, 1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=video.device).view(1, 3, 1, 1, 1)
    x = video.permute(0, 4, 1, 2, 3).to(dtype).div_(255.0)
    return (x - mean_t) / std_t


# ----------------------------------------------------------------------------------------------------------------
# Packing


class Packing:
    """Bounds of the clips in a packed ``[N, ...]`` token sequence, as varlen attention wants them.

    ``cu_seqlens`` int32 ``[B + 1]`` (clip ``b`` owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``), ``max_seqlen`` the
    longest clip (a host int; an unbacked SymInt when it comes from data under ``torch.compile``), ``num_clips``
    and ``clip_of_token`` int64 ``[N]``. Build with :meth:`from_lengths` (host lengths) or :meth:`from_cu_seqlens`.
    """

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, num_tokens: int,
                 lengths: Sequence[int] | None = None):
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.num_clips = cu_seqlens.shape[0] - 1
        positions = torch.arange(num_tokens, device=cu_seqlens.device)
        self.clip_of_token = torch.searchsorted(cu_seqlens[1:], positions.to(cu_seqlens.dtype), right=True)
        self._lengths = None if lengths is None else [int(n) for n in lengths]

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str | None = None) -> "Packing":
        """Clips of ``lengths`` tokens (host ints), packed in this order."""
        lengths = [int(n) for n in lengths]
        counts = torch.tensor(lengths, dtype=torch.int32, device=device)
        cu_seqlens = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(cu_seqlens, max(lengths, default=0), sum(lengths), lengths)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, max_seqlen: int, num_tokens: int | None = None) -> "Packing":
        """Bounds already on the device (e.g. from ``rlt_tokenize``). ``num_tokens`` (``cu_seqlens[-1]``, read from
        the device when not given) is usually known from the packed tensor's first dimension."""
        if num_tokens is None:
            num_tokens = int(cu_seqlens[-1])
        return cls(cu_seqlens, max_seqlen, num_tokens)

    @property
    def lengths(self) -> Tensor:
        """Tokens per clip, int64 ``[B]``."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def mean(self, x: Tensor) -> Tensor:
        """Mean of each clip's tokens: packed ``[N, D]`` -> ``[B, D]`` (an empty clip gives zeros)."""
        sums = x.new_zeros((self.num_clips, x.shape[1])).index_add_(0, self.clip_of_token, x)
        return sums / self.lengths.clamp_min(1).unsqueeze(1).to(x.dtype)

    def split(self, x: Tensor) -> list[Tensor]:
        """Packed ``[N, ...]`` -> one tensor per clip."""
        lengths = self._lengths if self._lengths is not None else self.lengths.tolist()
        return list(torch.split(x, lengths))


# ----------------------------------------------------------------------------------------------------------------
# Attention


def attention(q: Tensor, k: Tensor, v: Tensor, packing: Packing | None = None, dropout_p: float = 0.0,
              causal: bool = False, scale: float | None = None) -> Tensor:
    """Softmax attention in the layout it is given: dense ``[B, N, H, D]`` through torch SDPA, or packed
    ``[N, H, D]`` with a :class:`Packing` through ``varlen_attention`` (each clip attends only to itself)."""
    if packing is None:
        if q.dim() != 4:
            raise ValueError(f"q: expected dense [B, N, H, D] without a packing; got {tuple(q.shape)}")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    if q.dim() != 3:
        raise ValueError(f"q: expected packed [N, H, D] with a packing; got {tuple(q.shape)}")
    if dropout_p > 0:
        raise NotImplementedError("dropout_p: attention dropout is not supported on packed tokens")
    cu, longest = packing.cu_seqlens, packing.max_seqlen
    return varlen_attention(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=causal)


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` Linear, attention, ``proj``.

    Bias of ``qkv``: ``qkv_bias`` a plain bias; ``qv_bias`` BEiT/VideoMAE-style learnable ``q_bias`` and ``v_bias``
    with none on k (the official parameter names); neither: no bias. ``qk_norm``: RMSNorm of q and k over all
    channels (InternVideo2/FluxViT, ``q_norm``/``k_norm``). ``forward(x, packing=None)``: ``x`` ``[B, N, C]``, or
    ``[N, C]`` packed with a :class:`Packing`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qv_bias: bool = False,
                 qk_norm: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide the width {dim}")
        if qkv_bias and qv_bias:
            raise ValueError("qkv_bias, qv_bias: choose at most one bias layout")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.q_norm = RMSNorm(dim) if qk_norm else None
        self.k_norm = RMSNorm(dim) if qk_norm else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[..., C]`` -> q, k, v ``[..., H, D]`` (strided views: the head dim has stride 1)."""
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        if self.q_norm is not None:
            q = self.q_norm(q.flatten(-2)).unflatten(-1, (self.num_heads, self.head_dim))
            k = self.k_norm(k.flatten(-2)).unflatten(-1, (self.num_heads, self.head_dim))
        return q, k, v

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        q, k, v = self.project_qkv(x)
        out = attention(q, k, v, packing, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.flatten(-2)))


# ----------------------------------------------------------------------------------------------------------------
# Token-wise layers


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """RMS normalization computed in float32 (float64 stays float64), cast back, then scaled (InternVideo2's
    order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = _at_least_float32(x)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma``; ``force_fp32`` multiplies in float32 (InternVideo2's ``force_fp32``)."""

    def __init__(self, dim: int, init_values: float = 1e-5, force_fp32: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
        self.force_fp32 = force_fp32

    def forward(self, x: Tensor) -> Tensor:
        if self.force_fp32:
            return (_at_least_float32(x) * _at_least_float32(self.gamma)).to(x.dtype)
        return x * self.gamma


class Mlp(nn.Module):
    """``fc1``, activation, dropout, ``fc2``, dropout (exact erf GELU by default, as ViTs are trained)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per clip (dense: per batch row; packed: every token of
    a clip together)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        if packing is None:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        else:
            mask = x.new_empty(packing.num_clips).bernoulli_(keep)[packing.clip_of_token]
            mask = mask.view((-1,) + (1,) * (x.dim() - 1))
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(ls1(attn(norm1(x))))``, then the same with ``mlp``/``norm2``/
    ``ls2``. ``init_values`` adds LayerScale (``ls1``/``ls2``; none when None); ``attn_layer`` lets a family
    bring its own attention (built as ``attn_layer(dim, num_heads, **attn_kwargs)``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, init_values: float | None = None, ls_force_fp32: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, attn_layer: type[nn.Module] = Attention,
                 **attn_kwargs):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, attn_drop=attn_drop, proj_drop=drop, **attn_kwargs)
        self.ls1 = LayerScale(dim, init_values, ls_force_fp32) if init_values is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)  # int() of the product, as the official ViTs
        self.ls2 = LayerScale(dim, init_values, ls_force_fp32) if init_values is not None else nn.Identity()

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), packing)), packing)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))), packing)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth per block, rising linearly from 0 at the first block to ``drop_path_rate`` at the last."""
    return [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


# ----------------------------------------------------------------------------------------------------------------
# Patch embedding


class PatchEmbed(nn.Module):
    """Tubelet embedding: a Conv3d ``proj`` with kernel = stride = (tubelet, patch, patch); tokens in (t, h, w)
    raster order. The same weight also embeds flattened patches as a Linear (:meth:`embed_patches`), as RLT and
    per-patch normalization need. ``img_size``/``num_frames`` (optional) fix the native ``grid``/``num_patches``."""

    def __init__(self, embed_dim: int, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3,
                 img_size: int | None = None, num_frames: int | None = None):
        super().__init__()
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.grid = self.num_patches = None
        if img_size is not None and num_frames is not None:
            if img_size % patch_size or num_frames % tubelet_size:
                raise ValueError(f"img_size {img_size} / num_frames {num_frames} must be multiples of the patch "
                                 f"{patch_size} / tubelet {tubelet_size}")
            self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
            self.num_patches = math.prod(self.grid)
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> ``[B, N, D]`` by the convolution."""
        return self.proj(video).flatten(2).transpose(1, 2)

    def patchify(self, video: Tensor, channels_last: bool = False) -> Tensor:
        """``[B, C, T, H, W]`` -> flattened patches ``[B, N, C * tubelet * patch * patch]`` in (t, h, w) raster
        order; each patch ordered [c][dt][ph][pw] (the Conv3d weight's order) or, ``channels_last``,
        [dt][ph][pw][c]."""
        b, c, t, h, w = video.shape
        p, tub = self.patch_size, self.tubelet_size
        if t % tub or h % p or w % p:
            raise ValueError(f"video: T must be a multiple of {tub} and H, W of {p}; got {tuple(video.shape)}")
        grid = video.reshape(b, c, t // tub, tub, h // p, p, w // p, p)
        order = (0, 2, 4, 6, 3, 5, 7, 1) if channels_last else (0, 2, 4, 6, 1, 3, 5, 7)
        return grid.permute(order).reshape(b, (t // tub) * (h // p) * (w // p), -1)

    def embed_patches(self, patches: Tensor, channels_last: bool = False) -> Tensor:
        """Flattened patches ``[..., K]`` (order as :meth:`patchify`) -> tokens ``[..., D]``, the same weights as
        ``forward``."""
        weight = self.proj.weight
        if channels_last:
            weight = weight.permute(0, 2, 3, 4, 1)
        weight = weight.reshape(weight.shape[0], -1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)
