"""FluxViT-S/B ("Make Your Training Flexible: Towards Deployment-Efficient Video Models", ICCV 2025).

A ViT over 14x14 patches (tubelet 1) that keeps a token budget of the clip's patches, chosen per temporal group by
``group_topk`` on the patch embeddings, and adds:

- DPN: RMS normalization of each raw patch before the patch projection and of the embedding after it;
- GLPE: a learnable 3D sin-cos position embedding at a native grid, scaled and shifted per channel (``gpe_proj``)
  and resampled to the clip's frames (linear) and resolution (bicubic); plus, in every attention layer, a
  per-channel scale and bias of V added to the attention output (``attn.lpe``);
- three attention-pooling projectors and classification heads, trained at 3072, 2048 and 1024 tokens.

Parameter names and shapes follow the official checkpoints (OpenGVLab/FluxViT ``models/fluxvit.py``), so they load
with ``load_state_dict(strict=True)``. The official ``DepthwiseConv3D`` has a 1x1x1 kernel; it is kept as a Conv3d
parameter holder (for the names) and applied as the per-channel affine it is.

Clips of one batch with different frame counts, resolutions or budgets run packed (no padding) through
``pyvidfast.ops.varlen_attention``; equal clips run batched through torch SDPA.
"""

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyvidfast.models.registry import register_model
from pyvidfast.ops import group_topk, varlen_attention

# Token budget each head was trained at (official training engine: head 0 <-> 3072, 1 <-> 2048, 2 <-> 1024).
HEAD_BUDGETS = (3072, 2048, 1024)


def flux_num_groups(frames: int) -> int:
    """Temporal groups FluxViT scores in: 4 when T is a multiple of 4, 1 for T <= 2, else 2.

    The official rule gives T=4 four one-frame groups (its selector then fails) and rejects odd T; here T=4 uses 2
    groups of 2 frames and odd T one group."""
    if frames % 4 == 0 and frames >= 8:
        return 4
    if frames % 2 == 0 and frames >= 4:
        return 2
    return 1


def head_for_budget(budget: int | None) -> int:
    """The head trained at the budget nearest to ``budget`` (in ratio); all tokens of a clip count as 3072+."""
    if budget is None:
        return 0
    return min(range(len(HEAD_BUDGETS)), key=lambda h: abs(math.log(max(budget, 1) / HEAD_BUDGETS[h])))


