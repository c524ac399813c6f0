"""UniFormerV2 (Li et al., ICCV 2023): video models built on image CLIP ViTs (B/16, L/14, L/14@336).

Parameter names and shapes follow the official code (OpenGVLab/UniFormerV2 ``slowfast/models/uniformerv2_model.py``,
the net the ``Uniformerv2`` wrapper stores as ``backbone``), so its released checkpoints load with
``strict=True`` after :func:`checkpoint_filter_fn` (``model_state`` nesting, ``backbone.`` prefix, K710 head).

Structure (input: normalized video ``[B, 3, T, H, W]``, H = W = ``img_size``):

* stem: Conv3d ``conv1`` (kernel (1, p, p); (3, p, p) with stride 2 in time when ``temporal_downsample``), then
  per frame a class token, the spatial position embedding shared by all frames (no temporal one) and ``ln_pre``;
* backbone: CLIP blocks run frame by frame (QuickGELU, float32 LayerNorm), each optionally wrapped by two Local
  UniBlocks (``lmhra1`` before, ``lmhra2`` after self-attention: BN3d, 1x1x1 conv, depthwise temporal conv, zero-init
  1x1x1 conv, residual on the patch tokens);
* global UniBlocks after the layers in ``return_list``: a depthwise 3x3x3 conv (``dpe``) added to the patch tokens,
  then cross-attention of one learnable query over all tokens of all frames (``dec``), the query refined layer by
  layer;
* head: ``(1 - w) * query + w * mean_T(class token)`` with ``w = sigmoid(balance)``, then LayerNorm, dropout, Linear.

Frames are kept as a batch of frames ``[F, 1 + HW, C]`` (F = all frames of all clips), so :meth:`forward_packed`
runs clips of different lengths together: only the temporal convolutions are split per clip, and the global
cross-attention runs through ``varlen_attention`` with one query per clip.
"""

import math
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from pyvidfast import ops
from pyvidfast.models.layers import DataConfig, DropPath, Packing, attention, drop_path_rates
from pyvidfast.models.registry import read_hf_config, read_state_dict, register_model
from pyvidfast.profiling import nvtx_range

LN_EPS = 1e-5  # every LayerNorm of the official models (PyTorch's default)
MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # SlowFast's defaults, which every UniFormerV2 config keeps

# Published fine-tuning recipes (exp/*/run.sh and config.yaml of the official repository); the training task reads
# them from ``model.recipe``. lr is the total for ``batch_size`` (the official runs do not rescale it);
# ``zero_wd_1d``: biases, 1-D parameters and BatchNorm get no weight decay (SOLVER.ZERO_WD_1D_PARAM).
RECIPES = {
    "kinetics": dict(lr=1e-5, batch_size=256, epochs=55, warmup_epochs=5, warmup_start_lr=1e-6, end_lr=1e-6,
                     optimizer="adamw", betas=(0.9, 0.999), weight_decay=0.05, zero_wd_1d=True,
                     backbone_drop_path_rate=0.0, drop_path_rate=0.0,
                     sampling="segment", num_frames=8, rand_augment="rand-m7-n4-mstd0.5-inc1",
                     resized_crop_scale=(0.08, 1.0), resized_crop_ratio=(0.75, 1.3333), flip=True,
                     repeated_aug=1, test_crops=3, test_clips=4, test_softmax=True),
    "ssv2": dict(lr=4e-5, batch_size=128, epochs=22, warmup_epochs=5, warmup_start_lr=1e-6, end_lr=1e-6,
                 optimizer="adamw", betas=(0.9, 0.999), weight_decay=0.05, zero_wd_1d=True,
                 backbone_drop_path_rate=0.2, drop_path_rate=0.4,
                 sampling="segment", num_frames=16, rand_augment="rand-m7-n4-mstd0.5-inc1",
                 resized_crop_scale=(0.08, 1.0), resized_crop_ratio=(0.75, 1.3333), flip=False,
                 repeated_aug=2, test_crops=3, test_clips=1, test_softmax=True),
}


# ----------------------------------------------------------------------------------------------------------------
# Layers with CLIP's names


