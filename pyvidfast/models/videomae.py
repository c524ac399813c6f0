"""VideoMAE V2 (Wang et al., CVPR 2023): ViT-S/B/L/H/g video transformers, dual-masking pretraining model, and
RLT-packed inference.

Parameter names and shapes follow the official code (OpenGVLab/VideoMAEv2 ``models/modeling_{finetune,pretrain}.py``)
so its checkpoints load with ``load_state_dict(strict=True)``; :meth:`VisionTransformer.load_checkpoint` also reads
Hugging Face ``transformers`` VideoMAE checkpoints. The sinusoid position table is a non-persistent buffer (the
official code keeps it out of the state dict too).

Two input paths share the same blocks:

* dense: normalized float video ``[B, 3, T, H, W]`` -> Conv3d patch embedding -> attention by PyTorch SDPA;
* packed (RLT): :class:`pyvidfast.ops.PackedTokens` from :func:`pyvidfast.ops.rlt_tokenize` -> the same Conv3d
  weight used as a Linear on the flattened patches -> position table gathered at the kept positions -> attention by
  ``pyvidfast.ops.varlen_attention`` over ``cu_seqlens`` -> per-clip mean pooling.
"""

import json
import math
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyvidfast import ops
from pyvidfast.models.registry import register_model
from pyvidfast.ops.rlt import IMAGENET_MEAN, IMAGENET_STD, PackedTokens, rlt_tokenize

LN_EPS = 1e-6  # every LayerNorm of the official models


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sinusoid table [num_positions, dim] (sin on even, cos on odd channels), computed in float64 like
    the official code, returned as float32."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def normalize_video(video: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32) -> Tensor:
    """uint8 ``[B, T, H, W, 3]`` (decoder layout) -> normalized ``[B, 3, T, H, W]`` (model layout)."""
    if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"video: expected uint8 [B, T, H, W, 3]; got {video.dtype} {tuple(video.shape)}")
    mean_t = torch.tensor(mean, dtype=dtype, device=video.device).view(1, 3, 1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=video.device).view(1, 3, 1, 1, 1)
    x = video.permute(0, 4, 1, 2, 3).to(dtype).div_(255.0)
    return (x - mean_t) / std_t


class Packing(NamedTuple):
    """Bounds of the clips in a packed token sequence, as varlen attention wants them."""

    cu_seqlens: Tensor  # int32 [B + 1]
    max_seqlen: int


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (tubelet, patch, patch); tokens in (t, h, w) raster order."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_size: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} / num_frames {num_frames} must be multiples of the patch "
                             f"{patch_size} / tubelet {tubelet_size}")
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid)
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(3, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: Tensor) -> Tensor:
        """Flattened patches [N, 3 * tubelet * patch * patch] (order [c][dt][ph][pw]) -> tokens [N, D]; the same
        weights as ``forward``."""
        weight = self.proj.weight.flatten(1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with BEiT-style biases: learnable q and v biases, none on k."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} must divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        if packing is None:  # x [B, N, C] -> SDPA on [B, H, N, D]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            dropout = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).transpose(1, 2).flatten(2)
        else:  # x [N, C] packed clip after clip -> varlen attention on [N, H, D]
            if self.training and self.attn_drop > 0:
                raise NotImplementedError("attention dropout is not supported on packed tokens")
            q, k, v = qkv.unbind(1)  # strided views; the op needs stride 1 only on the head dim
            cu, longest = packing
            out = ops.varlen_attention(q, k, v, cu, cu, longest, longest).flatten(1)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the official blocks
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per clip (on packed input: all tokens of a clip)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if packing is None:
            keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        else:
            counts = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).long()
            per_clip = x.new_empty(counts.numel()).bernoulli_(1.0 - self.p)
            keep = torch.repeat_interleave(per_clip, counts, output_size=x.shape[0]).unsqueeze(1)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block; ``packing`` selects the packed (varlen) attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)  # int() of the product, as the official code

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), packing), packing)
        return x + self.drop_path(self.mlp(self.norm2(x)), packing)


