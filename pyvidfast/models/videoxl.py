"""Video-XL ("Extra-Long Vision Language Model for Hour-Scale Video Understanding", CVPR 2025) on Hugging Face
transformers' Qwen2 and CLIP.

A CLIP ViT-L/14-336 encodes each frame (the configured select layer, patch tokens), an ``mlp2x_gelu`` projector maps
them to the LLM width and a 2x2 average pool leaves 144 tokens per frame. Qwen2 then reads the video in windows of
``beacon_window`` visual tokens; after every r raw tokens of a window it inserts one visual summarization token
(VST), whose rows use extra per-layer projections ``beacon_{q,k,v}_proj``. When a window ends only its VSTs' keys
and values stay, so the text after the video attends the prompt before it (the sink), every VST and itself.

The model extends HF modules (``Qwen2ForCausalLM``, ``Qwen2Attention``, ``CLIPVisionModel``) and keeps the
official parameter names (``VectorSpaceLab/Video-XL``, ``llava_qwen.py``), so its checkpoints load strictly. Unlike
the official code, several videos of different lengths run together: every window step is one pass of
``pyvidfast.ops.varlen_attention`` over the packed windows of all videos (bottom-right causal: memory fully
visible, causal inside the window, which is the official ``full-coverage`` mask), and all state lives in a
:class:`Memory` made per call.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (Qwen2Attention, Qwen2DecoderLayer, Qwen2Model,
                                                      Qwen2RotaryEmbedding, rotate_half)

from pyvidfast.models.registry import register_model
from pyvidfast.ops import varlen_attention
from pyvidfast.profiling import nvtx_range

IMAGE_TOKEN_INDEX = -200  # the official placeholder id of the video in input_ids (videoxl/constants.py)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BEACON_PARAMS = ("q", "k", "v")
# Official checkpoint tensors of beacon variants the released configuration (beacon_param = q k v) never uses.
UNUSED_OFFICIAL_SUFFIXES = ("self_attn.beacon_o_proj.weight", "self_attn.beacon_o_proj.bias",
                            "mlp.beacon_up_proj.weight", "mlp.beacon_down_proj.weight", "mlp.beacon_gate_proj.weight")


# ----------------------------------------------------------------------------------------------------- config


def clip_vit_l14_336_config() -> CLIPVisionConfig:
    """The tower of the released model: OpenAI CLIP ViT-L/14 at 336 px."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def qwen2_7b_config(**overrides) -> Qwen2Config:
    """Qwen2-7B-Instruct's shapes with the official Video-XL fields (``beacon_*``, ``mm_*``)."""
    fields = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        beacon_window=1440, beacon_stride=1440, beacon_ratio=[2, 4, 8, 12, 16], beacon_ratio_mix="step-random",
        beacon_pos="interleave", beacon_attn="full-coverage", beacon_param=["q", "k", "v"], beacon_sink_size=0,
        beacon_embed_init="eos", mm_hidden_size=1024, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_spatial_pool_stride=2, mm_spatial_pool_mode="average",
        mm_vision_tower="openai/clip-vit-large-patch14-336",
    )
    fields.update(overrides)
    return Qwen2Config(**fields)


@dataclass(frozen=True)
class BeaconSettings:
    """The ``beacon_*`` / ``mm_*`` fields of a Video-XL config this implementation reads, checked."""

    window: int
    ratios: tuple[int, ...]
    select_layer: int
    pool_stride: int

    @classmethod
    def from_config(cls, config: Qwen2Config) -> "BeaconSettings":
        def get(name, default):
            return getattr(config, name, default)

        expected = {"beacon_pos": "interleave", "beacon_attn": "full-coverage", "beacon_sink_size": 0,
                    "beacon_embed_init": "eos", "mm_projector_type": "mlp2x_gelu",
                    "mm_spatial_pool_mode": "average", "mm_vision_select_feature": "patch"}
        for name, value in expected.items():
            if get(name, value) != value:
                raise ValueError(f"config.{name}: only {value!r} is implemented; got {get(name, value)!r}")
        window = int(get("beacon_window", 1440))
        if int(get("beacon_stride", window)) != window:
            raise ValueError(f"config.beacon_stride: must equal beacon_window ({window}) as in the official "
                             f"configuration; got {get('beacon_stride', window)}")
        if sorted(get("beacon_param", BEACON_PARAMS)) != sorted(BEACON_PARAMS):
            raise ValueError(f"config.beacon_param: only ['q', 'k', 'v'] is implemented; "
                             f"got {get('beacon_param', None)}")
        ratios = get("beacon_ratio", [2, 4, 8, 12, 16])
        ratios = tuple(int(r) for r in (ratios if isinstance(ratios, (list, tuple)) else [ratios]))
        check_ratios(ratios, window, "config.beacon_ratio")
        return cls(window=window, ratios=ratios, select_layer=int(get("mm_vision_select_layer", -2)),
                   pool_stride=int(get("mm_spatial_pool_stride", 2)))


def check_ratios(ratios: Sequence[int], window: int, name: str = "ratio") -> None:
    if not ratios:
        raise ValueError(f"{name}: expected at least one compression ratio")
    for r in ratios:
        if not isinstance(r, int) or r < 1 or window % r:
            raise ValueError(f"{name}: every compression ratio must be a positive int dividing beacon_window "
                             f"({window}); got {r!r}")


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------- interleave


def interleave_layout(num_raw: int, ratio: int, remainder: int = 0) -> tuple[Tensor, int]:
    """Slots of a window of ``num_raw`` raw tokens with one VST after every ``ratio`` raw tokens.

    ``remainder`` raw tokens since the last VST carry over from an earlier part of the window (the official
    ``interleave_remainder``; one that is not below this ratio wraps modulo it). Returns the bool mask over the
    ``num_raw + num_raw_and_carry // ratio`` slots (True = VST) and the remainder left after them."""
    remainder %= ratio
    num_vst = (num_raw + remainder) // ratio
    slots = torch.arange(num_raw + num_vst)
    return slots % (ratio + 1) == ratio - remainder, (num_raw + remainder) % ratio