class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: half-precision input is normalized in float32 (float64 input stays float64)."""

    def forward(self, x: Tensor) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        return super().forward(x.to(compute)).to(x.dtype)


class QuickGELUFunction(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` keeping only x for the backward (autograd would also keep the sigmoid, one more
    MLP-hidden-sized tensor per block) and differentiating through ATen's fused silu backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.mul(x, 1.702).sigmoid_().mul_(x)  # one temporary, reused for the result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # x s(a x) = silu(a x) / a, so its derivative is silu'(a x): ATen's fused silu backward, one pass (five ops
        # through the sigmoid took 1.8x as long on an MLP hidden tensor)
        return torch.ops.aten.silu_backward(grad, torch.mul(x, 1.702))


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return QuickGELUFunction.apply(x)


class MultiheadAttention(nn.Module):
    """Holds ``nn.MultiheadAttention``'s parameters (``in_proj_weight`` [3C, C], ``in_proj_bias``, ``out_proj``) so
    CLIP and UniFormerV2 checkpoints load, and computes with the shared :func:`attention` (SDPA / varlen)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialization
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention within each row: [B, N, C] -> [B, N, C]."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        if x.device.type != "cpu":
            return self.out_proj(attention(q, k, v).flatten(-2))
        # On the CPU the rows go through varlen_attention as packed sequences of equal length: its kernel's backward
        # beat ATen's flash-attention one (a training step ran 2.7% faster on an AVX2 EPYC).
        rows, length = x.shape[:2]
        cu = torch.arange(0, (rows + 1) * length, length, dtype=torch.int32)
        out = ops.varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, length, length)
        return self.out_proj(out.view(rows, length, -1))

    def cross(self, query: Tensor, context: Tensor, packing: Packing | None = None) -> Tensor:
        """One query per clip attending over its clip's context: query [B, 1, C]; context [B, M, C] (dense) or
        packed [sum M_b, C] with the clips' bounds in ``packing``; returns [B, 1, C].

        Dense, the projections move off the context, the same result with no [M, 2C] keys and values computed or
        kept: the key projection folds into the query (scores = context @ (W_k^T q); the key bias adds one
        constant to all scores of a head, which the softmax cancels) and the value projection comes after the
        pooling (the weights sum to 1, so its bias passes through). The context then meets only [H, C] matrices:
        per global block 2 x M x C x H multiply-adds instead of 2 x M x C x C. Packed clips go through
        ``varlen_attention`` with one query per clip on projected keys and values (its CUDA kernels take head dims
        up to 256, not the folded query's C)."""
        dim = query.shape[-1]
        heads, head_dim = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query[:, 0], w_q, b_q).view(-1, heads, head_dim)
        if packing is None:
            q_keys = torch.einsum("bhd,hdc->bhc", q * head_dim ** -0.5, w_k.view(heads, head_dim, dim))  # [B, H, C]
            pooled = _softmax_pool(q_keys, context)
            out = torch.einsum("bhc,hdc->bhd", pooled, w_v.view(heads, head_dim, dim)) + b_v.view(heads, head_dim)
        else:
            k = F.linear(context, w_k, b_k).view(-1, heads, head_dim)
            v = F.linear(context, w_v, b_v).view(-1, heads, head_dim)
            cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
            out = ops.varlen_attention(q, k, v, cu_q, packing.cu_seqlens, 1, packing.max_seqlen)
        return self.out_proj(out.flatten(-2))[:, None]


