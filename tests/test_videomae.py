import math

import pytest
import torch
import torch.nn.functional as F

from pyvidfast.io import decode_frames
from bench.model import compare_dense_packed
from pyvidfast.models import create_model, load_checkpoint
from pyvidfast.models.layers import normalize_video
from pyvidfast.models.videomae import PretrainVisionTransformer, VisionTransformer


# Published sizes: width, depth, heads, patch, MLP hidden, decoder (width, heads, MLP hidden), decoder output.
OFFICIAL = {
    "small": (384, 12, 6, 16, 1536, (192, 3, 768), 1536),
    "base": (768, 12, 12, 16, 3072, (384, 6, 1536), 1536),
    "large": (1024, 24, 16, 16, 4096, (512, 8, 2048), 1536),
    "huge": (1280, 32, 16, 16, 5120, (512, 8, 2048), 1536),
    "giant": (1408, 40, 16, 14, 6144, (512, 8, 2234), 1176),
}


def official_block_shapes(prefix: str, width: int, hidden: int) -> dict:
    """Keys and shapes of one official block (modeling_finetune.Block with qkv_bias=True, init_values=0)."""
    return {
        f"{prefix}norm1.weight": (width,), f"{prefix}norm1.bias": (width,),
        f"{prefix}attn.q_bias": (width,), f"{prefix}attn.v_bias": (width,),
        f"{prefix}attn.qkv.weight": (3 * width, width),
        f"{prefix}attn.proj.weight": (width, width), f"{prefix}attn.proj.bias": (width,),
        f"{prefix}norm2.weight": (width,), f"{prefix}norm2.bias": (width,),
        f"{prefix}mlp.fc1.weight": (hidden, width), f"{prefix}mlp.fc1.bias": (hidden,),
        f"{prefix}mlp.fc2.weight": (width, hidden), f"{prefix}mlp.fc2.bias": (width,),
    }


def official_finetune_shapes(width, depth, patch, hidden, num_classes=400, tubelet=2) -> dict:
    shapes = {"patch_embed.proj.weight": (width, 3, tubelet, patch, patch), "patch_embed.proj.bias": (width,)}
    for i in range(depth):
        shapes.update(official_block_shapes(f"blocks.{i}.", width, hidden))
    shapes.update({"fc_norm.weight": (width,), "fc_norm.bias": (width,), "head.weight": (num_classes, width),
                   "head.bias": (num_classes,)})
    return shapes


def official_pretrain_shapes(size: str) -> dict:
    width, depth, _, patch, hidden, (dec_width, _, dec_hidden), out = OFFICIAL[size]
    encoder = official_finetune_shapes(width, depth, patch, hidden)
    shapes = {f"encoder.{k}": v for k, v in encoder.items() if not k.startswith(("fc_norm", "head"))}
    shapes.update({"encoder.norm.weight": (width,), "encoder.norm.bias": (width,)})
    for j in range(4):
        shapes.update(official_block_shapes(f"decoder.blocks.{j}.", dec_width, dec_hidden))
    shapes.update({"decoder.norm.weight": (dec_width,), "decoder.norm.bias": (dec_width,),
                   "decoder.head.weight": (out, dec_width), "decoder.head.bias": (out,),
                   "encoder_to_decoder.weight": (dec_width, width), "mask_token": (1, 1, dec_width)})
    return shapes


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_official_keys_and_shapes(size):
    width, depth, heads, patch, hidden, _, _ = OFFICIAL[size]
    with torch.device("meta"):
        model = create_model(f"videomae_vit_{size}_patch{patch}_224")
        pretrain = create_model(f"pretrain_videomae_{size}_patch{patch}_224")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_finetune_shapes(width, depth, patch, hidden)
    got = {k: tuple(v.shape) for k, v in pretrain.state_dict().items()}
    assert got == official_pretrain_shapes(size)
    assert model.pos_embed.shape == (1, 2048 if patch == 14 else 1568, width)
    assert model.blocks[0].attn.num_heads == heads


def test_parameter_counts():
    with torch.device("meta"):
        small = create_model("videomae_vit_small_patch16_224")
        base_pretrain = create_model("pretrain_videomae_base_patch16_224")
    assert sum(p.numel() for p in small.parameters()) == 22_033_936  # official: 22.03M with a 400-class head
    assert round(sum(p.numel() for p in base_pretrain.parameters()) / 1e6, 2) == 94.21


