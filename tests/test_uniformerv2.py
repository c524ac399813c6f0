"""UniFormerV2: parity with the official forward (re-derived step by step in tests/reference_uniformerv2.py, in the
official LND layout with nn.MultiheadAttention), official keys and shapes, checkpoint and CLIP import, packed clips,
training."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyvidfast.models import create_model, load_checkpoint
from pyvidfast.models import uniformerv2 as uv2
from reference_uniformerv2 import RefUniFormerV2  # tests/ is on sys.path under pytest, as for conftest

# ----------------------------------------------------------------------------------------------------------------
# Helpers

TINY = dict(img_size=16, patch_size=4, width=24, layers=4, heads=4, num_classes=7)
CONFIGS = {  # the two published configurations, shrunk
    "kinetics": dict(temporal_downsample=False, no_lmhra=True, return_list=[2, 3]),
    "ssv2": dict(temporal_downsample=True, no_lmhra=False, return_list=[1, 2, 3]),
}


def tiny(config: str, **kwargs) -> uv2.UniFormerV2:
    return uv2.UniFormerV2(**{**TINY, **CONFIGS[config], **kwargs})


def tiny_reference(config: str) -> RefUniFormerV2:
    c = CONFIGS[config]
    return RefUniFormerV2(TINY["img_size"], TINY["patch_size"], TINY["width"], TINY["layers"], TINY["heads"],
                          c["temporal_downsample"], c["no_lmhra"], c["return_list"], TINY["num_classes"])


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and BN statistic random, including the zero-initialized ones (local and global paths,
    temporal_cls_token, balance), so a broken path cannot hide behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                t.copy_(0.5 + r.abs())
            elif t.dim() == 1 and (".ln_" in name or name.startswith("ln_") or ".pos_embed.0." in name
                                   or "proj.0." in name):  # LayerNorm / BatchNorm affine
                t.copy_((1 + 0.2 * r) if name.endswith("weight") else 0.2 * r)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(r * (0.5 if t.dim() == 1 else 1 / math.sqrt(fan_in)))
    return model


def video(batch, frames, size=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, size, size, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("config,frames", [("kinetics", 8), ("kinetics", 5), ("ssv2", 16), ("ssv2", 7)])
def test_matches_official_forward(config, frames):
    ours = randomize(tiny(config)).double().eval()
    ref = tiny_reference(config).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # the official names and shapes
    x = video(2, frames)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert got.shape == (2, TINY["num_classes"])
    scale = want.abs().max().item()
    assert scale > 0.1
    assert (got - want).abs().max().item() <= 1e-9 * scale
    # each random part matters: zeroing the global path or the balance changes the logits
    with torch.no_grad():
        ours.transformer.dec[0].attn.out_proj.weight.zero_()
        assert (ours(x) - want).abs().max() > 1e-4 * scale


@pytest.mark.parametrize("config,frames", [("kinetics", 5), ("ssv2", 7)])
def test_gradients_match_official(config, frames):
    ours = randomize(tiny(config)).double().eval()  # eval: no dropout; BN uses its (random) running statistics
    ref = tiny_reference(config).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = video(2, frames)
    weights = torch.randn(2, TINY["num_classes"], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for model in (ours, ref):
        (model(x) * weights).sum().backward()
    want = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        scale = want[name].grad.abs().max().item()
        assert scale > 0, name  # every parameter's gradient is live with the zero-inits re-randomized
        assert (p.grad - want[name].grad).abs().max().item() <= 1e-9 * scale, name


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of model(x)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def test_quick_gelu_keeps_only_its_input():
    x = torch.randn(3, 11, 40, dtype=torch.float64, requires_grad=True)
    gelu = uv2.QuickGELU()
    assert torch.equal(gelu(x), x * torch.sigmoid(1.702 * x))
    assert torch.autograd.gradcheck(gelu, (x,))
    assert saved_bytes(gelu, x) == x.numel() * x.element_size()


@pytest.mark.parametrize("shape", [(2, 5, 6, 4), (1, 3, 6, 4), (2, 7, 4), (1, 6, 4)])
@pytest.mark.parametrize("size", [3, 5])
def test_temporal_conv_function_matches_conv3d(shape, size):
    """The local UniBlock's depthwise temporal conv on the token layout [B?, T, HW, C] (T down to 1, below the
    kernel): gradcheck, and values and gradients equal nn.Conv3d's on the video layout."""
    g = torch.Generator().manual_seed(11)
    channels = shape[-1]
    conv = nn.Conv3d(channels, channels, (size, 1, 1), padding=(size // 2, 0, 0), groups=channels).double()
    with torch.no_grad():
        conv.bias.normal_(generator=g)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight = conv.weight.view(channels, size)
    assert torch.autograd.gradcheck(uv2.TemporalConvFunction.apply, (x, weight, conv.bias))
    clips = x if x.dim() == 4 else x[None]
    want = conv(clips.permute(0, 3, 1, 2)[..., None])[..., 0].permute(0, 2, 3, 1).reshape(shape)
    got = uv2.temporal_conv(conv, x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    weights = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((out * weights).sum(), (x, conv.weight, conv.bias)) for out in (got, want)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clips,channels_last", [(1, True), (2, False)])
def test_depthwise_conv3d_function_matches_conv3d(clips, channels_last):
    """The DPE's depthwise conv with its backward as two forward convs: gradcheck, and values and gradients equal
    nn.Conv3d's on odd sizes (several clips: grad_weight sums them)."""
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv3d(5, 5, 3, padding=1, groups=5).double()
    with torch.no_grad():
        conv.bias.normal_(generator=g)
    x = torch.randn(clips, 5, 3, 4, 6, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    fn = uv2.DepthwiseConv3dFunction.apply
    assert torch.autograd.gradcheck(fn, (x, conv.weight, conv.bias))
    weights = torch.randn(clips, 5, 3, 4, 6, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((uv2.depthwise_conv3d(conv, x) * weights).sum(), (x, conv.weight, conv.bias))
    want = torch.autograd.grad((conv(x) * weights).sum(), (x, conv.weight, conv.bias))
    assert torch.allclose(uv2.depthwise_conv3d(conv, x), conv(x), rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", ["kinetics", "ssv2"])
def test_training_keeps_less_than_official(config):
    ours = randomize(tiny(config)).train()
    ref = tiny_reference(config).train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = video(2, 8, dtype=torch.float32)
    assert saved_bytes(ours, x) < saved_bytes(ref, x)


def test_bench_allocator_peak_counts_a_training_step():
    """bench.uniformerv2's CPU peak (the profiler's memory events, no profiler range needed): a training step holds
    at least the new gradients."""
    from bench.common import cpu_allocations
    from bench.uniformerv2 import allocator_peak, make_step

    model = randomize(tiny("ssv2"))
    step = make_step(model, video(1, 8, dtype=torch.float32), torch.tensor([3]), "train", torch.float32)
    step()
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert grad_bytes <= allocator_peak(model, step, torch.device("cpu")) < 20 * grad_bytes
    totals, forward_end = cpu_allocations(lambda: torch.ones(1000))
    assert forward_end is None and max(total for _, total in totals) >= 4000


def test_frozen_matches_official_and_freezes():
    ours = randomize(tiny("ssv2", frozen=True)).double().eval()
    c = CONFIGS["ssv2"]
    ref = RefUniFormerV2(16, 4, 24, 4, 4, c["temporal_downsample"], c["no_lmhra"], c["return_list"], 7, frozen=True)
    ref.double().eval().load_state_dict(ours.state_dict(), strict=True)
    x = video(2, 8)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=0, atol=1e-10)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.dec.", "transformer.dpe.", "transformer.proj.",
                                           "transformer.temporal_cls_token")) for n in trainable)


def test_zero_inits_as_published():
    m = tiny("ssv2")
    t = m.transformer
    for block in t.resblocks:
        for lmhra in (block.lmhra1, block.lmhra2):
            assert not lmhra.pos_embed[3].weight.any() and not lmhra.pos_embed[3].bias.any()
    for dec, dpe in zip(t.dec, t.dpe):
        assert not dec.attn.out_proj.weight.any() and not dec.attn.out_proj.bias.any()
        assert not dec.mlp.c_proj.weight.any() and not dec.mlp.c_proj.bias.any()
        assert not dpe.bias.any() and dpe.weight.any()
    assert not t.temporal_cls_token.any() and not t.balance.any()
    lns = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert lns and all(ln.eps == 1e-5 for ln in lns)
    assert all(isinstance(b.ln_1, uv2.LayerNorm) for b in t.resblocks)
    assert m.data_config.mean == (0.45,) * 3 and m.data_config.std == (0.225,) * 3


def test_bad_input_names_the_argument():
    m = tiny("kinetics").eval()
    with pytest.raises(ValueError, match="H = W = 16"):
        m(torch.randn(1, 3, 4, 16, 12))
    with pytest.raises(ValueError, match=r"clips\[1\]"):
        m.forward_packed([torch.randn(3, 4, 16, 16), torch.randn(4, 16, 16)])


# ----------------------------------------------------------------------------------------------------------------
# Official keys and shapes for every registered size (built on the meta device)

COUNTS = {  # entries in the state dict, parameters (M) with the default head (400 classes; 174 for SSv2)
    "uniformerv2_base_patch16_224": (219, 114.55),
    "uniformerv2_base_patch16_224_ssv2": (547, 162.99),
    "uniformerv2_large_patch14_224": (363, 354.10),
    "uniformerv2_large_patch14_224_ssv2": (1083, 573.95),
    "uniformerv2_large_patch14_336": (363, 354.43),
    "uniformerv2_large_patch14_336_ssv2": (1083, 574.28),
}
OFFICIAL = {  # img, patch, width, layers, heads, temporal_downsample, no_lmhra, return_list, classes
    "uniformerv2_base_patch16_224": (224, 16, 768, 12, 12, False, True, [8, 9, 10, 11], 400),
    "uniformerv2_base_patch16_224_ssv2": (224, 16, 768, 12, 12, True, False, list(range(4, 12)), 174),
    "uniformerv2_large_patch14_224": (224, 14, 1024, 24, 16, False, True, list(range(20, 24)), 400),
    "uniformerv2_large_patch14_224_ssv2": (224, 14, 1024, 24, 16, True, False, list(range(8, 24)), 174),
    "uniformerv2_large_patch14_336": (336, 14, 1024, 24, 16, False, True, list(range(20, 24)), 400),
    "uniformerv2_large_patch14_336_ssv2": (336, 14, 1024, 24, 16, True, False, list(range(8, 24)), 174),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_official_keys_and_shapes(name):
    with torch.device("meta"):
        ours = getattr(uv2, name)()
        ref = RefUniFormerV2(*OFFICIAL[name])
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    entries, millions = COUNTS[name]
    assert len(got) == entries
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 2) == millions
    ssv2 = name.endswith("ssv2")
    assert ours.data_config.num_frames == (16 if ssv2 else 8)
    assert ours.recipe["lr"] == (4e-5 if ssv2 else 1e-5) and ours.recipe["sampling"] == "segment"
    assert (ours.recipe["backbone_drop_path_rate"], ours.recipe["drop_path_rate"]) == ((0.2, 0.4) if ssv2 else (0, 0))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_strict_load_of_an_official_checkpoint(tmp_path):
    src = randomize(tiny("ssv2")).eval()
    path = tmp_path / "uniformerv2.pyth"
    torch.save({"model_state": {"backbone." + k: v for k, v in src.state_dict().items()}}, path)
    dst = create_model("uniformerv2_base_patch16_224_ssv2", pretrained=path, **TINY,
                       return_list=CONFIGS["ssv2"]["return_list"]).eval()  # registered name, shrunk
    x = video(1, 8, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    bad = {"backbone." + k: v for k, v in src.state_dict().items()}
    bad["backbone.transformer.dec.0.attn.out_proj.wieght"] = bad.pop("backbone.transformer.dec.0.attn.out_proj.weight")
    with pytest.raises(RuntimeError, match=r"transformer\.dec\.0\.attn\.out_proj\.wieght"):
        load_checkpoint(tiny("ssv2"), bad)
    wrong = dict(src.state_dict(), **{"transformer.proj.2.weight": torch.zeros(5, 24)})
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer\.proj\.2\.weight"):
        load_checkpoint(tiny("ssv2"), wrong)


def test_k710_head_maps_to_k400_by_the_first_rows():
    src = randomize(tiny("kinetics", num_classes=710))
    dst = load_checkpoint(tiny("kinetics", num_classes=400), src.state_dict())
    assert torch.equal(dst.transformer.proj[2].weight, src.transformer.proj[2].weight[:400])
    assert torch.equal(dst.transformer.proj[2].bias, src.transformer.proj[2].bias[:400])


# ----------------------------------------------------------------------------------------------------------------
# CLIP import, checked against Hugging Face's own CLIPVisionModel


def hf_clip_vision(seed=3, image_size=16):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=24, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                              image_size=image_size, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    with torch.no_grad():  # move every weight off its initial value (LayerNorms at 1/0, zero biases)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def openai_layout(hf_state: dict) -> dict:
    """The same weights as the clip package's state dict names them (``visual.*``, fused in_proj), with a text-side
    key and the output projection a full CLIP has."""
    s = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
    out = {"visual.conv1.weight": s["embeddings.patch_embedding.weight"],
           "visual.class_embedding": s["embeddings.class_embedding"],
           "visual.positional_embedding": s["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": s["pre_layrnorm.weight"], "visual.ln_pre.bias": s["pre_layrnorm.bias"],
           "visual.ln_post.weight": s["post_layernorm.weight"], "visual.ln_post.bias": s["post_layernorm.bias"],
           "visual.proj": torch.randn(24, 16), "logit_scale": torch.ones(()),
           "token_embedding.weight": torch.randn(9, 16)}
    for i in range(4):
        a, b = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + "attn.in_proj_" + kind] = torch.cat([s[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[b + "attn.out_proj." + kind] = s[a + "self_attn.out_proj." + kind]
            out[b + "ln_1." + kind] = s[a + "layer_norm1." + kind]
            out[b + "ln_2." + kind] = s[a + "layer_norm2." + kind]
            out[b + "mlp.c_fc." + kind] = s[a + "mlp.fc1." + kind]
            out[b + "mlp.c_proj." + kind] = s[a + "mlp.fc2." + kind]
    return out


def torchscript_archive(state: dict, path):
    """A TorchScript archive holding ``state`` under its dotted names, as the clip package's ViT-B-16.pt does."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone()))
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(root), str(path))
    return path


def frame_hidden_states(model: uv2.UniFormerV2, x: torch.Tensor) -> list[torch.Tensor]:
    """Tokens of every frame after ln_pre and after each backbone block."""
    out = []
    hooks = [model.ln_pre.register_forward_hook(lambda m, i, o: out.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: out.append(o)) for b in model.transformer.resblocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_clip_import_matches_hugging_face(tmp_path):
    hf = hf_clip_vision()
    hf.save_pretrained(tmp_path / "vision")
    ours = tiny("kinetics").load_clip(tmp_path / "vision").double().eval()
    x = video(2, 3)
    frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B * T, 3, H, W]
    with torch.no_grad():
        want = hf.double()(pixel_values=frames, output_hidden_states=True).hidden_states
    got = frame_hidden_states(ours, x)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-12 * w.abs().max().item()
    # The UniFormerV2 parts keep their initialization.
    assert not ours.transformer.dec[0].attn.out_proj.weight.any()


def test_clip_import_formats_agree(tmp_path):
    hf = hf_clip_vision()
    hf.save_pretrained(tmp_path / "vision")
    from transformers import CLIPConfig, CLIPModel

    full = CLIPModel(CLIPConfig(vision_config=hf.config.to_dict(),
                                text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2)))
    full.vision_model.load_state_dict(hf.state_dict())
    full.save_pretrained(tmp_path / "full")
    openai = openai_layout(hf.state_dict())
    torch.save(openai, tmp_path / "open_clip.pt")
    torchscript_archive(openai, tmp_path / "ViT-tiny.pt")
    sources = [tmp_path / "vision", tmp_path / "full", tmp_path / "full" / "model.safetensors",
               tmp_path / "open_clip.pt", tmp_path / "ViT-tiny.pt", {"state_dict": openai}]
    states = []
    for source in sources:
        torch.manual_seed(0)  # the same initialization for the parts CLIP does not fill
        states.append(tiny("kinetics").load_clip(source).state_dict())
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)


def test_clip_inflation_and_resampling():
    hf = hf_clip_vision()
    state = openai_layout(hf.state_dict())
    model = uv2.UniFormerV2(img_size=24, patch_size=4, width=24, layers=4, heads=4, num_classes=7,
                            temporal_downsample=True, no_lmhra=False, return_list=[3]).load_clip(state)
    conv = model.conv1.weight
    assert conv.shape == (24, 3, 3, 4, 4)
    assert torch.equal(conv[:, :, 1], state["visual.conv1.weight"])
    assert not conv[:, :, 0].any() and not conv[:, :, 2].any()
    pos = model.positional_embedding
    assert pos.shape == (37, 24) and torch.equal(pos[0], state["visual.positional_embedding"][0])
    grid = state["visual.positional_embedding"][1:].reshape(1, 4, 4, 24).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 24)
    assert torch.allclose(pos[1:], want, atol=1e-6)
    with pytest.raises(ValueError, match="no CLIP vision weights"):
        model.load_clip({"foo": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------
# Packed clips


@pytest.mark.parametrize("config", ["kinetics", "ssv2"])
def test_forward_packed_equals_each_clip_alone(config):
    model = randomize(tiny(config)).double().eval()
    clips = [video(1, t, seed=t)[0] for t in (4, 8, 12)]
    with torch.no_grad():
        packed = model.forward_packed(clips)
        alone = torch.cat([model(c[None]) for c in clips])
        same = model.forward_packed([clips[1], clips[1]])
    assert packed.shape == (3, TINY["num_classes"])
    assert (packed - alone).abs().max().item() <= 1e-10 * alone.abs().max().item()
    assert torch.allclose(same, alone[1:2].expand(2, -1), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("config", ["kinetics", "ssv2"])
def test_backward_reaches_every_part(config):
    model = randomize(tiny(config, backbone_drop_path_rate=0.2, drop_path_rate=0.4)).train()
    x = video(4, 8, dtype=torch.float32)
    F.cross_entropy(model(x), torch.tensor([1, 5, 0, 6])).backward()  # no in-place error with drop path on
    params = dict(model.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())

    def reached(part):  # some gradient arrives at the part (drop path may zero single branches)
        grads = [p.grad.abs().sum() for n, p in params.items() if part in n]
        return bool(grads) and sum(grads) > 0

    for part in ("transformer.dec.", "transformer.dpe.", "transformer.balance", "transformer.temporal_cls_token",
                 "transformer.resblocks.", "conv1."):
        assert reached(part), part
    assert reached(".lmhra1.") and reached(".lmhra2.") if config == "ssv2" else not any(".lmhra" in n for n in params)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny("ssv2")).double().eval()  # eval: no dropout, so both runs are deterministic
    x = video(1, 8)

    def grads(use):
        model.transformer.use_checkpoint, model.transformer.checkpoint_num = use, 2
        model.zero_grad()
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_training_step_on_real_clips_lowers_the_loss(sample_clips):
    from pyvidfast.io import decode_frames

    paths = sorted(sample_clips.values())[:2]
    clips = torch.stack([decode_frames(p, 8, stride=4, size=(32, 32)) for p in paths])  # [B, T, H, W, 3]
    mean = torch.tensor(uv2.MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(uv2.STD).view(1, 3, 1, 1, 1)
    x = (clips.permute(0, 4, 1, 2, 3).float() / 255 - mean) / std
    model = uv2.UniFormerV2(img_size=32, patch_size=8, width=32, layers=3, heads=4, num_classes=5,
                            temporal_downsample=True, no_lmhra=False, return_list=[1, 2],
                            backbone_drop_path_rate=0.1, drop_path_rate=0.1).train()
    labels = torch.tensor([0, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x), labels).item()
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), labels).item()
    assert after < before


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import importlib.util
spec = importlib.util.spec_from_file_location("test_uniformerv2", sys.argv[2])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
ddp_case = helpers.ddp_case
dist.init_process_group("gloo")
rank = dist.get_rank()
for config in ("kinetics", "ssv2"):
    model, x, labels = ddp_case(config)
    half = slice(2 * rank, 2 * rank + 2)
    ddp = DistributedDataParallel(model)  # kept alive: its hooks average the gradients during backward
    F.cross_entropy(ddp(x[half]), labels[half]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{sys.argv[1]}/{config}.pt")
dist.destroy_process_group()
"""


def ddp_case(config):
    """A deterministic training step: dropout off, BN on its running statistics (not synchronized across ranks)."""
    n = len(CONFIGS[config]["return_list"])
    model = randomize(tiny(config, mlp_dropout=[0.0] * n, cls_dropout=0.0)).double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eval()
    return model, video(4, 8), torch.tensor([1, 5, 0, 6])


def test_torchrun_two_processes_match_one(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    # The child loads this file by its path; tests/ on its path lets that find reference_uniformerv2.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), __file__]
    child = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"torchrun failed ({child.returncode}):\n{child.stderr[-6000:]}"
    for config in ("kinetics", "ssv2"):
        model, x, labels = ddp_case(config)
        F.cross_entropy(model(x), labels).backward()
        two = torch.load(tmp_path / f"{config}.pt", weights_only=True)
        for name, p in model.named_parameters():
            torch.testing.assert_close(two[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
