"""VideoMAE V2 (Wang et al., CVPR 2023): ViT-S/B/L/H/g video transformers, dual-masking pretraining model, and
RLT-packed inference.

Parameter names and shapes follow the official code (OpenGVLab/VideoMAEv2 ``models/modeling_{finetune,pretrain}.py``)
so its checkpoints load with ``load_state_dict(strict=True)``; :func:`checkpoint_filter_fn` also maps Hugging Face
``transformers`` VideoMAE checkpoints (load any of them with :func:`pyvidfast.models.load_checkpoint`). The
sinusoid position table is a non-persistent buffer (the official code keeps it out of the state dict too).

Two input paths share the same blocks (:mod:`pyvidfast.models.layers`):

* dense: normalized float video ``[B, 3, T, H, W]`` -> Conv3d patch embedding -> attention by PyTorch SDPA;
* packed (RLT): :class:`pyvidfast.ops.PackedTokens` from :func:`pyvidfast.ops.rlt_tokenize` -> the same Conv3d
  weight used as a Linear on the flattened patches -> position table gathered at the kept positions -> attention by
  ``pyvidfast.ops.varlen_attention`` over ``cu_seqlens`` -> per-clip mean pooling.
"""

import warnings
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from pyvidfast.models.layers import Block, DataConfig, Packing, PatchEmbed, drop_path_rates
from pyvidfast.models.registry import register_model
from pyvidfast.ops.rlt import PackedTokens, rlt_tokenize