def make_blocks(dim, depth, num_heads, mlp_ratio, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path_rate=0.0):
    rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linear, 0 first
    return nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, r) for r in rates)


def segment_mean(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Mean of each clip's tokens: packed [N, D] -> [B, D]."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    clip = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts, output_size=x.shape[0])
    sums = x.new_zeros((counts.numel(), x.shape[1])).index_add_(0, clip, x)
    return sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# Models


class VisionTransformer(nn.Module):
    """VideoMAE V2 classification model (official ``modeling_finetune.VisionTransformer`` with mean pooling).

    ``forward`` takes a normalized float video ``[B, 3, T, H, W]`` (dense) or :class:`PackedTokens` (RLT, see
    :meth:`forward_packed`) and returns logits ``[B, num_classes]``.
    """

    def __init__(self, img_size=224, patch_size=16, num_classes=400, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 head_drop_rate=0.0, init_scale=0.001, num_frames=16, tubelet_size=2, use_length_embed=False,
                 rlt_threshold=0.1):
        super().__init__()
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.patch_size, self.tubelet_size, self.rlt_threshold = patch_size, tubelet_size, rlt_threshold
        self.patch_embed = PatchEmbed(img_size, patch_size, num_frames, tubelet_size, embed_dim)
        self.img_size, self.num_frames, self.grid = img_size, num_frames, self.patch_embed.grid
        self.register_buffer("pos_embed", sinusoid_table(self.patch_embed.num_patches, embed_dim)[None],
                             persistent=False)
        # RLT's run-length embedding (one row per length 1..T'); off by default, as in every shipped RLT config.
        self.length_embed = nn.Parameter(torch.zeros(self.patch_embed.grid[0], embed_dim)) if use_length_embed else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                  drop_path_rate)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head_dropout = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_trunc_normal_init)
        if self.length_embed is not None:
            nn.init.trunc_normal_(self.length_embed, std=0.02)
        if num_classes > 0:
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    def forward(self, x: Tensor | PackedTokens) -> Tensor:
        feats = self.forward_packed_features(x) if isinstance(x, PackedTokens) else self.forward_features(x)
        return self.head(self.head_dropout(feats))

    def forward_features(self, x: Tensor) -> Tensor:
        """Dense path: normalized [B, 3, T, H, W] -> pooled, normalized features [B, D]."""
        x = self.patch_embed(x)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"x: the model was built for {self.pos_embed.shape[1]} tokens (grid "
                             f"{self.patch_embed.grid}); the input gives {x.shape[1]}")
        x = self.pos_drop(x + self.pos_embed.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x.mean(1))

    def forward_packed(self, tokens: PackedTokens) -> Tensor:
        """Packed path: RLT tokens (any number per clip) -> logits [B, num_classes]."""
        return self(tokens)

    def forward_packed_features(self, tokens: PackedTokens) -> Tensor:
        x = self.patch_embed.embed_patches(tokens.patches)
        _, grid_h, grid_w = self.patch_embed.grid
        pos = tokens.positions.long()
        index = (pos[:, 0] * grid_h + pos[:, 1]) * grid_w + pos[:, 2]
        x = x + self.pos_embed[0].index_select(0, index).to(x.dtype)
        if self.length_embed is not None:
            x = x + self.length_embed.index_select(0, tokens.lengths.long() - 1).to(x.dtype)
        x = self.pos_drop(x)
        packing = Packing(tokens.cu_seqlens, tokens.max_seqlen())
        for block in self.blocks:
            x = block(x, packing)
        return self.fc_norm(segment_mean(x, tokens.cu_seqlens))

    def tokenize(self, video: Tensor, threshold: float | None = None) -> PackedTokens:
        """RLT tokens of a uint8 ``[B, T, H, W, 3]`` video with this model's tubelet and patch size."""
        threshold = self.rlt_threshold if threshold is None else threshold
        return rlt_tokenize(video, self.tubelet_size, self.patch_size, threshold, out_dtype=self.pos_embed.dtype)

    def load_checkpoint(self, source, hf_eps: bool = True) -> "VisionTransformer":
        """Loads an official fine-tuned checkpoint (strict), an official pretraining checkpoint (its encoder; the
        new ``fc_norm``/``head`` keep their initialization), or a Hugging Face ``VideoMAEForVideoClassification`` /
        ``VideoMAEForPreTraining`` checkpoint. ``source``: a ``.pth``/``.bin``/``.safetensors`` file, a Hugging Face
        folder, or a state dict. A head whose class count differs from the model's is dropped with a warning.

        ``hf_eps``: for a Hugging Face checkpoint, use its LayerNorm epsilons (``layer_norm_eps`` from the folder's
        config.json, else its default 1e-12; 1e-5 for ``fc_norm``) so logits match ``transformers``.
        """
        state, hf_config = read_checkpoint(source)
        from_pretraining = any(k.startswith(("encoder.", "decoder.")) for k in state)
        if from_pretraining:
            decoder_only = ("decoder.", "encoder_to_decoder.", "mask_token")
            state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(decoder_only)}
            state.pop("norm.weight", None)  # the pretraining encoder's final norm; mean pooling uses fc_norm
            state.pop("norm.bias", None)
        own_keys = self.state_dict()
        # A pretraining encoder brings neither fc_norm nor head: both keep their initialization.
        allowed_missing = {k for k in own_keys if k.startswith(("fc_norm.", "head."))} if from_pretraining else set()
        if "head.weight" in state and state["head.weight"].shape != own_keys.get("head.weight", torch.empty(0)).shape:
            warnings.warn(f"checkpoint head {tuple(state['head.weight'].shape)} does not fit the model's "
                          f"{self.num_classes} classes; keeping the model's head")
            state.pop("head.weight")
            state.pop("head.bias", None)
            allowed_missing |= {"head.weight", "head.bias"}
        if self.length_embed is not None:
            allowed_missing.add("length_embed")
        _load_exact(self, state, allowed_missing)
        if hf_config is not None and hf_eps:
            eps = hf_config.get("layer_norm_eps", 1e-12)
            for block in self.blocks:
                block.norm1.eps = block.norm2.eps = eps
            self.fc_norm.eps = 1e-5
        return self