def _softmax_pool(q_keys: Tensor, context: Tensor) -> Tensor:
    """softmax(q_keys @ context^T) @ context: q_keys [B, H, C], context [B, M, C] -> [B, H, C]."""
    weights = torch.bmm(q_keys, context.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(weights, context)


def _mlp(dim: int, hidden: int, dropout: float | None = None) -> nn.Sequential:
    """CLIP's MLP, named ``c_fc``/``c_proj`` (the global blocks add a dropout between)."""
    layers = [("c_fc", nn.Linear(dim, hidden)), ("gelu", QuickGELU())]
    if dropout is not None:
        layers.append(("dropout", nn.Dropout(dropout)))
    layers.append(("c_proj", nn.Linear(hidden, dim)))
    return nn.Sequential(OrderedDict(layers))


# ----------------------------------------------------------------------------------------------------------------
# Frames <-> clips. ``frames`` lists the frame count of each clip; x holds their frames one after the other.


def _is_uniform(frames: tuple[int, ...]) -> bool:
    return all(t == frames[0] for t in frames)


def to_video(patches: Tensor, frames: tuple[int, ...]) -> Tensor:
    """Patch tokens [F, HW, C] -> [B, C, T, H, W] when all clips have T frames, else [1, C, F, H, W] (a temporal
    conv on it must go through :func:`clipwise`). Channels-last in memory, the tokens' own layout: the convolutions
    then run on it without a transposition (oneDNN's depthwise 3D convolution also ran twice as fast so), and
    :func:`from_video` is a view."""
    num, length, dim = patches.shape
    side = math.isqrt(length)
    clips, t = (len(frames), frames[0]) if _is_uniform(frames) else (1, num)
    video = patches.view(clips, t, side, side, dim).permute(0, 4, 1, 2, 3)
    return video.contiguous(memory_format=torch.channels_last_3d)


def from_video(video: Tensor) -> Tensor:
    """[B, C, T, H, W] -> patch tokens [B * T, HW, C]."""
    clips, dim, t = video.shape[:3]
    return video.permute(0, 2, 3, 4, 1).reshape(clips * t, -1, dim)


def clipwise(conv: Callable[[Tensor], Tensor], video: Tensor, frames: tuple[int, ...]) -> Tensor:
    """A convolution over time that must not mix clips: on [1, C, F, H, W] (clips of different lengths) it runs
    on each clip's frames separately."""
    if video.shape[0] == len(frames):
        return conv(video)
    return torch.cat([conv(part) for part in video.split(list(frames), dim=2)], dim=2)


class DepthwiseConv3dFunction(torch.autograd.Function):
    """Depthwise Conv3d with an odd kernel and "same" zero padding (the DPE: 3x3x3, padding 1) whose backward runs
    as two forward convolutions: grad_input correlates the gradient with the flipped kernel, grad_weight correlates
    the input with the gradient as the kernel (groups = channels, the clips summed inside each group). On the CPU
    ATen's own depthwise 3D backward took 32 ms per B/16 DPE call, these two 12 ms (AMD EPYC Zen 3, 1 thread)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv3d(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        channels, kernel = weight.shape[0], weight.shape[2:]
        padding = [k // 2 for k in kernel]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip((2, 3, 4)), padding=padding, groups=channels)
        if ctx.needs_input_grad[1]:  # [1, C * N, T, H, W] (channel c, clip n) with the kernels [C, N, T, H, W]
            inputs = x.transpose(0, 1).reshape(1, -1, *x.shape[2:])
            grad_weight = F.conv3d(inputs, grad.transpose(0, 1), padding=padding, groups=channels).view_as(weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias


def depthwise_conv3d(conv: nn.Conv3d, video: Tensor) -> Tensor:
    """``conv(video)`` for a depthwise "same" Conv3d; on the CPU in float32/float64 through
    :class:`DepthwiseConv3dFunction`."""
    if (video.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and video.dtype == conv.weight.dtype and video.dtype in (torch.float32, torch.float64)):
        return DepthwiseConv3dFunction.apply(video, conv.weight, conv.bias)
    return conv(video)


# ----------------------------------------------------------------------------------------------------------------
# UniBlocks


class LocalMHRA(nn.Module):
    """Local UniBlock's relation aggregator: BN3d, 1x1x1 conv to C / dw_reduction, depthwise temporal conv, 1x1x1
    conv back to C (zero-initialized, so the block starts as the identity)."""

    def __init__(self, dim: int, dw_reduction: float = 1.5, pos_kernel_size: int = 3):
        super().__init__()
        reduced = int(dim // dw_reduction)
        self.pos_embed = nn.Sequential(
            nn.BatchNorm3d(dim),
            nn.Conv3d(dim, reduced, kernel_size=1),
            nn.Conv3d(reduced, reduced, kernel_size=(pos_kernel_size, 1, 1), padding=(pos_kernel_size // 2, 0, 0),
                      groups=reduced),
            nn.Conv3d(reduced, dim, kernel_size=1),
        )
        nn.init.zeros_(self.pos_embed[3].weight)
        nn.init.zeros_(self.pos_embed[3].bias)

    def forward(self, patches: Tensor, frames: tuple[int, ...]) -> Tensor:
        """Patch tokens [F, HW, C] -> their update [F, HW, C]. The same arithmetic as the official Conv3d stack on
        [B, C, T, H, W], run on the tokens' own layout: BN over all positions, the 1x1x1 convs as matrix products
        and the temporal conv as K shifted products (ATen's CPU Conv3d takes its slow im2col path for these, forward
        and backward, at a fifth of the training step)."""
        norm, reduce, temporal, expand = self.pos_embed
        num, length, dim = patches.shape
        flat = patches.reshape(num * length, dim)
        x = norm(flat.view(*flat.shape, 1, 1, 1)).view_as(flat)  # BN3d statistics are over every position
        x = F.linear(x, reduce.weight.flatten(1), reduce.bias).view(num, length, -1)
        if _is_uniform(frames):
            x = temporal_conv(temporal, x.view(len(frames), frames[0], length, -1))
        else:  # clips of different lengths: the temporal conv must not cross their bounds
            x = torch.cat([temporal_conv(temporal, part) for part in x.split(list(frames))])
        return F.linear(x.reshape(num, length, -1), expand.weight.flatten(1), expand.bias)


class TemporalConvFunction(torch.autograd.Function):
    """A depthwise (K, 1, 1) convolution with zero padding K // 2 over the frames of clips of equal length, on the
    tokens' layout: x [..., T, HW, C], weight [C, K], bias [C] -> [..., T, HW, C]. Each tap is one multiply-add into
    the frames it reaches (no padded copy); the backward runs the same taps the other way and one product-sum per
    tap for the weight: half the time of autograd through the shifted products (1 thread, AMD EPYC Zen 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        size = weight.shape[1]
        out = torch.addcmul(bias, x, weight[:, size // 2])
        for k, (dst, src) in _taps(size, x.shape[-3]):
            out.narrow(-3, *dst).addcmul_(x.narrow(-3, *src), weight[:, k])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        size = weight.shape[1]
        taps = _taps(size, x.shape[-3])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * weight[:, size // 2]
            for k, (dst, src) in taps:  # out[dst] took x[src] * w[k]
                grad_x.narrow(-3, *src).addcmul_(grad.narrow(-3, *dst), weight[:, k])
        positions = tuple(range(grad.dim() - 1))
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)  # taps that reach no frame (T < K) stay zero
            grad_weight[:, size // 2] = (grad * x).sum(positions)
            for k, (dst, src) in taps:
                grad_weight[:, k] = (grad.narrow(-3, *dst) * x.narrow(-3, *src)).sum(positions)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(positions)
        return grad_x, grad_weight, grad_bias


def _taps(size: int, frames: int) -> list[tuple[int, tuple[tuple[int, int], tuple[int, int]]]]:
    """The off-centre taps k of a temporal kernel: the (start, length) of the output frames and of the input
    frames they take (zero padding: frames beyond the clip contribute nothing)."""
    taps = []
    for k in range(size):
        shift = k - size // 2
        length = frames - abs(shift)
        if shift and length > 0:
            taps.append((k, ((max(-shift, 0), length), (max(shift, 0), length))))
    return taps


def temporal_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv`` (depthwise, kernel (K, 1, 1), padding K // 2) on x [T, HW, C] or [B, T, HW, C] (clips of equal
    length)."""
    return TemporalConvFunction.apply(x, conv.weight.view(conv.weight.shape[0], -1), conv.bias)


class ResidualAttentionBlock(nn.Module):
    """CLIP block (run per frame) with the optional Local UniBlocks before and after self-attention."""

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, dw_reduction: float = 1.5,
                 no_lmhra: bool = False, double_lmhra: bool = True):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.lmhra1 = None if no_lmhra else LocalMHRA(dim, dw_reduction)
        self.lmhra2 = LocalMHRA(dim, dw_reduction) if not no_lmhra and double_lmhra else None
        self.attn = MultiheadAttention(dim, num_heads)
        self.ln_1 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = _mlp(dim, dim * 4)
        self.ln_2 = LayerNorm(dim, eps=LN_EPS)

    def _residual(self, x: Tensor, delta: Tensor, clips: int) -> Tensor:
        # Drop path per clip: all frames of a clip keep or drop the branch together.
        return x + self.drop_path(delta.reshape(clips, -1, delta.shape[-1])).view_as(x)

    def _local(self, x: Tensor, lmhra: LocalMHRA, frames: tuple[int, ...]) -> Tensor:
        with nvtx_range("uniformerv2.local"):
            patches = x[:, 1:]
            clips = len(frames) if _is_uniform(frames) else 1
            return torch.cat([x[:, :1], self._residual(patches, lmhra(patches, frames).to(x.dtype), clips)], dim=1)

    def forward(self, x: Tensor, frames: tuple[int, ...]) -> Tensor:
        """x: tokens of every frame [F, 1 + HW, C]."""
        clips = len(frames) if _is_uniform(frames) else 1
        if self.lmhra1 is not None:
            x = self._local(x, self.lmhra1, frames)
        x = self._residual(x, self.attn(self.ln_1(x)), clips)
        if self.lmhra2 is not None:
            x = self._local(x, self.lmhra2, frames)
        return self._residual(x, self.mlp(self.ln_2(x)), clips)


class Extractor(nn.Module):
    """Global UniBlock's cross-attention: the video query attends over all tokens of all frames of its clip."""

    def __init__(self, dim: int, num_heads: int, mlp_factor: float = 4.0, dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.attn = MultiheadAttention(dim, num_heads)
        self.ln_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _mlp(dim, round(mlp_factor * dim), dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_3 = nn.LayerNorm(dim, eps=LN_EPS)
        # Published initialization: xavier projections in, zeros out (the block starts as the identity).
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.xavier_uniform_(self.mlp.c_fc.weight)
        nn.init.zeros_(self.mlp.c_proj.weight)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def forward(self, query: Tensor, context: Tensor, packing: Packing | None = None):
        """query [B, 1, C]; context [B, M, C], or packed [sum M_b, C] with the clips' bounds in ``packing``."""
        query = query + self.drop_path(self.attn.cross(self.ln_1(query), self.ln_3(context), packing))
        return query + self.drop_path(self.mlp(self.ln_2(query)))


class Transformer(nn.Module):
    """The CLIP blocks, the global UniBlocks and the head (the official ``transformer`` module, whose names the
    checkpoints carry)."""

    def __init__(self, width: int, layers: int, heads: int, backbone_drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False, checkpoint_num=0, dw_reduction: float = 1.5,
                 no_lmhra: bool = False, double_lmhra: bool = True, return_list=(8, 9, 10, 11), n_head: int = 12,
                 mlp_factor: float = 4.0, drop_path_rate: float = 0.0, mlp_dropout=None, cls_dropout: float = 0.5,
                 num_classes: int = 400, frozen: bool = False):
        super().__init__()
        self.return_list = list(return_list)
        if sorted(set(self.return_list)) != self.return_list or not all(0 <= i < layers for i in self.return_list):
            raise ValueError(f"return_list: expected increasing layer indices in [0, {layers}); got {return_list}")
        n_layers = len(self.return_list)
        mlp_dropout = [0.5] * n_layers if mlp_dropout is None else list(mlp_dropout)
        if len(mlp_dropout) != n_layers:
            raise ValueError(f"mlp_dropout: expected {n_layers} rates (one per global layer); got {mlp_dropout}")
        if isinstance(checkpoint_num, (list, tuple)):  # the official configs give [n]
            checkpoint_num = checkpoint_num[0]
        self.use_checkpoint, self.checkpoint_num = use_checkpoint, checkpoint_num
        backbone_rates = drop_path_rates(backbone_drop_path_rate, layers)
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, backbone_rates[i], dw_reduction, no_lmhra, double_lmhra)
            for i in range(layers))
        self.frozen = frozen
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dpe = nn.ModuleList(nn.Conv3d(width, width, kernel_size=3, padding=1, groups=width)
                                 for _ in range(n_layers))
        for conv in self.dpe:
            nn.init.zeros_(conv.bias)
        global_rates = drop_path_rates(drop_path_rate, n_layers)
        self.dec = nn.ModuleList(Extractor(width, n_head, mlp_factor, mlp_dropout[j], global_rates[j])
                                 for j in range(n_layers))
        self.proj = nn.Sequential(nn.LayerNorm(width, eps=LN_EPS), nn.Dropout(cls_dropout),
                                  nn.Linear(width, num_classes))
        self.balance = None if frozen else nn.Parameter(torch.zeros(width))

    def _global_context(self, x: Tensor, j: int, frames: tuple[int, ...]) -> Tensor:
        """Tokens of every frame with the DPE added to the patch tokens (class tokens unchanged): [F, 1 + HW, C]."""
        video = to_video(x[:, 1:], frames)
        video = video + clipwise(partial(depthwise_conv3d, self.dpe[j]), video, frames)
        return torch.cat([x[:, :1], from_video(video).to(x.dtype)], dim=1)

    def forward(self, x: Tensor, frames: tuple[int, ...]) -> Tensor:
        """x: stem tokens [F, 1 + HW, C] of clips with ``frames`` frames each -> logits [len(frames), classes]."""
        num_clips, dim = len(frames), x.shape[-1]
        uniform = _is_uniform(frames)
        # packed context: clip b owns frames[b] * (1 + HW) tokens
        packing = None if uniform else Packing.from_lengths([t * x.shape[1] for t in frames], device=x.device)
        query = self.temporal_cls_token.to(x.dtype).expand(num_clips, 1, dim)
        j = 0
        with nvtx_range("uniformerv2.backbone"):
            for i, block in enumerate(self.resblocks):
                if self.use_checkpoint and i < self.checkpoint_num and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(block, x, frames, use_reentrant=False)
                else:
                    x = block(x, frames)
                if j < len(self.return_list) and i == self.return_list[j]:
                    with nvtx_range("uniformerv2.global"):
                        context = self._global_context(x, j, frames)
                        context = context.view(num_clips, -1, dim) if uniform else context.flatten(0, 1)
                        query = self.dec[j](query, context, packing)
                    j += 1
        with nvtx_range("uniformerv2.head"):
            query = query[:, 0]
            if self.frozen:
                return self.proj(query)
            frame_cls = x[:, 0]
            if uniform:
                mean_cls = frame_cls.view(num_clips, frames[0], dim).mean(1)
            else:
                mean_cls = torch.stack([part.mean(0) for part in frame_cls.split(list(frames))])
            weight = torch.sigmoid(self.balance)
            return self.proj((1 - weight) * query + weight * mean_cls)


# ----------------------------------------------------------------------------------------------------------------
# Model


class UniFormerV2(nn.Module):
    """UniFormerV2 classifier: normalized video ``[B, 3, T, H, W]`` -> logits ``[B, num_classes]``.

    Keyword options are the official ones (``uniformerv2_model.uniformerv2_b16``); the frame count is free (there is
    no temporal position embedding), ``num_frames`` only sets ``data_config``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, num_classes: int = 400, num_frames: int = 8, kernel_size: int = 3,
                 temporal_downsample: bool = False, no_lmhra: bool = True, double_lmhra: bool = True,
                 dw_reduction: float = 1.5, return_list=(8, 9, 10, 11), n_head: int | None = None,
                 mlp_factor: float = 4.0, backbone_drop_path_rate: float = 0.0, drop_path_rate: float = 0.0,
                 mlp_dropout=None, cls_dropout: float = 0.5, frozen: bool = False, use_checkpoint: bool = False,
                 checkpoint_num=0, recipe: str = "kinetics"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size: {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.width, self.num_classes = img_size, patch_size, width, num_classes
        self.temporal_stride = 2 if temporal_downsample else 1
        if temporal_downsample:
            self.conv1 = nn.Conv3d(3, width, (kernel_size, patch_size, patch_size), (2, patch_size, patch_size),
                                   ((kernel_size - 1) // 2, 0, 0), bias=False)
        else:
            self.conv1 = nn.Conv3d(3, width, (1, patch_size, patch_size), (1, patch_size, patch_size), bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((img_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width, eps=LN_EPS)
        self.transformer = Transformer(
            width, layers, heads, backbone_drop_path_rate, use_checkpoint, checkpoint_num, dw_reduction, no_lmhra,
            double_lmhra, return_list, heads if n_head is None else n_head, mlp_factor, drop_path_rate, mlp_dropout,
            cls_dropout, num_classes, frozen)
        self.data_config = DataConfig(mean=MEAN, std=STD, num_frames=num_frames, img_size=img_size,
                                      tubelet_size=self.temporal_stride, patch_size=patch_size)
        self.recipe = dict(RECIPES[recipe], num_frames=num_frames)
        if frozen:  # the official wrapper freezes the CLIP part (local UniBlocks live in the resblocks too)
            for name, p in self.named_parameters():
                if name.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre",
                                    "transformer.resblocks")):
                    p.requires_grad_(False)

    def _embed(self, video: Tensor) -> Tensor:
        """Stem output [B, C, T', h, w] -> tokens of every frame [B * T', 1 + hw, C]."""
        x = from_video(video)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def _check_clip(self, x: Tensor, name: str, dims: int) -> None:
        if x.dim() != dims or x.shape[-4] != 3 or x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            shape = "[B, 3, T, H, W]" if dims == 5 else "[3, T, H, W]"
            raise ValueError(f"{name}: expected a normalized video {shape} with H = W = {self.img_size}; got "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_clip(x, "x", 5)
        with nvtx_range("uniformerv2.stem"):
            video = self.conv1(x)
            frames = (video.shape[2],) * video.shape[0]
            tokens = self._embed(video)
        return self.transformer(tokens, frames)

    def forward_packed(self, clips: list[Tensor]) -> Tensor:
        """Clips of different frame counts in one call, without padding: ``clips`` is a list of normalized
        ``[3, T_b, H, W]`` tensors; returns logits ``[len(clips), num_classes]``, equal to calling the model on each
        clip alone. The backbone runs on all frames together, the temporal convs per clip, and the global
        cross-attention through ``varlen_attention`` (one query per clip)."""
        if not clips:
            raise ValueError("clips: expected at least one clip")
        for b, clip in enumerate(clips):
            self._check_clip(clip, f"clips[{b}]", 4)
        rates = [m.p for m in self.modules() if isinstance(m, DropPath)]
        if self.training and any(rates):
            raise NotImplementedError("forward_packed: drop path on packed clips is not supported; use forward")
        with nvtx_range("uniformerv2.stem"):
            stems = [self.conv1(clip[None]) for clip in clips]  # the temporal kernel must not cross clips
            frames = tuple(s.shape[2] for s in stems)
            tokens = self._embed(torch.cat(stems, dim=2) if len(stems) > 1 else stems[0])
        return self.transformer(tokens, frames)

    def load_clip(self, source) -> "UniFormerV2":
        """Fills the CLIP part (stem, position embedding, ``ln_pre``, blocks) from CLIP weights; see
        :func:`load_clip_weights`."""
        load_clip_weights(self, source)
        return self


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_filter_fn(state_dict: dict, model: UniFormerV2) -> dict:
    """Official checkpoint (``model_state`` already unwrapped by the registry's reader) -> this model's keys: strips
    the official wrapper's ``backbone.`` prefix (and DDP's ``module.``) and applies the official K710 head mapping
    (a 710-class head on a 400-class model keeps the first 400 rows, as ``Uniformerv2.__init__`` does). Pure:
    returns a new dict."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        out[key] = value
    head = "transformer.proj.2.weight"
    if head in out and out[head].shape[0] == 710 and model.num_classes == 400:
        out[head] = out[head][:400]
        out["transformer.proj.2.bias"] = out["transformer.proj.2.bias"][:400]
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLIP import

_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def read_clip_state(source) -> dict:
    """CLIP vision weights in OpenAI's names (``conv1.weight``, ``transformer.resblocks.{i}.attn.in_proj_weight``,
    ...), from: the ``clip`` package's TorchScript archive (``ViT-B-16.pt``) or an OpenAI / open_clip state dict
    (``visual.*``), the official ``extract_clip`` output (no prefix), or a Hugging Face ``CLIPVisionModel`` /
    ``CLIPModel`` folder or ``.safetensors`` / ``.bin`` file; or such a state dict itself."""
    if not isinstance(source, dict) and _is_torchscript(Path(source)):
        with warnings.catch_warnings():  # torch.jit is deprecated, but the clip package ships its weights so
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(source), map_location="cpu").state_dict()
    else:
        state = read_state_dict(source)  # a state dict, a .pt/.pth/.bin/.safetensors file or an HF folder
        config = read_hf_config(source)
        config = config.get("vision_config", config) if config else None
        if config and (config.get("hidden_act", "quick_gelu") != "quick_gelu"
                       or config.get("layer_norm_eps", LN_EPS) != LN_EPS):
            raise ValueError(f"clip_weights: {source} is not an OpenAI-style CLIP (hidden_act "
                             f"{config.get('hidden_act')!r}, layer_norm_eps {config.get('layer_norm_eps')}); "
                             f"UniFormerV2's blocks use QuickGELU and eps {LN_EPS}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):  # OpenAI / open_clip: the image tower of a full CLIP
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    elif any(k.startswith("vision_model.") for k in state):  # Hugging Face CLIPModel / hub CLIPVisionModel files
        state = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    if "embeddings.patch_embedding.weight" in state:
        state = _hf_to_openai(state)
    for unused in ("proj", "ln_post.weight", "ln_post.bias"):  # CLIP's output norm and projection
        state.pop(unused, None)
    return state


def _is_torchscript(path: Path) -> bool:
    """The clip package's .pt files are TorchScript archives: zips holding a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _hf_to_openai(state: dict) -> dict:
    out = {"conv1.weight": state.pop("embeddings.patch_embedding.weight"),
           "class_embedding": state.pop("embeddings.class_embedding"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight")}
    state.pop("embeddings.position_ids", None)
    for suffix in ("weight", "bias"):
        out[f"ln_pre.{suffix}"] = state.pop(f"pre_layrnorm.{suffix}")  # sic: HF's name
        state.pop(f"post_layernorm.{suffix}", None)
    layer = 0
    while f"encoder.layers.{layer}.self_attn.q_proj.weight" in state:
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{suffix}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{suffix}") for p in "qkv"])
            for hf_name, name in _HF_BLOCK.items():
                out[f"{dst}{name}.{suffix}"] = state.pop(f"{src}{hf_name}.{suffix}")
        layer += 1
    if state:
        raise ValueError(f"clip_weights: unknown Hugging Face CLIP keys {sorted(state)[:8]}")
    return out


def resample_positional_embedding(pos: Tensor, grid: int) -> Tensor:
    """[1 + g * g, C] -> [1 + grid * grid, C]: the class row kept, the spatial grid resized bicubically."""
    old = math.isqrt(pos.shape[0] - 1)
    if old == grid:
        return pos
    spatial = pos[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1].float(), spatial.permute(0, 2, 3, 1).reshape(grid * grid, -1)]).to(pos.dtype)


def inflate_conv(weight: Tensor, time: int) -> Tensor:
    """2D kernel [C, 3, p, p] -> 3D [C, 3, time, p, p]: zeros except the middle time slice (the official
    ``inflate_weight(center=True)``), so a static video gives CLIP's features."""
    out = weight.new_zeros(weight.shape[:2] + (time,) + weight.shape[2:])
    out[:, :, time // 2] = weight
    return out


def load_clip_weights(model: UniFormerV2, source) -> None:
    """Fills the CLIP part of ``model`` (conv1 inflated, position embedding resampled to the model's grid); the
    UniFormerV2 parts (local and global UniBlocks, head) keep their initialization."""
    state = read_clip_state(source)
    own = model.state_dict()
    if "conv1.weight" not in state:
        raise ValueError(f"clip_weights: no CLIP vision weights found in {source!r} (no conv1 / "
                         f"visual.conv1 / vision_model.embeddings.patch_embedding key)")
    conv = state["conv1.weight"]
    if conv.dim() == 4:
        conv = inflate_conv(conv, own["conv1.weight"].shape[2])
    state["conv1.weight"] = conv
    state["positional_embedding"] = resample_positional_embedding(state["positional_embedding"],
                                                                  model.img_size // model.patch_size)
    clip_part = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
    wanted = {k for k in own if k.startswith(clip_part) or (k.startswith("transformer.resblocks.")
                                                          and ".lmhra" not in k)}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise ValueError(f"clip_weights: the CLIP weights do not fit {type(model).__name__}: missing keys "
                         f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


# ----------------------------------------------------------------------------------------------------------------
# Registered models

_SIZES = {  # img_size, patch, width, layers, heads; global layers for the Kinetics / SSv2 configurations
    "base_patch16_224": (224, 16, 768, 12, 12, range(8, 12), range(4, 12)),
    "large_patch14_224": (224, 14, 1024, 24, 16, range(20, 24), range(8, 24)),
    "large_patch14_336": (336, 14, 1024, 24, 16, range(20, 24), range(8, 24)),
}


def _create(size: str, ssv2: bool, clip_weights=None, **kwargs) -> UniFormerV2:
    img_size, patch, width, layers, heads, kinetics_layers, ssv2_layers = _SIZES[size]
    if ssv2:  # local UniBlocks everywhere, temporal downsampling in the stem, more global layers
        config = dict(num_classes=174, num_frames=16, temporal_downsample=True, no_lmhra=False,
                      return_list=list(ssv2_layers), recipe="ssv2")
    else:  # global UniBlocks only, on the last 4 layers
        config = dict(num_classes=400, num_frames=8, temporal_downsample=False, no_lmhra=True,
                      return_list=list(kinetics_layers), recipe="kinetics")
    config = dict(img_size=img_size, patch_size=patch, width=width, layers=layers, heads=heads, **config)
    model = UniFormerV2(**{**config, **kwargs})
    if clip_weights is not None:
        load_clip_weights(model, clip_weights)
    return model


@register_model
def uniformerv2_base_patch16_224(**kwargs):
    return _create("base_patch16_224", False, **kwargs)


@register_model
def uniformerv2_base_patch16_224_ssv2(**kwargs):
    return _create("base_patch16_224", True, **kwargs)


@register_model
def uniformerv2_large_patch14_224(**kwargs):
    return _create("large_patch14_224", False, **kwargs)


@register_model
def uniformerv2_large_patch14_224_ssv2(**kwargs):
    return _create("large_patch14_224", True, **kwargs)


@register_model
def uniformerv2_large_patch14_336(**kwargs):
    return _create("large_patch14_336", False, **kwargs)


@register_model
def uniformerv2_large_patch14_336_ssv2(**kwargs):
    return _create("large_patch14_336", True, **kwargs)