# -------------------------------------------------------------------------------------------------- modules


class BeaconAttention(Qwen2Attention):
    """Qwen2 attention with separate q/k/v projections for VST rows (``beacon_{q,k,v}_proj``); o_proj is shared."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.beacon_q_proj = nn.Linear(config.hidden_size, self.q_proj.out_features, bias=True)
        self.beacon_k_proj = nn.Linear(config.hidden_size, self.k_proj.out_features, bias=True)
        self.beacon_v_proj = nn.Linear(config.hidden_size, self.v_proj.out_features, bias=True)

    def project(self, x: Tensor, rows: "RowSplit | None") -> tuple[Tensor, Tensor, Tensor]:
        """Pre-RoPE q ``[N, H, D]``, k, v ``[N, Hkv, D]``; VST rows (``rows``) go through the beacon projections."""
        if rows is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            raw, vst = x[rows.raw], x[rows.vst]
            q, k, v = (torch.cat([base(raw), beacon(vst)])[rows.order] for base, beacon in (
                (self.q_proj, self.beacon_q_proj), (self.k_proj, self.beacon_k_proj),
                (self.v_proj, self.beacon_v_proj)))
        return (q.view(len(x), -1, self.head_dim), k.view(len(x), -1, self.head_dim),
                v.view(len(x), -1, self.head_dim))


@dataclass
class StepLayout:
    """What every layer of one step shares: the VST rows, where each key goes, which keys stay, RoPE tables and
    the packed lengths of the queries and keys."""

    rows: "RowSplit | None"
    key_order: Tensor  # cat([memory rows, current rows])[key_order]: each sample's memory, then its current rows
    keep_rows: Tensor  # the rows of the ordered keys the memory keeps after the step
    cos_q: Tensor
    sin_q: Tensor
    cos_k: Tensor
    sin_k: Tensor
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


class BeaconDecoderLayer(Qwen2DecoderLayer):
    """HF's Qwen2 decoder layer (its norms and MLP) with :class:`BeaconAttention`, run over one packed step.

    A module call per layer, so FSDP's hooks and HF's activation checkpointing (``gradient_checkpointing_enable``,
    which wraps ``forward``) apply; ``forward`` is pure (the caller stores the kept keys/values), so a recompute
    gives the same result."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = BeaconAttention(config, layer_idx)

    def forward(self, h: Tensor, past_keys: Tensor | None = None, past_values: Tensor | None = None,
                layout: StepLayout | None = None, **hf_kwargs) -> tuple[Tensor, Tensor, Tensor]:
        """``h`` ``[N, hidden]`` current rows; ``past_*`` the memory's pre-RoPE rows. Returns the new rows and
        the pre-RoPE keys/values the memory keeps. Without a ``layout``: HF's layer (``VideoXLModel`` still runs
        as a plain ``Qwen2Model``, every row through the ordinary projections)."""
        if layout is None:
            return super().forward(h, **hf_kwargs)
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(h), layout.rows)
        keys = torch.cat([past_keys, k])[layout.key_order]
        values = torch.cat([past_values, v])[layout.key_order]
        q = q * layout.cos_q + rotate_half(q) * layout.sin_q
        rotated = keys * layout.cos_k + rotate_half(keys) * layout.sin_k
        out = varlen_attention(q, rotated, values, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                               softmax_scale=attn.scaling, causal=True)
        h = h + attn.o_proj(out.reshape(len(h), -1))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, keys[layout.keep_rows], values[layout.keep_rows]


class CLIPTower(nn.Module):
    """The official ``CLIPVisionTower``: HF ``CLIPVisionModel`` (as ``vision_tower``), hidden states of the select
    layer, patch tokens only (CLS dropped).

    Runs the tower's embeddings and only the encoder layers up to the select layer: the official tower runs them
    all and keeps every hidden state, but the layers after the select layer (one of 24 in ViT-L, with
    ``mm_vision_select_layer = -2``) and the post-layernorm are never read."""

    def __init__(self, config: CLIPVisionConfig, select_layer: int):
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)
        num_states = config.num_hidden_layers + 1  # HF's hidden_states: the embeddings, then each layer's output
        if not -num_states <= select_layer < num_states:
            raise ValueError(f"config.mm_vision_select_layer: expected an index into the tower's {num_states} "
                             f"hidden states; got {select_layer}")
        self.select_layer = select_layer
        self.layers_used = select_layer % num_states
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size

    def forward(self, pixels: Tensor) -> Tensor:
        tower = self.vision_tower
        h = tower.pre_layrnorm(tower.embeddings(pixels))
        for layer in tower.encoder.layers[:self.layers_used]:
            h = layer(h, None)
        return h[:, 1:]


@dataclass
class RowSplit:
    """Packed rows of one step split into raw and VST rows; ``cat([raw rows, VST rows])[order]`` restores them."""

    raw: Tensor
    vst: Tensor
    order: Tensor

    @classmethod
    def from_mask(cls, is_vst: Tensor) -> "RowSplit | None":
        if not bool(is_vst.any()):
            return None
        raw, vst = (~is_vst).nonzero().squeeze(1), is_vst.nonzero().squeeze(1)
        return cls(raw, vst, torch.argsort(torch.cat([raw, vst])))


