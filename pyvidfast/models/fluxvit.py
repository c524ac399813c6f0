"""FluxViT-S/B ("Make Your Training Flexible: Towards Deployment-Efficient Video Models", ICCV 2025).

A ViT over 14x14 patches (tubelet 1) that keeps a token budget of the clip's patches, chosen per temporal group by
``group_topk`` on the patch embeddings, and adds:

- DPN: RMS normalization of each raw patch before the patch projection and of the embedding after it;
- GLPE: a learnable 3D sin-cos position embedding at a native grid, scaled and shifted per channel (``gpe_proj``)
  and resampled to the clip's frames (linear) and resolution (bicubic); plus, in every attention layer, a
  per-channel scale and bias of V added to the attention output (``attn.lpe``);
- three attention-pooling projectors and classification heads, trained at 3072, 2048 and 1024 tokens.

Built on :mod:`pyvidfast.models.layers`. Parameter names and shapes follow the official checkpoints
(OpenGVLab/FluxViT ``models/fluxvit.py``), so they load with ``load_state_dict(strict=True)``
(:func:`pyvidfast.models.load_checkpoint` applies :func:`checkpoint_filter_fn` first). The official
``DepthwiseConv3D`` has a 1x1x1 kernel; it is kept as a Conv3d parameter holder (for the names) and applied as the
per-channel affine it is.

Clips of different frame counts, resolutions or budgets run packed (no padding) through
``pyvidfast.ops.varlen_attention`` (:meth:`FluxViT.forward_packed`); clips of one shape run batched through torch
SDPA (:meth:`FluxViT.forward`).
"""

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyvidfast.models.layers import (Attention, Block, DataConfig, Packing, PatchEmbed, RMSNorm, attention,
                                     drop_path_rates)
from pyvidfast.models.registry import register_model
from pyvidfast.ops import group_topk

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