def sincos_3d(dim: int, frames: int, size: int) -> np.ndarray:
    """The official 3D sin-cos table [frames * size * size, dim]: dim/4 temporal channels, then 3dim/4 spatial
    (half encodes the column, half the row, column first as the official meshgrid does)."""

    def sincos_1d(d: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    spatial_dim, temporal_dim = dim // 4 * 3, dim // 4
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    spatial = np.concatenate([sincos_1d(spatial_dim // 2, cols), sincos_1d(spatial_dim // 2, rows)], axis=1)
    temporal = sincos_1d(temporal_dim, np.arange(frames))
    table = np.concatenate(
        [np.repeat(temporal[:, None], size * size, axis=1), np.repeat(spatial[None], frames, axis=0)], axis=-1
    )
    return table.reshape(-1, dim)


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """RMS normalization computed in float32 (or float64), cast back, then scaled (the official order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = _at_least_float32(x)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class ChannelAffine(nn.Module):
    """The official ``DepthwiseConv3D`` (kernel 1x1x1, groups = channels): a per-channel scale and bias, identity
    at init. ``forward`` takes channels last."""

    def __init__(self, dim: int):
        super().__init__()
        self.depthwise_conv = nn.Conv3d(dim, dim, kernel_size=1, groups=dim)
        nn.init.ones_(self.depthwise_conv.weight)
        nn.init.zeros_(self.depthwise_conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.depthwise_conv.weight.view(-1) + self.depthwise_conv.bias


class LayerScale(nn.Module):
    """Per-channel residual scale, applied in float32 (the official ``force_fp32``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (_at_least_float32(x) * _at_least_float32(self.gamma)).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth per clip; ``clip_of_token`` maps packed tokens [N, C] to their clip."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, clip_of_token: Tensor | None = None, num_clips: int = 0) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        if clip_of_token is None:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        else:
            mask = x.new_empty(num_clips).bernoulli_(keep)[clip_of_token].unsqueeze(-1)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """DPN patch embedding: RMSNorm over each raw patch (order t, y, x, rgb), Conv3d projection, RMSNorm."""

    def __init__(self, embed_dim: int, patch_size: int = 14, tubelet_size: int = 1):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(3, embed_dim, kernel_size=kernel, stride=kernel)
        self.norm_before = RMSNorm(tubelet_size * patch_size * patch_size * 3)
        self.norm = RMSNorm(embed_dim)

    def forward(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] -> [B, T', L, C]. The projection runs as a matmul on the normalized patch vectors."""
        b, _, t, h, w = video.shape
        p, tub = self.patch_size, self.tubelet_size
        torch._check(t % tub == 0 and h % p == 0 and w % p == 0,
                     lambda: f"video: T must be a multiple of {tub} and H, W of {p}; got {tuple(video.shape)}")
        patches = video.reshape(b, 3, t // tub, tub, h // p, p, w // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        patches = self.norm_before(patches.reshape(b, (t // tub) * (h // p) * (w // p), -1))
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).reshape(self.proj.out_channels, -1)
        x = F.linear(patches, weight, self.proj.bias)
        return self.norm(x.reshape(b, t // tub, (h // p) * (w // p), -1))


class Attention(nn.Module):
    """Self-attention with q/k RMSNorm over all channels and the LPE shortcut ``proj(attn(q, k, v) + lpe(v))``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lpe = ChannelAffine(dim)
        self.q_norm = RMSNorm(dim)
        self.k_norm = RMSNorm(dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # channels of each: head-major, as the official reshape
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        heads = [t.view(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, n, c)
        return self.proj(out + self.lpe(v))

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        n, c = x.shape
        q, k, v = self._qkv(x)
        q, k, v_heads = (t.view(n, self.num_heads, -1) for t in (q, k, v))
        out = varlen_attention(q, k, v_heads, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return self.proj(out.reshape(n, c) + self.lpe(v))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float, drop_path: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = RMSNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def forward_packed(self, x: Tensor, packing: "Packing") -> Tensor:
        attn = self.attn.forward_packed(self.norm1(x), packing.cu_seqlens, packing.max_seqlen)
        x = x + self.drop_path(self.ls1(attn), packing.clip_of_token, packing.num_clips)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))), packing.clip_of_token, packing.num_clips)


class CrossAttention(nn.Module):
    """Cross-attention of the pooling query: bias-free q/k/v projections with separate biases, 16 heads."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x_q: Tensor, x_k: Tensor, x_v: Tensor) -> Tensor:
        b, c = x_q.shape[0], x_q.shape[-1]
        q = F.linear(x_q, self.q.weight, self.q_bias).view(b, -1, self.num_heads, c // self.num_heads)
        k = F.linear(x_k, self.k.weight, self.k_bias).view(b, -1, self.num_heads, c // self.num_heads)
        v = F.linear(x_v, self.v.weight, self.v_bias).view(b, -1, self.num_heads, c // self.num_heads)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, -1, c))


class AttentionPoolingBlock(nn.Module):
    """Pools a clip's tokens (cls included) to one vector: the mean token queries the LayerNormed tokens."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, out_dim]."""
        query = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_attn(query, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


class LinearDecoder(nn.Module):
    """Linear + LayerNorm + L2 normalization: aligns a low-budget pooled feature with the 3072-token one."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.norm(self.head(x)), dim=-1)


class Packing:
    """Bounds of the clips in a packed [N, C] token sequence."""

    def __init__(self, lengths: Sequence[int], device: torch.device):
        counts = torch.tensor(list(lengths), dtype=torch.int32, device=device)
        self.num_clips = len(lengths)
        self.cu_seqlens = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
        self.max_seqlen = max(lengths) if lengths else 0
        self.clip_of_token = torch.repeat_interleave(torch.arange(self.num_clips, device=device), counts.long())
        self.bounds = [(int(s), int(e)) for s, e in zip(self.cu_seqlens[:-1].tolist(), self.cu_seqlens[1:].tolist())]


class FluxViT(nn.Module):
    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 patch_size: int = 14, tubelet_size: int = 1, img_size: int = 252, num_frames: int = 24,
                 attn_pool_num_heads: int = 16, clip_embed_dim: int = 768, num_classes: int = 400,
                 init_values: float = 1e-5, drop_path_rate: float = 0.0, fc_drop_rate: float = 0.0):
        """``img_size``/``num_frames`` set the native grid of ``pos_embed`` (official: S 252/24, B 280/32); any
        frame count and resolution (multiples of ``patch_size``) run, with the position embedding resampled."""
        super().__init__()
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.img_size, self.num_frames = img_size, num_frames  # the native clip shape (and eval's default)
        self.pos_grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(embed_dim, patch_size, tubelet_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), embed_dim))
        self.gpe_proj = ChannelAffine(embed_dim)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, init_values, r) for r in rates)
        self.clip_projector = nn.ModuleList(
            AttentionPoolingBlock(embed_dim, attn_pool_num_heads, clip_embed_dim) for _ in HEAD_BUDGETS
        )
        self.head = nn.ModuleList(nn.Linear(clip_embed_dim, num_classes) for _ in HEAD_BUDGETS)
        self.fc_norm = nn.LayerNorm(clip_embed_dim)
        self.fc_dropout = nn.Dropout(fc_drop_rate)
        self.final_clip_decoder_for_projs = nn.ModuleList(LinearDecoder(clip_embed_dim) for _ in HEAD_BUDGETS[1:])
        self._init_weights()

    def _init_weights(self) -> None:
        t0, h0, w0 = self.pos_grid
        table = torch.from_numpy(sincos_3d(self.embed_dim, t0, h0)).float() if h0 == w0 else None
        with torch.no_grad():
            if table is not None:
                self.pos_embed[0, 1:].copy_(table)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            decoders = set(self.final_clip_decoder_for_projs.modules())
            for m in self.modules():
                if isinstance(m, nn.Linear) and m not in decoders:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            for i, block in enumerate(self.blocks):  # the official depth rescale of the residual projections
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    # --- tokens -------------------------------------------------------------------------------------------------

    def position_embedding(self, frames: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(cls position [1, C], patch positions [frames * height * width, C]) on a token grid: the native table
        through ``gpe_proj``, then linear over time and bicubic over space (align_corners=False), as official."""
        t0, h0, w0 = self.pos_grid
        c = self.embed_dim
        pos = self.gpe_proj(self.pos_embed[0, 1:]).view(t0, h0 * w0, c)
        if frames != t0:
            pos = F.interpolate(pos.permute(1, 2, 0), size=frames, mode="linear", align_corners=False)
            pos = pos.permute(2, 0, 1)
        if (height, width) != (h0, w0):
            grid = pos.reshape(frames, h0, w0, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
            pos = grid.permute(0, 2, 3, 1)
        return self.pos_embed[0, :1], pos.reshape(-1, c)

    def embed(self, video: Tensor, budget: int | None = None,
              indices: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Video [B, 3, T, H, W] -> tokens [B, 1 + K, C] (cls first, then the kept patches in raster order) and
        the kept indices [B, K] into the T' * L patches (None when all are kept: budget None or >= T' * L).
        ``indices`` (ascending) overrides the selection, e.g. with the double mask of Flux distillation."""
        x = self.patch_embed(video.to(self.pos_embed.dtype))
        b, t, l, c = x.shape
        cls_pos, pos = self.position_embedding(t, video.shape[3] // self.patch_size, video.shape[4] // self.patch_size)
        tokens = x.reshape(b, t * l, c) + pos
        if indices is None and budget is not None and budget < t * l:
            indices = group_topk(x, flux_num_groups(t), budget)
        if indices is not None:
            tokens = tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, c))
        cls = (self.cls_token[0] + cls_pos).expand(b, 1, c)
        return torch.cat([cls, tokens], dim=1), indices

    # --- dense path: clips of one shape and budget ----------------------------------------------------------------

    def forward_tokens(self, video: Tensor, budget: int | None = None, return_layers: Sequence[int] = (),
                       indices: Tensor | None = None) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """Final tokens [B, 1 + K, C], kept indices, and the outputs of the blocks listed in ``return_layers``."""
        x, indices = self.embed(video, budget, indices)
        hidden = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in return_layers:
                hidden.append(x)
        return x, indices, hidden

    def pool(self, tokens: Tensor, head: int) -> Tensor:
        """Attention-pooled clip feature [B, clip_embed_dim] of projector ``head``."""
        return self.clip_projector[head](tokens)

    def classify(self, pooled: Tensor, head: int) -> Tensor:
        return self.head[head](self.fc_norm(self.fc_dropout(pooled)))

    def forward(self, video: Tensor, budget: int | None = None, head: int | None = None) -> Tensor:
        """Logits [B, classes] for clips of one shape. ``budget``: tokens kept per clip (None: all);
        ``head``: which head (default: the one trained at the nearest budget)."""
        head = head_for_budget(budget) if head is None else head
        tokens, _, _ = self.forward_tokens(video, budget)
        return self.classify(self.pool(tokens, head), head)

    # --- packed path: clips of different shapes or budgets ------------------------------------------------------

    def forward_packed(self, videos: Sequence[Tensor], budgets: Sequence[int | None],
                       heads: Sequence[int] | None = None) -> Tensor:
        """Logits [B, classes] for clips [3, T_i, H_i, W_i] with their own budgets, run as one packed sequence
        through ``varlen_attention``."""
        if len(videos) != len(budgets):
            raise ValueError(f"budgets: expected one per clip ({len(videos)}); got {len(budgets)}")
        heads = [head_for_budget(b) for b in budgets] if heads is None else list(heads)
        sequences = [self.embed(v.unsqueeze(0), b)[0][0] for v, b in zip(videos, budgets)]
        packing = Packing([s.shape[0] for s in sequences], sequences[0].device)
        x = torch.cat(sequences)
        for block in self.blocks:
            x = block.forward_packed(x, packing)
        logits = [self.classify(self.pool(x[None, s:e], h), h) for (s, e), h in zip(packing.bounds, heads)]
        return torch.cat(logits)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def load_checkpoint(self, source, strict: bool = True) -> "FluxViT":
        """Loads an official FluxViT checkpoint (path or state dict): takes its ``model``/``module`` entry, strips
        ``backbone.``/``encoder.`` prefixes (and drops the ``projectors.`` of a Flux distillation run, see
        :mod:`pyvidfast.train.flux`), resamples a ``pos_embed`` of another grid to this model's native grid
        (linear over time, bicubic over space, as the official fine-tuning script does), then loads strictly."""
        state = torch.load(source, map_location="cpu", weights_only=True) if not isinstance(source, dict) else source
        for key in ("model", "module"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        state = {k.removeprefix("backbone.").removeprefix("encoder."): v for k, v in state.items()
                 if not k.startswith("projectors.")}
        if "pos_embed" in state and state["pos_embed"].shape != self.pos_embed.shape:
            state["pos_embed"] = self._resample_pos_embed(state["pos_embed"])
        self.load_state_dict(state, strict=strict)
        return self

    def _resample_pos_embed(self, pos_embed: Tensor) -> Tensor:
        n, c = pos_embed.shape[1] - 1, pos_embed.shape[2]
        t0, h0, w0 = self.pos_grid
        candidates = [t for t in (t0, 8, 16, 32, 24, 12, 4) if n % t == 0 and math.isqrt(n // t) ** 2 == n // t]
        if not candidates:
            raise ValueError(f"pos_embed: cannot read a (T, H, H) grid from {n} positions")
        t, s = candidates[0], math.isqrt(n // candidates[0])
        pos = pos_embed[0, 1:].float().view(t, s * s, c)
        if t != t0:
            pos = F.interpolate(pos.permute(1, 2, 0), size=t0, mode="linear", align_corners=False).permute(2, 0, 1)
        if (s, s) != (h0, w0):
            grid = F.interpolate(pos.reshape(t0, s, s, c).permute(0, 3, 1, 2), size=(h0, w0), mode="bicubic",
                                 align_corners=False)
            pos = grid.permute(0, 2, 3, 1)
        return torch.cat([pos_embed[:, :1], pos.reshape(1, -1, c).to(pos_embed.dtype)], dim=1)


@register_model
def fluxvit_small_patch14(**kwargs) -> FluxViT:
    """FluxViT-S/14: 384 wide, 12 blocks of 6 heads; native position grid 24 x 18 x 18 (252 px)."""
    return FluxViT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, "img_size": 252, "num_frames": 24, **kwargs})


@register_model
def fluxvit_base_patch14(**kwargs) -> FluxViT:
    """FluxViT-B/14: 768 wide, 12 blocks of 12 heads; native position grid 32 x 20 x 20 (280 px)."""
    return FluxViT(**{"embed_dim": 768, "depth": 12, "num_heads": 12, "img_size": 280, "num_frames": 32, **kwargs})