@dataclass
class Memory:
    """The keys and values kept between steps, per layer, before RoPE, packed by sample: sample ``b`` owns
    ``lengths[b]`` rows, in pool order sink (the prompt before the video), VSTs, then raw text (the prompt after
    the video and decoded tokens). Raw visual rows are never kept. Made fresh by every call."""

    keys: list[Tensor]
    values: list[Tensor]
    sink: list[int]
    vst: list[int]
    text: list[int]

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, like: Tensor) -> "Memory":
        blank = like.new_zeros(0, kv_heads, head_dim)
        return cls([blank] * num_layers, [blank] * num_layers, [0] * batch, [0] * batch, [0] * batch)

    @property
    def lengths(self) -> list[int]:
        return [s + v + t for s, v, t in zip(self.sink, self.vst, self.text)]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def drop_vsts(self) -> None:
        """Removes every sample's VST pool (what the text would see of the video), keeping sink and text rows."""
        keep, start = [], 0
        for s, v, t in zip(self.sink, self.vst, self.text):
            keep += [torch.arange(start, start + s), torch.arange(start + s + v, start + s + v + t)]
            start += s + v + t
        keep = torch.cat(keep).to(self.keys[0].device)
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.vst = [0] * len(self.vst)

    def sample(self, b: int, layer: int) -> tuple[Tensor, Tensor]:
        """Sample ``b``'s kept keys and values at ``layer``."""
        start = sum(self.lengths[:b])
        end = start + self.lengths[b]
        return self.keys[layer][start:end], self.values[layer][start:end]


@dataclass
class Prefill:
    """What :meth:`VideoXL.prefill` returns: logits per input position, the memory, and per-stage counts."""

    logits: list[Tensor]  # per sample [L_b, V]: one row per input id (the video's row: its last raw token)
    memory: Memory
    frames: list[int]
    window_steps: int = 0
    ratios: list[list[int]] = field(default_factory=list)  # per sample, the ratio of each window


# ---------------------------------------------------------------------------------------------------- model


class VideoXLModel(Qwen2Model):
    """HF ``Qwen2Model`` with beacon attention, the VST embedding, the CLIP tower and the projector, under the
    official names (``layers.{i}.self_attn.beacon_*``, ``beacon_embed_tokens``, ``vision_tower.vision_tower``,
    ``mm_projector.{0,2}``)."""

    def __init__(self, config: Qwen2Config, vision_config: CLIPVisionConfig):
        super().__init__(config)
        settings = BeaconSettings.from_config(config)
        for i in range(len(self.layers)):  # one at a time: at most one extra layer in memory
            self.layers[i] = BeaconDecoderLayer(config, i)
        self.beacon_embed_tokens = nn.Embedding(1, config.hidden_size)
        self.vision_tower = CLIPTower(vision_config, settings.select_layer)
        mm_hidden = getattr(config, "mm_hidden_size", vision_config.hidden_size)
        if mm_hidden != vision_config.hidden_size:
            raise ValueError(f"config.mm_hidden_size ({mm_hidden}) must equal the tower width "
                             f"({vision_config.hidden_size})")
        self.mm_projector = nn.Sequential(nn.Linear(mm_hidden, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))