LN_EPS = 1e-6  # every LayerNorm of the official models


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sinusoid table [num_positions, dim] (sin on even, cos on odd channels), computed in float64 like
    the official code, returned as float32. Row i depends only on i, so a shorter table is a prefix of a longer."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def make_blocks(dim, depth, num_heads, mlp_ratio, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path_rate=0.0):
    """The official blocks: LayerNorm eps 1e-6, q/v biases (``qkv_bias``), no LayerScale."""
    norm = partial(nn.LayerNorm, eps=LN_EPS)
    return nn.ModuleList(Block(dim, num_heads, mlp_ratio, drop=drop, attn_drop=attn_drop, drop_path=rate,
                               norm_layer=norm, qv_bias=qkv_bias)
                         for rate in drop_path_rates(drop_path_rate, depth))


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

    ``forward`` takes a normalized float video ``[B, 3, T, H, W]`` (dense) or :class:`PackedTokens` from
    :meth:`tokenize` (RLT, packed) and returns logits ``[B, num_classes]``; :meth:`forward_packed` takes a list of
    uint8 clips of any shapes.
    """

    def __init__(self, img_size=224, patch_size=16, num_classes=400, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 head_drop_rate=0.0, init_scale=0.001, num_frames=16, tubelet_size=2, use_length_embed=False,
                 rlt_threshold=0.1):
        super().__init__()
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.patch_size, self.tubelet_size, self.rlt_threshold = patch_size, tubelet_size, rlt_threshold
        self.data_config = DataConfig(num_frames=num_frames, img_size=img_size, tubelet_size=tubelet_size,
                                      patch_size=patch_size)
        self.patch_embed = PatchEmbed(embed_dim, patch_size, tubelet_size, img_size=img_size, num_frames=num_frames)
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
        if isinstance(x, PackedTokens):
            _, grid_h, grid_w = self.grid
            pos = x.positions.long()
            index = (pos[:, 0] * grid_h + pos[:, 1]) * grid_w + pos[:, 2]
            packing = Packing.from_cu_seqlens(x.cu_seqlens, x.max_seqlen(), x.patches.shape[0])
            feats = self.forward_packed_features(x.patches, index, x.lengths, packing)
        else:
            feats = self.forward_features(x)
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

    def forward_packed_features(self, patches: Tensor, position_index: Tensor, lengths: Tensor,
                                packing: Packing) -> Tensor:
        """Packed path: flattened patches [N, K], their rows of the position table [N], run lengths [N] ->
        pooled, normalized features [B, D]."""
        x = self.patch_embed.embed_patches(patches)
        x = x + self.pos_embed[0].index_select(0, position_index).to(x.dtype)
        if self.length_embed is not None:
            x = x + self.length_embed.index_select(0, lengths.long() - 1).to(x.dtype)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, packing)
        return self.fc_norm(packing.mean(x))

    def forward_packed(self, clips: Sequence[Tensor], threshold: float | None = None) -> Tensor:
        """Logits [len(clips), num_classes] of uint8 clips ``[T_i, H_i, W_i, 3]`` of any shapes (multiples of the
        tubelet and patch, at most the model's token count), RLT-tokenized and run as one packed sequence. A clip
        of another shape gets the position-table rows of its own raster order, as the official model built for
        that shape would (the sinusoid table of fewer positions is a prefix of this one)."""
        if not clips:
            raise ValueError("clips: expected at least one clip")
        patches, index, lengths, counts = [], [], [], []
        for i, clip in enumerate(clips):
            if clip.dim() != 4:
                raise ValueError(f"clips[{i}]: expected uint8 [T, H, W, 3]; got {tuple(clip.shape)}")
            grid_h, grid_w = clip.shape[1] // self.patch_size, clip.shape[2] // self.patch_size
            if (clip.shape[0] // self.tubelet_size) * grid_h * grid_w > self.patch_embed.num_patches:
                raise ValueError(f"clips[{i}]: {tuple(clip.shape)} gives more tokens than the model's "
                                 f"{self.patch_embed.num_patches} positions (grid {self.grid})")
            tokens = self.tokenize(clip[None], threshold)
            pos = tokens.positions.long()
            patches.append(tokens.patches)
            index.append((pos[:, 0] * grid_h + pos[:, 1]) * grid_w + pos[:, 2])
            lengths.append(tokens.lengths)
            counts.append(tokens.patches.shape[0])
        packing = Packing.from_lengths(counts, patches[0].device)
        feats = self.forward_packed_features(torch.cat(patches), torch.cat(index), torch.cat(lengths), packing)
        return self.head(self.head_dropout(feats))

    def tokenize(self, video: Tensor, threshold: float | None = None) -> PackedTokens:
        """RLT tokens of a uint8 ``[B, T, H, W, 3]`` video with this model's tubelet, patch and normalization."""
        threshold = self.rlt_threshold if threshold is None else threshold
        config = self.data_config
        return rlt_tokenize(video, self.tubelet_size, self.patch_size, threshold, config.mean, config.std,
                            out_dtype=self.pos_embed.dtype)


class PretrainVisionTransformerEncoder(nn.Module):
    """Encoder of the pretraining model: runs on the tokens the tube mask leaves visible."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate,
                 num_frames, tubelet_size):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim, patch_size, tubelet_size, img_size=img_size, num_frames=num_frames)
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
    for the decoder-kept tokens in raster order (:mod:`pyvidfast.train.tasks.videomae` turns them into the loss).
    """

    def __init__(self, img_size=224, patch_size=16, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                 decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6, mlp_ratio=4.0, qkv_bias=True,
                 drop_path_rate=0.0, num_frames=16, tubelet_size=2):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.img_size, self.num_frames = img_size, num_frames
        self.data_config = DataConfig(num_frames=num_frames, img_size=img_size, tubelet_size=tubelet_size,
                                      patch_size=patch_size)
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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _is_hugging_face(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in state_dict)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """An official or Hugging Face VideoMAE checkpoint -> ``model``'s state dict names (pure; reads ``model``
    only for its own tensors).

    Strips ``_orig_mod.``/``module.``/``backbone.`` prefixes and maps Hugging Face names. For a
    :class:`VisionTransformer`: a pretraining checkpoint gives its encoder (the decoder and the encoder's final
    ``norm`` go; ``fc_norm``/``head`` keep the model's initialization); a head whose class count differs from the
    model's is replaced by the model's own, with a warning; a missing ``length_embed`` keeps the model's. For a
    :class:`PretrainVisionTransformer`: backbone names of a Hugging Face or encoder-only layout get ``encoder.``.
    """
    state = {_strip_prefixes(k): v for k, v in state_dict.items()}
    if _is_hugging_face(state):
        state = hf_to_official(state)
    if isinstance(model, PretrainVisionTransformer):
        if not any(k.startswith("encoder.") for k in state):
            backbone = ("patch_embed.", "blocks.", "norm.")
            state = {("encoder." + k if k.startswith(backbone) else k): v for k, v in state.items()}
        return state
    own = model.state_dict()
    if any(k.startswith(("encoder.", "decoder.")) for k in state):  # a pretraining checkpoint: its encoder
        decoder_only = ("decoder.", "encoder_to_decoder.", "mask_token")
        state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(decoder_only)}
        state.pop("norm.weight", None)  # the pretraining encoder's final norm; mean pooling uses fc_norm
        state.pop("norm.bias", None)
        state.update({k: v for k, v in own.items() if k.startswith(("fc_norm.", "head."))})
    if "head.weight" in state and state["head.weight"].shape != own.get("head.weight", torch.empty(0)).shape:
        warnings.warn(f"checkpoint head {tuple(state['head.weight'].shape)} does not fit the model's "
                      f"{model.num_classes} classes; keeping the model's head")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in own.items() if k.startswith("head.")})
    if "length_embed" in own and "length_embed" not in state:
        state["length_embed"] = own["length_embed"]
    return state


def checkpoint_config_fn(model: nn.Module, state_dict: dict[str, Tensor], hf_config: dict | None) -> None:
    """For a Hugging Face checkpoint, takes its LayerNorm epsilons (``layer_norm_eps`` of config.json, else the
    transformers default 1e-12; 1e-5 for the classifier's ``fc_norm`` and the decoder's ``norm``) so outputs match
    ``transformers``; the official models use 1e-6 everywhere."""
    if hf_config is None and not _is_hugging_face({_strip_prefixes(k): None for k in state_dict}):
        return
    eps = (hf_config or {}).get("layer_norm_eps", 1e-12)
    if isinstance(model, PretrainVisionTransformer):
        for block in [*model.encoder.blocks, *model.decoder.blocks]:
            block.norm1.eps = block.norm2.eps = eps
        model.encoder.norm.eps = eps
        model.decoder.norm.eps = 1e-5
    else:
        for block in model.blocks:
            block.norm1.eps = block.norm2.eps = eps
        model.fc_norm.eps = 1e-5


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