# ------------------------------------------------------------------------------------------------------------
# Logits against an independent float64 reference of the official maths


def random_state(shapes: dict, generator: torch.Generator) -> dict:
    """Random official-layout state dict; LayerNorm weights around 1 and q/v biases non-zero so they matter."""
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator) * 0.2
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or "norm.weight" in key:
            value = 1.0 + value
        state[key] = value
    return state


def ref_sinusoid(n: int, d: int) -> torch.Tensor:
    table = torch.tensor([[p / math.pow(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)],
                         dtype=torch.float64)
    table[:, 0::2] = table[:, 0::2].sin()
    table[:, 1::2] = table[:, 1::2].cos()
    return table


def ref_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_block(x, s, prefix, heads, eps=1e-6):
    batch, tokens, width = x.shape
    h = ref_layer_norm(x, s[prefix + "norm1.weight"], s[prefix + "norm1.bias"], eps)
    bias = torch.cat([s[prefix + "attn.q_bias"], torch.zeros_like(s[prefix + "attn.q_bias"]), s[prefix + "attn.v_bias"]])
    qkv = (h @ s[prefix + "attn.qkv.weight"].T + bias).reshape(batch, tokens, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q = q * (width // heads) ** -0.5
    attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + out @ s[prefix + "attn.proj.weight"].T + s[prefix + "attn.proj.bias"]
    h = ref_layer_norm(x, s[prefix + "norm2.weight"], s[prefix + "norm2.bias"], eps)
    h = h @ s[prefix + "mlp.fc1.weight"].T + s[prefix + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ s[prefix + "mlp.fc2.weight"].T + s[prefix + "mlp.fc2.bias"]


def ref_embed(video, s, prefix, tubelet, patch):
    x = F.conv3d(video, s[prefix + "patch_embed.proj.weight"], s[prefix + "patch_embed.proj.bias"],
                 stride=(tubelet, patch, patch))
    x = x.flatten(2).transpose(1, 2)
    return x + ref_sinusoid(x.shape[1], x.shape[2])


def ref_classifier(video, s, depth, heads, tubelet=2, patch=8):
    s = {k: v.double() for k, v in s.items()}
    x = ref_embed(video.double(), s, "", tubelet, patch)
    for i in range(depth):
        x = ref_block(x, s, f"blocks.{i}.", heads)
    return ref_layer_norm(x.mean(1), s["fc_norm.weight"], s["fc_norm.bias"]) @ s["head.weight"].T + s["head.bias"]


TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_frames=4,
            num_classes=7)


def tiny_state(seed=0):
    return random_state(official_finetune_shapes(48, 2, 8, 96, num_classes=7), torch.Generator().manual_seed(seed))


def test_logits_match_reference_of_official_maths():
    state = tiny_state()
    model = load_checkpoint(VisionTransformer(**TINY), {"model": {f"module.{k}": v for k, v in state.items()}}).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        got = model(video)
    expected = ref_classifier(video, state, depth=2, heads=3)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_pretrain_model_matches_reference():
    gen = torch.Generator().manual_seed(3)
    shapes = {k: v for k, v in official_finetune_shapes(48, 2, 8, 96).items() if not k.startswith(("fc_norm", "head"))}
    state = {f"encoder.{k}": v for k, v in shapes.items()}
    state.update({"encoder.norm.weight": (48,), "encoder.norm.bias": (48,), "decoder.norm.weight": (32,),
                  "decoder.norm.bias": (32,), "decoder.head.weight": (384, 32), "decoder.head.bias": (384,),
                  "encoder_to_decoder.weight": (32, 48), "mask_token": (1, 1, 32)})
    state.update(official_block_shapes("decoder.blocks.0.", 32, 64))
    state = random_state(state, gen)
    model = PretrainVisionTransformer(img_size=32, patch_size=8, encoder_embed_dim=48, encoder_depth=2,
                                      encoder_num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                                      decoder_num_heads=2, mlp_ratio=2.0, num_frames=4)
    load_checkpoint(model, state).eval()
    from pyvidfast.train.tasks.videomae import dual_masks

    mask, decode_mask = dual_masks([1, 2], model.grid, 0.75, 0.5)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        got = model(video, mask, decode_mask)
    s = {k: v.double() for k, v in state.items()}
    x = ref_embed(video.double(), s, "encoder.", 2, 8)
    expected = []
    for b in range(2):
        h = x[b:b + 1, ~mask[b]]
        for i in range(2):
            h = ref_block(h, s, f"encoder.blocks.{i}.", 3)
        h = ref_layer_norm(h, s["encoder.norm.weight"], s["encoder.norm.bias"]) @ s["encoder_to_decoder.weight"].T
        pos = ref_sinusoid(32, 32)
        h = torch.cat([h + pos[~mask[b]], (s["mask_token"][0] + pos[~decode_mask[b]])[None]], dim=1)
        h = ref_block(h, s, "decoder.blocks.0.", 2)[:, -int((~decode_mask[b]).sum()):]
        h = ref_layer_norm(h, s["decoder.norm.weight"], s["decoder.norm.bias"])
        expected.append(h @ s["decoder.head.weight"].T + s["decoder.head.bias"])
    torch.testing.assert_close(got.double(), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_load_pretraining_checkpoint_into_classifier_and_errors():
    encoder = {f"encoder.{k}": v for k, v in tiny_state(1).items() if not k.startswith(("fc_norm", "head"))}
    encoder.update({"encoder.norm.weight": torch.ones(48), "encoder.norm.bias": torch.zeros(48),
                    "decoder.norm.weight": torch.ones(8), "mask_token": torch.zeros(1, 1, 8)})
    model = VisionTransformer(**TINY)
    head = model.head.weight.clone()
    load_checkpoint(model, encoder)
    assert torch.equal(model.blocks[1].attn.qkv.weight, encoder["encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(model.head.weight, head)  # the new head keeps its initialization
    other_head = tiny_state(2)
    other_head["head.weight"], other_head["head.bias"] = torch.zeros(3, 48), torch.zeros(3)
    with pytest.warns(UserWarning, match="head"):
        load_checkpoint(model, other_head)
    bad = tiny_state(2)
    bad["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        load_checkpoint(model, bad)
    missing = tiny_state(2)
    del missing["blocks.1.mlp.fc1.weight"]
    with pytest.raises(RuntimeError, match="missing"):
        load_checkpoint(model, missing)


def test_official_checkpoint_file_loads_strictly(tmp_path):
    state = tiny_state(4)
    path = tmp_path / "vit.pth"
    torch.save({"module": {f"_orig_mod.{k}": v for k, v in state.items()}}, path)
    model = create_model("videomae_vit_small_patch16_224", pretrained=str(path), **TINY)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.fc_norm.bias, state["fc_norm.bias"])


# ------------------------------------------------------------------------------------------------------------
# Hugging Face transformers


def _hf_config(**extra):
    from transformers import VideoMAEConfig

    return VideoMAEConfig(image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=48,
                          num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, num_labels=7,
                          decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=64, **extra)


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def test_hugging_face_classifier_parity(tmp_path):
    from transformers import VideoMAEForVideoClassification

    hf = VideoMAEForVideoClassification(_hf_config()).eval()
    _randomize(hf, 5)
    hf.save_pretrained(tmp_path)
    model = create_model("videomae_vit_small_patch16_224", pretrained=str(tmp_path), **TINY).eval()
    video = torch.randn(2, 4, 3, 32, 32)  # HF layout: B, T, C, H, W
    with torch.no_grad():
        expected = hf(pixel_values=video).logits
        got = model(video.transpose(1, 2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The same weights with the official epsilons (1e-6) differ only slightly.
    official_eps = load_checkpoint(VisionTransformer(**TINY), tmp_path, apply_config=False).eval()
    with torch.no_grad():
        assert (official_eps(video.transpose(1, 2)) - expected).abs().max() < 1e-2


def test_hugging_face_pretraining_parity(tmp_path):
    from transformers import VideoMAEForPreTraining

    # Pretraining checkpoints on the hub use use_mean_pooling=False, which gives the encoder its final norm.
    hf = VideoMAEForPreTraining(_hf_config(layer_norm_eps=1e-6, use_mean_pooling=False)).eval()
    _randomize(hf, 6)
    hf.save_pretrained(tmp_path)
    model = PretrainVisionTransformer(img_size=32, patch_size=8, encoder_embed_dim=48, encoder_depth=2,
                                      encoder_num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                                      decoder_num_heads=2, mlp_ratio=2.0, num_frames=4)
    load_checkpoint(model, tmp_path).eval()
    from pyvidfast.train.tasks.videomae import tube_mask

    mask = torch.stack([tube_mask(model.grid, 0.75, torch.Generator().manual_seed(s)).flatten() for s in (0, 1)])
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=video, bool_masked_pos=mask).logits
        got = model(video.transpose(1, 2), mask)  # no decoder mask: V1, as HF
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Packed (RLT) path


@pytest.fixture(scope="module")
def real_clips(sample_clips):
    """Two real 8-frame 64x64 clips: a static tripod and a moving camera."""
    clips = [decode_frames(sample_clips[name], 8, start=0, stride=2, size=(64, 64))
             for name in ("balle-jbart.mp4", "bikes.mp4")]
    return torch.stack(clips)


def _tiny_rlt_model(**extra):
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_frames=8,
                             num_classes=5, init_scale=1.0, **extra).eval()


def test_packed_with_every_token_equals_dense(real_clips):
    model = _tiny_rlt_model()
    with torch.no_grad():
        dense = model(normalize_video(real_clips))
        tokens = model.tokenize(real_clips, threshold=-1.0)  # negative threshold: nothing is dropped
        assert tokens.patches.shape[0] == 2 * model.patch_embed.num_patches
        packed = model(tokens)
    assert (packed - dense).abs().max() <= 1e-5


@pytest.mark.parametrize("length_embed", [False, True])
def test_packed_batch_equals_each_clip_alone(real_clips, length_embed):
    model = _tiny_rlt_model(use_length_embed=length_embed)
    with torch.no_grad():
        tokens = model.tokenize(real_clips)
        kept = (tokens.cu_seqlens[1:] - tokens.cu_seqlens[:-1]).tolist()
        assert kept[0] < model.patch_embed.num_patches  # RLT dropped something on the static clip
        batch = model(tokens)
        alone = torch.cat([model(model.tokenize(real_clips[i:i + 1])) for i in range(2)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_forward_packed_clips_of_any_shape(real_clips):
    """A list of clips of different shapes: one row per clip, each equal to the official model built for its shape
    (same weights; the position table of fewer positions is a prefix), packed or dense."""
    model = _tiny_rlt_model()
    small = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_frames=4,
                              num_classes=5).eval()
    small.load_state_dict(model.state_dict(), strict=True)
    clips = [real_clips[0], real_clips[1, 2:6, 16:48, 8:40].contiguous(), real_clips[1]]
    with torch.no_grad():
        packed = model.forward_packed(clips)
        expected = torch.cat([model(model.tokenize(clips[0][None])), small(small.tokenize(clips[1][None])),
                              model(model.tokenize(clips[2][None]))])
        everything = model.forward_packed(clips[1:2], threshold=-1.0)
        dense = small(normalize_video(clips[1][None]))
    assert packed.shape == (3, 5)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(everything, dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"clips\[0\]: .* more tokens"):
        model.forward_packed([torch.zeros(16, 64, 64, 3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="at least one clip"):
        model.forward_packed([])


def test_compare_dense_packed(real_clips):
    model = _tiny_rlt_model()
    total = model.patch_embed.num_patches
    everything = compare_dense_packed(model, real_clips, threshold=-1.0, repeats=2)  # RLT keeps every token
    assert everything["tokens_kept"] == [total, total] and everything["share_kept"] == 1.0
    assert everything["dense_logits"].shape == (2, 5)
    torch.testing.assert_close(everything["packed_logits"], everything["dense_logits"], atol=1e-5, rtol=1e-5)
    result = compare_dense_packed(model, real_clips, repeats=2)  # the default threshold drops static tokens
    assert sum(result["tokens_kept"]) < 2 * total and 0 < result["share_kept"] < 1
    assert result["tokens_per_clip"] == total
    with torch.no_grad():
        torch.testing.assert_close(result["dense_logits"], model(normalize_video(real_clips)), atol=0, rtol=0)
        torch.testing.assert_close(result["packed_logits"], model(model.tokenize(real_clips)), atol=0, rtol=0)
    assert result["dense_ms"] > 0 and result["packed_ms"] > 0
    assert result["speedup"] == pytest.approx(result["dense_ms"] / result["packed_ms"])


def test_packed_gradients_equal_dense_with_every_token(real_clips):
    model = _tiny_rlt_model()
    model(normalize_video(real_clips)).square().sum().backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(model.tokenize(real_clips, threshold=-1.0)).square().sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, dense[name], atol=1e-5, rtol=1e-4, msg=name)