class VideoXL(Qwen2ForCausalLM):
    """Video-XL: ``forward``/``generate`` in the official call convention, :meth:`chat`, :meth:`from_pretrained`
    of an official checkpoint folder.

    Args:
        config: a ``Qwen2Config`` carrying the official ``beacon_*`` and ``mm_*`` fields (see
            :func:`qwen2_7b_config`).
        vision_config: the CLIP tower's ``CLIPVisionConfig``.
        vision_chunk: frames encoded by CLIP at once (bounds the vision pass's memory).
    """

    def __init__(self, config: Qwen2Config, vision_config: CLIPVisionConfig | None = None, vision_chunk: int = 32):
        # Qwen2ForCausalLM.__init__ would first build a plain Qwen2Model; build ours in its place.
        super(Qwen2ForCausalLM, self).__init__(config)
        vision_config = vision_config if vision_config is not None else clip_vit_l14_336_config()
        self.settings = BeaconSettings.from_config(config)
        self.vision_config = vision_config
        self.model = VideoXLModel(config, vision_config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision_chunk = vision_chunk
        self.post_init()
        if not self.model.embed_tokens.weight.is_meta:
            self.init_beacon_params()

    # ------------------------------------------------------------------------------------------- parameters

    @torch.no_grad()
    def init_beacon_params(self) -> None:
        """Official initialization of the beacon parameters: the beacon projections copy q/k/v_proj, the VST
        embedding copies the eos row of the token embedding."""
        state = self.state_dict()
        self.load_state_dict(init_beacon_state(state, self.config, beacon_names(self.config)), strict=True)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules to shard one by one for FSDP (the training loop's ``--fsdp``): each decoder layer and the
        vision tower; the rest (embeddings, norm, head, projector) goes with the root."""
        return [*self.model.layers, self.model.vision_tower]

    @property
    def tokens_per_frame(self) -> int:
        side = self.model.vision_tower.grid // self.settings.pool_stride
        return side * side

    # ------------------------------------------------------------------------------------------------ vision

    def encode_frames(self, frames: Tensor, chunk: int | None = None, progress=None) -> Tensor:
        """Visual tokens of ``frames`` ``[F, 3, S, S]`` (CLIP-preprocessed): ``[F * tokens_per_frame, hidden]``.

        CLIP runs on ``chunk`` frames at a time, so the vision pass's memory does not grow with F.
        ``progress``: a callable given the number of frames each chunk encoded."""
        size = self.model.vision_tower.image_size
        if frames.dim() != 4 or frames.shape[1] != 3 or tuple(frames.shape[2:]) != (size, size):
            raise ValueError(f"images: expected a video [F, 3, {size}, {size}] of preprocessed frames; "
                             f"got {tuple(frames.shape)}")
        if frames.shape[0] == 0:
            raise ValueError("images: the video has no frames")
        chunk = chunk or self.vision_chunk
        grid, stride = self.model.vision_tower.grid, self.settings.pool_stride
        dtype = self.model.mm_projector[0].weight.dtype
        out = []
        for start in range(0, frames.shape[0], chunk):
            with nvtx_range("videoxl.vision_chunk"):
                patches = self.model.mm_projector(self.model.vision_tower(frames[start:start + chunk].to(dtype)))
                n, _, c = patches.shape
                grid_features = patches.view(n, grid, grid, c).permute(0, 3, 1, 2)
                pooled = F.avg_pool2d(grid_features, stride).permute(0, 2, 3, 1).reshape(-1, c)
                out.append(pooled)
            if progress is not None:
                progress(n)
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------------- steps

    def _step(self, memory: Memory, embeds: Tensor, lengths: Sequence[int], is_vst: Tensor | None,
              keep: Tensor | None, pool: str) -> Tensor:
        """One pass over packed current rows (``lengths[b]`` rows of sample b) against each sample's memory.

        Every row attends its sample's whole memory and, causally, its sample's current rows (RoPE positions
        ``arange(memory + current)``). Afterwards the rows flagged in ``keep`` (all when None) are appended to
        ``pool`` of the memory. Returns the final-norm hidden states of the current rows."""
        if sum(lengths) == 0:
            return embeds
        mem_lengths = memory.lengths
        device = embeds.device
        key_order, keep_rows, pos_k, pos_q = [], [], [], []
        mem_start, cur_start, key_start, total_mem = 0, 0, 0, sum(mem_lengths)
        kept = []
        keep_host = None if keep is None else keep.cpu()  # one device sync per step
        for m, c in zip(mem_lengths, lengths):
            key_order += [torch.arange(mem_start, mem_start + m), total_mem + torch.arange(cur_start, cur_start + c)]
            kept_here = torch.arange(c) if keep is None else keep_host[cur_start:cur_start + c].nonzero().squeeze(1)
            keep_rows += [torch.arange(key_start, key_start + m), key_start + m + kept_here]
            kept.append(len(kept_here))
            pos_k.append(torch.arange(m + c))
            pos_q.append(torch.arange(m, m + c))
            mem_start, cur_start, key_start = mem_start + m, cur_start + c, key_start + m + c
        key_order = torch.cat(key_order).to(device)
        keep_rows = torch.cat(keep_rows).to(device)
        key_lengths = torch.tensor([m + c for m, c in zip(mem_lengths, lengths)])
        cu_q = F.pad(torch.tensor(list(lengths)).cumsum(0), (1, 0)).to(device, torch.int32)
        cu_k = F.pad(key_lengths.cumsum(0), (1, 0)).to(device, torch.int32)
        max_q, max_k = max(lengths, default=0), int(key_lengths.max()) if len(key_lengths) else 0
        pos_k = torch.cat(pos_k).to(device)
        cos_k, sin_k = self.model.rotary_emb(embeds, pos_k[None])
        cos_k, sin_k = cos_k[0, :, None], sin_k[0, :, None]
        cur_keys = torch.cat(pos_q).to(device) if len(pos_q) else pos_k[:0]
        cos_q, sin_q = self.model.rotary_emb(embeds, cur_keys[None])
        cos_q, sin_q = cos_q[0, :, None], sin_q[0, :, None]
        rows = RowSplit.from_mask(is_vst) if is_vst is not None else None
        layout = StepLayout(rows, key_order, keep_rows, cos_q, sin_q, cos_k, sin_k, cu_q, cu_k, max_q, max_k)

        h = embeds
        for i, layer in enumerate(self.model.layers):
            h, memory.keys[i], memory.values[i] = layer(h, memory.keys[i], memory.values[i], layout=layout)
        pool_sizes = getattr(memory, pool)
        for b, n in enumerate(kept):
            pool_sizes[b] += n
        return self.model.norm(h)

    def _draw_ratio(self, num_raw: int, ratio: int | Sequence[int] | None, generator: torch.Generator) -> int:
        """The compression ratio of one window: fixed, or drawn from the configured ratios (official
        ``step-random``: only those dividing this window's length)."""
        ratios = self.settings.ratios if ratio is None else ((ratio,) if isinstance(ratio, int) else tuple(ratio))
        if len(ratios) == 1:
            return ratios[0]
        valid = [r for r in ratios if r <= num_raw and num_raw % r == 0]
        if not valid:
            raise ValueError(f"ratio: none of {list(ratios)} divides a window of {num_raw} visual tokens")
        return valid[int(torch.randint(len(valid), (1,), generator=generator))]

    # ----------------------------------------------------------------------------------------------- prefill

    def prefill(self, prompts: Sequence[Tensor], videos: Sequence[Tensor | None] | None = None,
                features: Sequence[Tensor | None] | None = None, ratio: int | Sequence[int] | None = None,
                generator: torch.Generator | None = None, progress=None, compress: bool = True,
                keep_vsts: bool = True) -> Prefill:
        """Runs prompts (1-D id tensors, ``IMAGE_TOKEN_INDEX`` once where a video goes) with their videos.

        ``videos[b]``: preprocessed frames ``[F, 3, S, S]`` (or None for a text-only prompt); or ``features[b]``:
        visual tokens ``[F * tokens_per_frame, hidden]`` already encoded. ``ratio``: a fixed compression ratio,
        or ratios to draw from per window (default: ``config.beacon_ratio``) with ``generator`` (default: one
        seeded 42 per call). ``progress``: a callable given the number of visual tokens each window step read.

        ``compress=False``: the plain LLaVA path of the official stage-1 pretraining (no VSTs; every visual token
        stays visible to the text, in one step). ``keep_vsts=False``: the VST pool is removed before the text
        after the video (an ablation: the text then sees nothing of the video)."""
        check_ratios((ratio,) if isinstance(ratio, int) else tuple(ratio or self.settings.ratios),
                     self.settings.window)
        batch = len(prompts)
        if videos is not None and features is not None:
            raise ValueError("videos/features: give one of them")
        if videos is not None:
            if len(videos) != batch:
                raise ValueError(f"images: expected one video per prompt ({batch}); got {len(videos)}")
            features = [None if v is None else self.encode_frames(v) for v in videos]
        features = list(features) if features is not None else [None] * batch
        if len(features) != batch:
            raise ValueError(f"features: expected one entry per prompt ({batch}); got {len(features)}")
        generator = generator if generator is not None else torch.Generator().manual_seed(42)
        window, per_frame = self.settings.window, self.tokens_per_frame

        prefix, suffix, frames = [], [], []
        for b, (ids, feats) in enumerate(zip(prompts, features)):
            ids = torch.as_tensor(ids).reshape(-1)
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if feats is None:
                if where:
                    raise ValueError(f"images: prompt {b} holds the video placeholder but no video was given")
                prefix.append(ids), suffix.append(ids[:0]), frames.append(0)
                continue
            if len(where) != 1:
                raise ValueError(f"input_ids: prompt {b} must hold the video placeholder IMAGE_TOKEN_INDEX "
                                 f"({IMAGE_TOKEN_INDEX}) exactly once; found it {len(where)} times")
            if feats.dim() != 2 or feats.shape[0] == 0 or feats.shape[0] % per_frame:
                raise ValueError(f"features: sample {b} expected [F * {per_frame}, hidden] visual tokens with F >= 1;"
                                 f" got {tuple(feats.shape)}")
            prefix.append(ids[:where[0]]), suffix.append(ids[where[0] + 1:]), frames.append(feats.shape[0] // per_frame)

        ref = self.model.embed_tokens.weight
        cfg = self.config
        head_dim = self.model.layers[0].self_attn.head_dim
        memory = Memory.empty(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, head_dim, ref)
        logits: list[list[Tensor]] = [[] for _ in range(batch)]

        # Step 0: the sink (each prompt up to its video, the whole of a text-only prompt).
        with nvtx_range("videoxl.text_prefill"):
            hidden = self._step(memory, self.model.embed_tokens(torch.cat(prefix).to(ref.device)),
                                [len(p) for p in prefix], None, None, "sink")
        for b, part in enumerate(hidden.split([len(p) for p in prefix])):
            logits[b].append(self.lm_head(part))

        # Window steps: window k of every video that has one, packed.
        remainders = [0] * batch
        ratios_used: list[list[int]] = [[] for _ in range(batch)]
        # uncompressed: the whole video is one "window" without VSTs whose raw rows stay in the raw pool
        window = window if compress else max((len(f) for f in features if f is not None), default=1)
        num_windows = [math.ceil(len(f) / window) if f is not None else 0 for f in features]
        beacon = self.model.beacon_embed_tokens.weight
        for k in range(max(num_windows, default=0)):
            with nvtx_range("videoxl.window_step"):
                raw_parts, masks, lengths, last_raw = [], [], [], {}
                offset = 0
                for b, feats in enumerate(features):
                    if k >= num_windows[b]:
                        lengths.append(0)
                        continue
                    part = feats[k * window:(k + 1) * window]
                    if compress:
                        r = self._draw_ratio(len(part), ratio, generator)
                        ratios_used[b].append(r)
                        is_vst, remainders[b] = interleave_layout(len(part), r, remainders[b])
                    else:
                        is_vst = torch.zeros(len(part), dtype=torch.bool)
                    raw_parts.append(part.to(ref.device, ref.dtype))
                    masks.append(is_vst)
                    lengths.append(len(is_vst))
                    if k == num_windows[b] - 1:
                        last_raw[b] = offset + int((~is_vst).nonzero().max())
                    offset += len(is_vst)
                is_vst = torch.cat(masks).to(ref.device)
                rows = RowSplit.from_mask(is_vst)
                raw = torch.cat(raw_parts)
                if rows is None:
                    embeds = raw
                else:
                    embeds = torch.cat([raw, beacon.expand(len(rows.vst), -1)])[rows.order]
                if compress:
                    hidden = self._step(memory, embeds, lengths, is_vst, is_vst, "vst")
                else:
                    hidden = self._step(memory, embeds, lengths, None, None, "text")
                for b, row in last_raw.items():
                    logits[b].append(self.lm_head(hidden[row][None]))
                if progress is not None:
                    progress(sum(len(p) for p in raw_parts))

        if not keep_vsts:
            memory.drop_vsts()
        # The text after each video: sink + every VST + itself.
        if any(len(s) for s in suffix):
            with nvtx_range("videoxl.text_prefill"):
                hidden = self._step(memory, self.model.embed_tokens(torch.cat(suffix).to(ref.device)),
                                    [len(s) for s in suffix], None, None, "text")
            for b, part in enumerate(hidden.split([len(s) for s in suffix])):
                logits[b].append(self.lm_head(part))
        return Prefill([torch.cat(parts) for parts in logits], memory, frames, max(num_windows, default=0),
                       ratios_used)

    def decode_step(self, memory: Memory, tokens: Tensor, active: Sequence[bool]) -> Tensor:
        """Feeds one token per active sample (``tokens`` ``[B]``); returns their next-token logits
        ``[num_active, V]``. Inactive samples' memory is untouched."""
        with nvtx_range("videoxl.decode_token"):
            ids = tokens[torch.as_tensor(list(active), device=tokens.device)]
            hidden = self._step(memory, self.model.embed_tokens(ids), [int(a) for a in active], None, None, "text")
            return self.lm_head(hidden)

    # ------------------------------------------------------------------------------------- official interface

    def _split_batch(self, input_ids, attention_mask, images, modalities, beacon_skip_first, beacon_skip_last):
        """Official-convention inputs -> prompts (padding removed) and videos, checked."""
        if isinstance(input_ids, Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if attention_mask is None:
                prompts = list(input_ids)
            else:
                prompts = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
        else:
            prompts = [torch.as_tensor(p) for p in input_ids]
        if images is not None:
            if isinstance(images, Tensor):
                images = [images]
            if len(images) != len(prompts):
                raise ValueError(f"images: expected one video per prompt ({len(prompts)}); got {len(images)}")
            modalities = modalities or ["video"] * len(images)
            if len(modalities) != len(images) or any(m not in ("video", "image") for m in modalities):
                raise ValueError(f"modalities: expected 'video' or 'image' per entry of images; got {modalities}")
            # an anyres image [1 + n, 3, S, S] (base view, then n tiles): the base view is never used (unires);
            # the tiles are encoded like frames, 144 tokens each
            for b, m in enumerate(modalities):
                if m == "image":
                    if images[b].dim() != 4 or len(images[b]) < 2:
                        raise ValueError(f"images: an 'image' entry must be anyres_tiles' [1 + n, 3, S, S] with "
                                         f"n >= 1 tiles; got {tuple(images[b].shape)}")
                    images = list(images)
                    images[b] = images[b][1:]
        for name, given in (("beacon_skip_first", beacon_skip_first), ("beacon_skip_last", beacon_skip_last)):
            if given is None or images is None:
                continue
            given = [given] if isinstance(given, int) else list(given)
            for b, (ids, video) in enumerate(zip(prompts, images)):
                where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
                if not where:
                    continue
                want = where[0] if name == "beacon_skip_first" else where[0] + len(video) * self.tokens_per_frame
                if given[b] != want:
                    raise ValueError(f"{name}: the video of prompt {b} spans [{where[0]}, "
                                     f"{where[0] + len(video) * self.tokens_per_frame}) after expansion, so "
                                     f"{name} must be {want}; got {given[b]}")
        return prompts, images

    def forward(self, input_ids=None, images=None, modalities=None, attention_mask=None, labels=None,
                beacon_skip_first=None, beacon_skip_last=None, ratio=None, generator=None, compress=True,
                keep_vsts=True, **unused):
        """Logits for every input position (``[B, L, V]``, zeros at padding; the video's row holds the logits
        after its last raw token) and, with ``labels`` (aligned with ``input_ids``, -100 ignored), the mean
        next-token loss (summed over the labelled tokens of the batch, divided by their count, as the official
        loss). The placeholder carries no label; VST rows never have logits. ``compress``, ``keep_vsts``: see
        :meth:`prefill`."""
        prompts, videos = self._split_batch(input_ids, attention_mask, images, modalities, beacon_skip_first,
                                            beacon_skip_last)
        result = self.prefill(prompts, videos, ratio=ratio, generator=generator, compress=compress,
                              keep_vsts=keep_vsts)
        width = input_ids.shape[-1] if isinstance(input_ids, Tensor) else max(len(p) for p in prompts)
        logits = result.logits[0].new_zeros(len(prompts), width, self.vocab_size)
        for b, row in enumerate(result.logits):
            if attention_mask is None:
                logits[b, :len(row)] = row
            else:
                logits[b, attention_mask[b].bool()] = row
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).clone()
            if labels.dim() == 1:
                labels = labels[None]
            labels[(input_ids.reshape(labels.shape) == IMAGE_TOKEN_INDEX)] = -100
            targets = labels[:, 1:].clone()
            if attention_mask is not None:  # no loss from or to padding
                real = attention_mask.bool().to(labels.device)
                targets[~(real[:, :-1] & real[:, 1:])] = -100
            loss = F.cross_entropy(_at_least_float32(logits[:, :-1].reshape(-1, self.vocab_size)), targets.reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        out.memory, out.ratios = result.memory, result.ratios
        return out

    def stream_tokens(self, result: Prefill, max_new_tokens: int = 128, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                      ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Generates up to ``max_new_tokens`` per prompt after a :meth:`prefill`; yields ``(tokens [B],
        scores [B, V], done [B])`` per step (``scores``: the processed next-token scores, -inf for samples that
        had finished; finished samples repeat their last token)."""
        from transformers.generation import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                             TopPLogitsWarper)

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int; got {max_new_tokens}")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        batch = len(result.logits)
        logits = _at_least_float32(torch.stack([row[-1] for row in result.logits]))
        done = torch.zeros(batch, dtype=torch.bool)
        tokens = torch.zeros(batch, dtype=torch.long)
        for step in range(max_new_tokens):
            scores = warpers(None, logits)
            if do_sample:
                picked = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                picked = scores.argmax(-1)
            active = ~done
            tokens[active] = picked.cpu()
            full_scores = scores.new_full((batch, scores.shape[-1]), float("-inf"))
            full_scores[active.to(scores.device)] = scores
            done = done | torch.isin(tokens, eos)
            yield tokens.clone(), full_scores, done.clone()
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            still = ~done
            logits = _at_least_float32(self.decode_step(result.memory, tokens.to(self.lm_head.weight.device),
                                                        still.tolist()))

    @torch.no_grad()
    def generate(self, input_ids=None, images=None, modalities=None, attention_mask=None, max_new_tokens=128,
                 do_sample=False, temperature=1.0, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
                 output_scores=False, return_dict_in_generate=False, beacon_skip_first=None,
                 beacon_skip_last=None, ratio=None, generator=None, streamer=None, **unused):
        """The official call: ``generate(input_ids, images=[video], modalities=["video"], ...)`` with HF's
        generation keywords. Returns the generated ids ``[B, new]`` (padded with ``pad_token_id`` after eos);
        unlike the official code, the prompt is not repeated in front. With ``return_dict_in_generate``, a
        ``GenerateDecoderOnlyOutput`` (``sequences``, ``scores`` when ``output_scores``). ``streamer``: HF's
        ``put``/``end`` protocol (batch 1)."""
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        prompts, videos = self._split_batch(input_ids, attention_mask, images, modalities, beacon_skip_first,
                                            beacon_skip_last)
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        steps, scores = [], []
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        result = self.prefill(prompts, videos, ratio=ratio, generator=generator)
        for tokens, step_scores, done in self.stream_tokens(result, max_new_tokens, do_sample, temperature, top_k,
                                                             top_p, eos_token_id, generator):
            out = tokens.cpu().clone()
            out[finished] = pad
            steps.append(out)
            scores.append(step_scores)
            finished = done
            if streamer is not None:
                streamer.put(out[:1])
        if streamer is not None:
            streamer.end()
        sequences = torch.stack(steps, 1)
        if return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores) if output_scores else None)
        return sequences

    # -------------------------------------------------------------------------------------------------- chat

    def chat(self, video: Tensor | str | os.PathLike, prompt: str, tokenizer=None, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
             frames: int | None = None, max_frames: int = 1024, ratio: int | Sequence[int] | None = None,
             system: str = "You are a helpful assistant.", stream: bool = False,
             generator: torch.Generator | None = None):
        """Answers ``prompt`` about ``video`` (a path, or preprocessed frames ``[F, 3, S, S]``) with the Qwen
        ChatML template and the checkpoint folder's tokenizer (or ``tokenizer``). Frames: ``frames`` uniform, or
        1 fps capped at ``max_frames``. Returns the answer, or with ``stream`` an iterator of its pieces."""
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("tokenizer: the checkpoint folder has no tokenizer; pass tokenizer=")
        if not isinstance(video, Tensor):
            video = load_video(video, self.model.vision_tower.image_size, frames=frames, max_frames=max_frames)
        ids = chat_input_ids(tokenizer, prompt, system)
        device = self.lm_head.weight.device
        with torch.no_grad():
            result = self.prefill([ids.to(device)], [video.to(device)], ratio=ratio, generator=generator)
        pieces = self.stream_text(result, tokenizer, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, generator=generator)
        return pieces if stream else "".join(pieces)

    def stream_text(self, result: Prefill, tokenizer, max_new_tokens: int, **sampling) -> Iterator[str]:
        """The answer after :meth:`prefill` of one prompt as text pieces, up to ChatML's ``<|im_end|>``."""
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        eos = [t for t in {end, tokenizer.eos_token_id, self.config.eos_token_id}
               if isinstance(t, int) and t != tokenizer.unk_token_id]
        answer, shown = [], ""
        with torch.no_grad():
            for tokens, _, done in self.stream_tokens(result, max_new_tokens, eos_token_id=eos, **sampling):
                if int(tokens[0]) not in eos:
                    answer.append(int(tokens[0]))
                text = tokenizer.decode(answer, skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole characters
                    yield text[len(shown):]
                    shown = text
                if bool(done[0]):
                    break

    # ------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", vision_chunk: int = 32) -> "VideoXL":
        """Loads an official checkpoint folder: ``config.json`` + (sharded) safetensors, strict.

        The tower's shape comes from the folder ``config.mm_vision_tower`` names (absolute, or relative to the
        checkpoint) when it exists, else CLIP ViT-L/14-336's (with a warning). Only the beacon variants the
        released configuration never uses (``beacon_o_proj``, ``mlp.beacon_*``) may be missing, and are named."""
        folder = Path(folder)
        config, vision_config = read_folder_config(folder)
        with torch.device("meta"):
            model = cls(config, vision_config, vision_chunk=vision_chunk)
        model.load_folder_weights(folder, dtype=dtype, device=device)
        model.tokenizer = read_folder_tokenizer(folder)
        return model

    def load_folder_weights(self, folder: Path, dtype: torch.dtype | None = None,
                            device: str | torch.device = "cpu") -> "VideoXL":
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"pretrained: no *.safetensors in {str(folder)!r}")
        state = {}
        for f in files:
            state.update(load_file(str(f), device=str(device)))
        state = official_to_ours(state)
        expected = set(self.state_dict())
        skipped = sorted(k for k in state if k not in expected and k.endswith(UNUSED_OFFICIAL_SUFFIXES))
        if skipped:
            import warnings

            warnings.warn(f"VideoXL: skipping unused official beacon tensors: {skipped}", stacklevel=3)
        state = {k: v for k, v in state.items() if k not in skipped}
        unexpected = sorted(set(state) - expected)
        missing = sorted(expected - set(state))
        if self.config.tie_word_embeddings and "lm_head.weight" in missing:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
            missing.remove("lm_head.weight")
        beacon_missing = [k for k in missing if k in set(beacon_names(self.config))]
        if beacon_missing and not unexpected and len(beacon_missing) == len(missing):
            import warnings

            warnings.warn(f"VideoXL: {str(folder)!r} lacks {len(beacon_missing)} beacon tensors (e.g. "
                          f"{beacon_missing[0]}); initializing them as the official code does (copies of q/k/v_proj, "
                          f"the eos embedding)", stacklevel=3)
            state = init_beacon_state(state, self.config, beacon_missing)
            missing = []
        if missing or unexpected:
            raise KeyError(f"pretrained: {str(folder)!r} does not match the model: missing {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}")
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        self.load_state_dict(state, strict=True, assign=True)
        self._rebuild_buffers(device)
        return self

    def _rebuild_buffers(self, device) -> None:
        """Non-persistent buffers (RoPE frequencies, CLIP position ids) are not in checkpoints: remake them after
        loading into a model built on the meta device."""
        with torch.device(device):
            self.model.rotary_emb = Qwen2RotaryEmbedding(self.config)
        embeddings = self.model.vision_tower.vision_tower.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions, device=device)[None]


def read_folder_tokenizer(folder: Path):
    """The folder's HF tokenizer, or None when it has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def chat_input_ids(tokenizer, prompt: str, system: str = "You are a helpful assistant.") -> Tensor:
    """The official ``qwen_1_5`` ChatML prompt with the video before the question, tokenized as the official
    ``tokenizer_image_token`` does: the text around ``<image>`` tokenized apart, joined by IMAGE_TOKEN_INDEX."""
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    before, after = text.split("<image>")
    ids = (tokenizer(before, add_special_tokens=False)["input_ids"] + [IMAGE_TOKEN_INDEX]
           + tokenizer(after, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def load_video(path: str | os.PathLike, size: int = 336, frames: int | None = None, max_frames: int = 1024,
               fps: float = 1.0, chunk: int = 32, progress=None,
               indices: Callable[[int, float], list[int]] | None = None) -> Tensor:
    """Frames of a video file as CLIP expects them: ``frames`` spread uniformly (or ``fps`` per second, capped
    at ``max_frames``), shortest side resized to ``size`` (antialiased bilinear), center-cropped to
    ``size x size``, normalized with CLIP's mean and std: float32 ``[F, 3, size, size]``.

    Decodes ``chunk`` frames at a time; ``progress``: a callable given the number decoded each time.
    ``indices(num_frames, average_fps) -> frame indices``: another frame choice (the training scripts' one)."""
    from pyvidfast.io import VideoReader, sampling

    with VideoReader(path) as reader:
        meta = reader.metadata
        if indices is not None:
            indices = indices(len(reader), meta.fps)
        elif frames is not None:
            indices = sampling.uniform(len(reader), frames)
        else:
            indices = sampling.per_second(reader.timestamps(), fps=fps, max_frames=max_frames)
        scale = size / min(meta.height, meta.width)
        height, width = max(size, round(meta.height * scale)), max(size, round(meta.width * scale))
        top, left = (height - size) // 2, (width - size) // 2
        out = []
        for start in range(0, len(indices), chunk):
            with nvtx_range("videoxl.decode"):
                part = reader.get_frames(indices[start:start + chunk], size=(height, width), layout="CTHW",
                                         dtype=torch.float32, mean=CLIP_MEAN, std=CLIP_STD)
                out.append(part[:, :, top:top + size, left:left + size].permute(1, 0, 2, 3))
            if progress is not None:
                progress(len(out[-1]))
    return torch.cat(out)


def parse_grid_pinpoints(pinpoints, size: int = 336) -> list[tuple[int, int]]:
    """``config.image_grid_pinpoints`` as (width, height) pairs: a list, its string form, or the range form
    ``"(1x1),...,(6x6)"`` (tile counts, times ``size``)."""
    import ast
    import re

    if isinstance(pinpoints, str) and "x" in pinpoints:
        matches = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        (w0, h0), (w1, h1) = tuple(map(int, matches[0])), tuple(map(int, matches[-1]))
        return [(i * size, j * size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
    if isinstance(pinpoints, str):
        pinpoints = ast.literal_eval(pinpoints)
    return [(int(w), int(h)) for w, h in pinpoints]


def best_resolution(width: int, height: int, candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The official ``select_best_resolution``: the candidate keeping the most of the image's pixels after an
    aspect-preserving downscale, ties broken by the least padding."""
    best, best_effective, best_wasted = None, -1, float("inf")
    for w, h in candidates:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def anyres_tiles(image: Tensor, grid_pinpoints, size: int = 336) -> Tensor:
    """An image (uint8 ``[H, W, 3]``) as the official ``process_anyres_image`` prepares it: resized into the best
    of ``grid_pinpoints`` keeping its aspect ratio, padded with black around it, cut into ``size x size`` tiles
    (row-major), after a base view (the whole image squashed to ``size x size``, which the model skips);
    CLIP-normalized float32 ``[1 + tiles, 3, size, size]``. Resizes are antialiased bicubic (official: PIL)."""
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3]; got {tuple(image.shape)}")
    height, width = image.shape[:2]
    pixels = image.permute(2, 0, 1)[None].float() / 255
    target_w, target_h = best_resolution(width, height, parse_grid_pinpoints(grid_pinpoints, size))
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
    else:
        new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h

    def resize(x, h, w):
        return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)

    canvas = pixels.new_zeros(1, 3, target_h, target_w)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[..., top:top + new_h, left:left + new_w] = resize(pixels, new_h, new_w)
    tiles = canvas[0].unfold(1, size, size).unfold(2, size, size)  # [3, rows, cols, size, size]
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)
    views = torch.cat([resize(pixels, size, size), tiles])
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (views - mean) / std


def beacon_names(config: Qwen2Config) -> list[str]:
    """State-dict names of the parameters Video-XL adds to Qwen2."""
    names = ["model.beacon_embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.beacon_{p}_proj.{t}" for p in BEACON_PARAMS for t in ("weight", "bias")]
    return names


def init_beacon_state(state: dict[str, Tensor], config: Qwen2Config, names: Sequence[str]) -> dict[str, Tensor]:
    """``state`` with the beacon entries ``names`` set as the official code initializes them when a checkpoint
    lacks them: ``beacon_{q,k,v}_proj`` = copies of ``{q,k,v}_proj``, ``beacon_embed_tokens`` = the eos row."""
    state = dict(state)
    for name in names:
        if name == "model.beacon_embed_tokens.weight":
            eos = config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            state[name] = state["model.embed_tokens.weight"][eos if eos is not None else -1][None].clone()
        else:
            state[name] = state[name.replace(".beacon_", ".")].clone()
    return state


def official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official tower keys carry transformers 4.x's ``vision_model.`` level, which 5.x's ``CLIPVisionModel``
    drops: ``model.vision_tower.vision_tower.vision_model.X`` -> ``model.vision_tower.vision_tower.X``."""
    old = "model.vision_tower.vision_tower.vision_model."
    return {("model.vision_tower.vision_tower." + k[len(old):] if k.startswith(old) else k): v
            for k, v in state.items()}


def read_folder_config(folder: Path) -> tuple[Qwen2Config, CLIPVisionConfig]:
    """The LLM config of an official folder and the tower's config (from the ``mm_vision_tower`` folder)."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: no config.json in {str(folder)!r}")
    fields = json.loads(path.read_text())
    for key in ("architectures", "model_type", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    if "torch_dtype" in fields:
        fields["dtype"] = fields.pop("torch_dtype")
    config = Qwen2Config(**fields)
    tower = fields.get("mm_vision_tower")
    candidates = [] if tower is None else [Path(tower), folder / tower]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return config, CLIPVisionConfig.from_pretrained(str(candidate))
    import warnings

    warnings.warn(f"VideoXL: the vision tower folder {tower!r} (config.mm_vision_tower) was not found; using "
                  f"CLIP ViT-L/14-336's shape", stacklevel=3)
    return config, clip_vit_l14_336_config()


@register_model(from_pretrained=VideoXL.from_pretrained)
def videoxl_qwen2_7b(device: str | torch.device = "meta", **config_overrides) -> VideoXL:
    """Video-XL 7B (Qwen2-7B-Instruct + CLIP ViT-L/14-336). Built on the meta device by default (34 GB of
    float32 otherwise): ``create_model("videoxl_qwen2_7b", pretrained=DIR)`` rebuilds it from DIR's config and
    loads DIR's weights; pass ``device="cpu"`` for a randomly initialized model."""
    with torch.device(device):
        return VideoXL(qwen2_7b_config(**config_overrides), clip_vit_l14_336_config())