class DPNPatchEmbed(PatchEmbed):
    """DPN patch embedding: RMSNorm over each raw patch (order t, y, x, rgb), the Conv3d projection as a matmul
    on the normalized patch vectors, RMSNorm."""

    def __init__(self, embed_dim: int, patch_size: int = 14, tubelet_size: int = 1):
        super().__init__(embed_dim, patch_size, tubelet_size)
        self.norm_before = RMSNorm(tubelet_size * patch_size * patch_size * 3)
        self.norm = RMSNorm(embed_dim)

    def forward(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] -> [B, T', L, C]."""
        b, _, t, h, w = video.shape
        patches = self.norm_before(self.patchify(video, channels_last=True))
        x = self.embed_patches(patches, channels_last=True)
        return self.norm(x.reshape(b, t // self.tubelet_size, (h // self.patch_size) * (w // self.patch_size), -1))


class LPEAttention(Attention):
    """Self-attention with q/k RMSNorm over all channels and the LPE shortcut ``proj(attn(q, k, v) + lpe(v))``."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qk_norm=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.lpe = ChannelAffine(dim)

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        q, k, v = self.project_qkv(x)
        out = attention(q, k, v, packing, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.flatten(-2) + self.lpe(v.flatten(-2))))


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
        heads = (self.num_heads, x_q.shape[-1] // self.num_heads)
        q = F.linear(x_q, self.q.weight, self.q_bias).unflatten(-1, heads)
        k = F.linear(x_k, self.k.weight, self.k_bias).unflatten(-1, heads)
        v = F.linear(x_v, self.v.weight, self.v_bias).unflatten(-1, heads)
        return self.proj(attention(q, k, v).flatten(-2))


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
        self.data_config = DataConfig(num_frames=num_frames, img_size=img_size, tubelet_size=tubelet_size,
                                      patch_size=patch_size)
        self.patch_embed = DPNPatchEmbed(embed_dim, patch_size, tubelet_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), embed_dim))
        self.gpe_proj = ChannelAffine(embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_path=rate, init_values=init_values, ls_force_fp32=True,
                  norm_layer=RMSNorm, attn_layer=LPEAttention)
            for rate in drop_path_rates(drop_path_rate, depth)
        )
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

    def forward_packed(self, clips: Sequence[Tensor], budgets: Sequence[int | None] | None = None,
                       heads: Sequence[int] | None = None) -> Tensor:
        """Logits [len(clips), classes] of normalized clips [3, T_i, H_i, W_i] of any shapes, each with its own
        token budget (``budgets``: one per clip, None keeps all tokens) and head (default: the one trained at the
        nearest budget), run as one packed sequence through ``varlen_attention``."""
        budgets = [None] * len(clips) if budgets is None else list(budgets)
        if len(clips) != len(budgets):
            raise ValueError(f"budgets: expected one per clip ({len(clips)}); got {len(budgets)}")
        heads = [head_for_budget(b) for b in budgets] if heads is None else list(heads)
        sequences = [self.embed(v.unsqueeze(0), b)[0][0] for v, b in zip(clips, budgets)]
        packing = Packing.from_lengths([s.shape[0] for s in sequences], sequences[0].device)
        x = torch.cat(sequences)
        for block in self.blocks:
            x = block(x, packing)
        logits = [self.classify(self.pool(tokens[None], h), h) for tokens, h in zip(packing.split(x), heads)]
        return torch.cat(logits)


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """A ``pos_embed`` [1, 1 + T*S*S, C] of another (T, S, S) grid -> the native ``grid`` (linear over time,
    bicubic over space, as the official fine-tuning script does)."""
    n, c = pos_embed.shape[1] - 1, pos_embed.shape[2]
    t0, h0, w0 = grid
    candidates = [t for t in (t0, 8, 16, 32, 24, 12, 4) if n % t == 0 and math.isqrt(n // t) ** 2 == n // t]
    if not candidates:
        raise ValueError(f"pos_embed: cannot read a (T, H, H) grid from {n} positions")
    t, s = candidates[0], math.isqrt(n // candidates[0])
    pos = pos_embed[0, 1:].float().view(t, s * s, c)
    if t != t0:
        pos = F.interpolate(pos.permute(1, 2, 0), size=t0, mode="linear", align_corners=False).permute(2, 0, 1)
    if (s, s) != (h0, w0):
        grid_pos = F.interpolate(pos.reshape(t0, s, s, c).permute(0, 3, 1, 2), size=(h0, w0), mode="bicubic",
                                 align_corners=False)
        pos = grid_pos.permute(0, 2, 3, 1)
    return torch.cat([pos_embed[:, :1], pos.reshape(1, -1, c).to(pos_embed.dtype)], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: "FluxViT") -> dict[str, Tensor]:
    """An official FluxViT checkpoint -> ``model``'s names (pure): strips ``backbone.``/``encoder.`` prefixes,
    drops the ``projectors.`` of a Flux distillation run (see :mod:`pyvidfast.train.flux`) and resamples a
    ``pos_embed`` of another grid to the model's native grid."""
    state = {k.removeprefix("backbone.").removeprefix("encoder."): v for k, v in state_dict.items()
             if not k.startswith("projectors.")}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.pos_grid)
    return state


@register_model
def fluxvit_small_patch14(**kwargs) -> FluxViT:
    """FluxViT-S/14: 384 wide, 12 blocks of 6 heads; native position grid 24 x 18 x 18 (252 px)."""
    return FluxViT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, "img_size": 252, "num_frames": 24, **kwargs})


@register_model
def fluxvit_base_patch14(**kwargs) -> FluxViT:
    """FluxViT-B/14: 768 wide, 12 blocks of 12 heads; native position grid 32 x 20 x 20 (280 px)."""
    return FluxViT(**{"embed_dim": 768, "depth": 12, "num_heads": 12, "img_size": 280, "num_frames": 32, **kwargs})