class PretrainVisionTransformerEncoder(nn.Module):
    """Encoder of the pretraining model: runs on the tokens the tube mask leaves visible."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate,
                 num_frames, tubelet_size):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, num_frames, tubelet_size, embed_dim)
        self.register_buffer("pos_embed", sinusoid_table(self.patch_embed.num_patches, embed_dim)[None],
                             persistent=False)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        batch, _, dim = x.shape
        x = x[~mask].reshape(batch, -1, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class PretrainVisionTransformerDecoder(nn.Module):
    def __init__(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, out_dim):
        super().__init__()
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate=drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x: Tensor, return_token_num: int) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, x.shape[1] - return_token_num:]))


class PretrainVisionTransformer(nn.Module):
    """VideoMAE V2 dual-masking pretraining model (official ``modeling_pretrain.PretrainVisionTransformer``).

    ``forward(video, mask, decode_mask)``: ``mask`` bool [B, N] (True = hidden from the encoder, e.g. a tube mask),
    ``decode_mask`` bool [B, N] (True = dropped by the decoder, e.g. running-cell mask; ``None`` = V1 behaviour,
    the decoder predicts exactly the encoder-masked tokens). Returns pixel predictions [B, N_dec, tubelet*p*p*3]
    for the decoder-kept tokens in raster order; :func:`pretrain_loss` turns them into the loss.
    """

    def __init__(self, img_size=224, patch_size=16, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                 decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6, mlp_ratio=4.0, qkv_bias=True,
                 drop_path_rate=0.0, num_frames=16, tubelet_size=2):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.img_size, self.num_frames = img_size, num_frames
        self.encoder = PretrainVisionTransformerEncoder(img_size, patch_size, encoder_embed_dim, encoder_depth,
                                                        encoder_num_heads, mlp_ratio, qkv_bias, drop_path_rate,
                                                        num_frames, tubelet_size)
        self.grid = self.encoder.patch_embed.grid
        self.decoder = PretrainVisionTransformerDecoder(decoder_embed_dim, decoder_depth, decoder_num_heads,
                                                        mlp_ratio, qkv_bias, drop_path_rate,
                                                        3 * tubelet_size * patch_size**2)
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(self.encoder.patch_embed.num_patches, decoder_embed_dim)[None],
                             persistent=False)
        self.apply(_xavier_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, x: Tensor, mask: Tensor, decode_mask: Tensor | None = None) -> Tensor:
        decoded = mask if decode_mask is None else ~decode_mask
        visible = self.encoder_to_decoder(self.encoder(x, mask))
        batch, _, dim = visible.shape
        pos = self.pos_embed.to(visible.dtype).expand(batch, -1, -1)
        pos_visible = pos[~mask].reshape(batch, -1, dim)
        pos_decoded = pos[decoded].reshape(batch, -1, dim)
        tokens = torch.cat([visible + pos_visible, self.mask_token.to(visible.dtype) + pos_decoded], dim=1)
        return self.decoder(tokens, pos_decoded.shape[1])

    def load_checkpoint(self, source, hf_eps: bool = True) -> "PretrainVisionTransformer":
        """Loads an official pretraining checkpoint or a Hugging Face ``VideoMAEForPreTraining`` one (strict).
        ``hf_eps`` as in :meth:`VisionTransformer.load_checkpoint` (HF's decoder ``norm`` uses 1e-5)."""
        state, hf_config = read_checkpoint(source)
        if hf_config is not None or not any(k.startswith("encoder.") for k in state):
            backbone = ("patch_embed.", "blocks.", "norm.")
            state = {("encoder." + k if k.startswith(backbone) else k): v for k, v in state.items()}
        _load_exact(self, state, set())
        if hf_config is not None and hf_eps:
            eps = hf_config.get("layer_norm_eps", 1e-12)
            for block in [*self.encoder.blocks, *self.decoder.blocks]:
                block.norm1.eps = block.norm2.eps = eps
            self.encoder.norm.eps = eps
            self.decoder.norm.eps = 1e-5
        return self


def pretrain_targets(video: Tensor, tubelet: int, patch: int, normalize: bool = True, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> Tensor:
    """Pixel targets [B, N, tubelet*p*p*3] of a normalized video [B, 3, T, H, W], laid out like the official
    ``(t p0 p1 p2) c`` rearrange. With ``normalize``, each patch and channel is standardised over its tubelet*p*p
    pixels in [0, 1] units (unbiased std + 1e-6)."""
    batch, _, frames, height, width = video.shape
    mean_t = torch.tensor(mean, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    std_t = torch.tensor(std, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    pixels = video * std_t + mean_t
    grid = pixels.reshape(batch, 3, frames // tubelet, tubelet, height // patch, patch, width // patch, patch)
    patches = grid.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, -1, tubelet * patch * patch, 3)
    if normalize:
        patches = (patches - patches.mean(dim=-2, keepdim=True)) / (patches.var(dim=-2, keepdim=True).sqrt() + 1e-6)
    return patches.flatten(2)


def pretrain_loss(model: nn.Module, video: Tensor, mask: Tensor, decode_mask: Tensor | None) -> Tensor:
    """VideoMAE V2 loss: per-token MSE of the normalized pixel targets, averaged over the tokens that are hidden
    from the encoder AND kept by the decoder (``model`` may be wrapped in DDP; its tubelet/patch are read from the
    unwrapped module)."""
    core = getattr(model, "module", model)
    pred = model(video, mask, decode_mask)
    with torch.no_grad():
        targets = pretrain_targets(video.float(), core.tubelet_size, core.patch_size)
    decoded = mask if decode_mask is None else ~decode_mask
    batch = video.shape[0]
    targets = targets[decoded].reshape(batch, -1, targets.shape[-1])
    per_token = (pred.float() - targets).pow(2).mean(dim=-1)
    weight = mask[decoded].reshape(batch, -1).to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def read_checkpoint(source) -> tuple[dict[str, Tensor], dict | None]:
    """State dict in official names from a file, a folder or a dict, and the Hugging Face config (a dict, ``{}``
    without config.json) when the checkpoint is in Hugging Face layout, else ``None``."""
    config = None
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if path.is_dir():
            config_path = path / "config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
            files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
            if not files:
                raise FileNotFoundError(f"source: {path} holds neither model.safetensors nor pytorch_model.bin")
            path = files[0]
        elif (path.parent / "config.json").exists() and path.suffix in (".safetensors", ".bin"):
            config = json.loads((path.parent / "config.json").read_text())
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "module", "state_dict", "model_state"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {_strip_prefixes(k): v for k, v in state.items()}
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in state):
        state = hf_to_official(state)
        config = {} if config is None else config
    return state, config


def _strip_prefixes(key: str) -> str:
    for prefix in ("_orig_mod.", "module.", "backbone."):
        key = key.removeprefix(prefix)
    return key


_HF_BLOCK_NAMES = {
    "attention.output.dense.": "attn.proj.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}


def hf_to_official(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face VideoMAE names -> official names. q/k/v weights are stacked into ``qkv.weight``; q/v biases
    (``query.bias``/``value.bias`` in transformers 5, ``q_bias``/``v_bias`` before) become ``q_bias``/``v_bias``;
    the encoder blocks come out as ``blocks.i`` (fine-tune layout), decoder blocks as ``decoder.blocks.j``."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        key = key.removeprefix("videomae.")
        if key == "embeddings.position_embeddings":
            continue  # the fixed sinusoid table, rebuilt by the model
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
            continue
        for hf_prefix, prefix in (("encoder.layer.", "blocks."), ("decoder.decoder_layers.", "decoder.blocks.")):
            if key.startswith(hf_prefix):
                index, rest = key[len(hf_prefix):].split(".", 1)
                block = f"{prefix}{index}."
                if rest.startswith("attention.attention."):
                    name = rest[len("attention.attention."):]
                    qkv.setdefault(block, {})[name] = value
                else:
                    for hf_name, name in _HF_BLOCK_NAMES.items():
                        if rest.startswith(hf_name):
                            out[block + name + rest[len(hf_name):]] = value
                            break
                    else:
                        raise KeyError(f"source: unknown Hugging Face VideoMAE key {key!r}")
                break
        else:
            renamed = {"layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
                       "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
            out[renamed.get(key, key)] = value
    for block, parts in qkv.items():
        out[block + "attn.qkv.weight"] = torch.cat([parts["query.weight"], parts["key.weight"], parts["value.weight"]])
        q_bias = parts.get("query.bias", parts.get("q_bias"))
        v_bias = parts.get("value.bias", parts.get("v_bias"))
        if q_bias is not None:
            out[block + "attn.q_bias"] = q_bias
            out[block + "attn.v_bias"] = v_bias
    return out


def _load_exact(model: nn.Module, state: dict[str, Tensor], allowed_missing: set[str]) -> None:
    """load_state_dict that fails on any unexpected key, any shape mismatch and any missing key not allowed."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise RuntimeError(f"source: checkpoint does not fit {type(model).__name__}: missing {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}")


# ----------------------------------------------------------------------------------------------------------------
# Registered sizes

# width, depth, heads, patch, mlp ratio, decoder (width, heads)
SIZES = {
    "small": (384, 12, 6, 16, 4.0, (192, 3)),
    "base": (768, 12, 12, 16, 4.0, (384, 6)),
    "large": (1024, 24, 16, 16, 4.0, (512, 8)),
    "huge": (1280, 32, 16, 16, 4.0, (512, 8)),
    "giant": (1408, 40, 16, 14, 48 / 11, (512, 8)),
}


def _finetune(size: str, **kwargs) -> VisionTransformer:
    """The published size; keyword arguments override any setting (e.g. a tiny width for tests)."""
    width, depth, heads, patch, ratio, _ = SIZES[size]
    config = dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=ratio)
    return VisionTransformer(**{**config, **kwargs})


def _pretrain(size: str, **kwargs) -> PretrainVisionTransformer:
    width, depth, heads, patch, ratio, (dec_width, dec_heads) = SIZES[size]
    config = dict(patch_size=patch, encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                  decoder_embed_dim=dec_width, decoder_num_heads=dec_heads, mlp_ratio=ratio,
                  decoder_depth=4)  # decoder depth 4: what every official pretraining script passes
    return PretrainVisionTransformer(**{**config, **kwargs})


@register_model
def videomae_vit_small_patch16_224(**kwargs):
    return _finetune("small", **kwargs)


@register_model
def videomae_vit_base_patch16_224(**kwargs):
    return _finetune("base", **kwargs)


@register_model
def videomae_vit_large_patch16_224(**kwargs):
    return _finetune("large", **kwargs)


@register_model
def videomae_vit_huge_patch16_224(**kwargs):
    return _finetune("huge", **kwargs)


@register_model
def videomae_vit_giant_patch14_224(**kwargs):
    return _finetune("giant", **kwargs)


@register_model
def pretrain_videomae_small_patch16_224(**kwargs):
    return _pretrain("small", **kwargs)


@register_model
def pretrain_videomae_base_patch16_224(**kwargs):
    return _pretrain("base", **kwargs)


@register_model
def pretrain_videomae_large_patch16_224(**kwargs):
    return _pretrain("large", **kwargs)


@register_model
def pretrain_videomae_huge_patch16_224(**kwargs):
    return _pretrain("huge", **kwargs)


@register_model
def pretrain_videomae_giant_patch14_224(**kwargs):
    return _pretrain("giant", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Dense versus packed, for the demo and the benchmark


@torch.no_grad()
def compare_dense_packed(model: VisionTransformer, video: Tensor, threshold: float | None = None,
                         repeats: int = 1) -> dict:
    """Runs ``model`` on a uint8 video ``[B, T, H, W, 3]`` (or one clip ``[T, H, W, 3]``) densely and RLT-packed.

    Returns the two logits, the median wall times in ms over ``repeats`` (the packed time includes tokenization),
    the tokens kept per clip, the tokens per clip of the dense path, the share kept and the speed-up.
    """
    if video.dim() == 4:
        video = video[None]
    model.eval()
    device = model.pos_embed.device
    video = video.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        times, out = [], None
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        return out, sorted(times)[len(times) // 2]

    dense_logits, dense_ms = timed(lambda: model(normalize_video(video, dtype=model.pos_embed.dtype)))
    tokens = model.tokenize(video, threshold)
    packed_logits, packed_ms = timed(lambda: model(model.tokenize(video, threshold)))
    kept = (tokens.cu_seqlens[1:] - tokens.cu_seqlens[:-1]).tolist()
    total = model.patch_embed.num_patches
    return {
        "dense_logits": dense_logits, "packed_logits": packed_logits, "dense_ms": dense_ms, "packed_ms": packed_ms,
        "tokens_kept": kept, "tokens_per_clip": total, "share_kept": sum(kept) / (total * len(kept)),
        "speedup": dense_ms / packed_ms,
    }
