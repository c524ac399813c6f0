"""Shared model layers, the registry and checkpoint loader, and whole-model torch.compile against eager."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyvidfast.models import DataConfig, Packing, create_model, list_models, load_checkpoint, read_state_dict
from pyvidfast.models import registry
from pyvidfast.models.fluxvit import FluxViT
from pyvidfast.models.layers import (Attention, DropPath, LayerScale, Mlp, PatchEmbed, RMSNorm, attention,
                                     normalize_video)
from pyvidfast.models.videomae import PretrainVisionTransformer, VisionTransformer
from pyvidfast.ops import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import requires_cuda_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda_kernels)]


def ref_attention(q, k, v):
    """float64 softmax attention of one sequence: [N, H, D] -> [N, H, D]."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


# --- Packing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_packing_bounds_mean_and_split(device):
    lengths = [3, 0, 7, 2]
    packing = Packing.from_lengths(lengths, device)
    assert packing.cu_seqlens.dtype == torch.int32 and packing.cu_seqlens.tolist() == [0, 3, 3, 10, 12]
    assert packing.max_seqlen == 7 and packing.num_clips == 4
    assert packing.clip_of_token.dtype == torch.int64
    assert packing.clip_of_token.tolist() == [0] * 3 + [2] * 7 + [3] * 2
    x = torch.randn(12, 5, dtype=torch.float64, device=device)
    expected = torch.stack([x[:3].mean(0), x.new_zeros(5), x[3:10].mean(0), x[10:].mean(0)])
    torch.testing.assert_close(packing.mean(x), expected)
    assert [t.shape[0] for t in packing.split(x)] == lengths
    assert torch.equal(torch.cat(packing.split(x)), x)
    again = Packing.from_cu_seqlens(packing.cu_seqlens, 7)
    assert torch.equal(again.clip_of_token, packing.clip_of_token) and again.num_clips == 4
    assert [t.shape[0] for t in again.split(x)] == lengths


# --- attention ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_attention_dense_and_packed_against_reference(device):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 3, 8, generator=gen).to(device) for _ in range(3))
    dense = attention(q, k, v)
    assert dense.shape == (2, 9, 3, 8)
    for b in range(2):
        torch.testing.assert_close(dense[b].double(), ref_attention(q[b], k[b], v[b]), atol=1e-5, rtol=1e-5)
    lengths = [5, 1, 11]
    packing = Packing.from_lengths(lengths, device)
    qp, kp, vp = (torch.randn(17, 3, 8, generator=gen).to(device) for _ in range(3))
    packed = attention(qp, kp, vp, packing)
    assert packed.shape == (17, 3, 8)
    for (s, e) in zip(packing.cu_seqlens[:-1].tolist(), packing.cu_seqlens[1:].tolist()):
        torch.testing.assert_close(packed[s:e].double(), ref_attention(qp[s:e], kp[s:e], vp[s:e]), atol=1e-5,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="q: expected packed"):
        attention(q, k, v, packing)
    with pytest.raises(ValueError, match="q: expected dense"):
        attention(qp, kp, vp)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        attention(qp, kp, vp, packing, dropout_p=0.1)


@pytest.mark.parametrize("bias", ["qv", "qkv", "none"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_module_packed_equals_dense(bias, qk_norm):
    attn = Attention(24, 3, qkv_bias=bias == "qkv", qv_bias=bias == "qv", qk_norm=qk_norm).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # zero-initialized biases too
    names = {n for n, _ in attn.named_parameters()}
    assert ("q_bias" in names and "v_bias" in names) == (bias == "qv")
    assert ("qkv.bias" in names) == (bias == "qkv")
    assert ("q_norm.weight" in names) == qk_norm
    clips = [torch.randn(n, 24) for n in (6, 2, 9)]
    with torch.no_grad():
        packed = attn(torch.cat(clips), Packing.from_lengths([6, 2, 9]))
        single = torch.cat([attn(c[None])[0] for c in clips])
        # An independent float64 computation from the parameters.
        x = torch.cat(clips).double()
        p = {n: t.double() for n, t in attn.state_dict().items()}
        zeros = torch.zeros(24, dtype=torch.float64)
        b = {"qv": torch.cat([p.get("q_bias", zeros), zeros, p.get("v_bias", zeros)]), "qkv": p.get("qkv.bias"),
             "none": None}[bias]
        q, k, v = F.linear(x, p["qkv.weight"], b).chunk(3, dim=-1)
        if qk_norm:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * p["q_norm.weight"]
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * p["k_norm.weight"]
        heads = [t.view(-1, 3, 8) for t in (q, k, v)]
        out = torch.cat([ref_attention(*(h[s:e] for h in heads)) for s, e in ((0, 6), (6, 8), (8, 17))])
        expected = F.linear(out.reshape(-1, 24), p["proj.weight"], p["proj.bias"])
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        Attention(24, 5)


# --- token-wise layers ----------------------------------------------------------------------------------------------


def test_drop_path_drops_whole_clips_on_packed_input():
    drop = DropPath(0.5).train()
    packing = Packing.from_lengths([3, 7, 2])
    cu = packing.cu_seqlens
    seen = set()
    for _ in range(20):
        out = drop(torch.ones(12, 4), packing)
        for b in range(3):
            clip = out[cu[b]:cu[b + 1]]
            assert torch.all(clip == clip[0, 0]) and float(clip[0, 0]) in (0.0, 2.0)
            seen.add(float(clip[0, 0]))
    assert seen == {0.0, 2.0}
    dense = drop(torch.ones(4, 5, 3))
    assert all(torch.all(row == row[0, 0]) for row in dense)
    assert torch.equal(drop.eval()(torch.ones(12, 4), packing), torch.ones(12, 4))


def test_rmsnorm_layerscale_mlp_against_reference():
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    norm = RMSNorm(10)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(10))
    x64 = x.double()
    expected = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).double()
    torch.testing.assert_close(norm(x).double(), norm.weight.double() * expected, atol=1e-6, rtol=1e-6)
    scale = LayerScale(10, 0.5, force_fp32=True)
    assert scale(x).dtype == torch.bfloat16
    torch.testing.assert_close(scale(x).float(), (x.float() * 0.5).bfloat16().float())
    torch.testing.assert_close(LayerScale(10, 0.25)(x.float()), x.float() * 0.25)
    mlp = Mlp(10, 16, out_features=3).eval()
    y = torch.randn(5, 10)
    expected = F.linear(F.gelu(F.linear(y.double(), mlp.fc1.weight.double(), mlp.fc1.bias.double())),
                        mlp.fc2.weight.double(), mlp.fc2.bias.double())
    torch.testing.assert_close(mlp(y).double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embed_conv_equals_linear_on_patches(channels_last):
    embed = PatchEmbed(12, patch_size=4, tubelet_size=2, img_size=8, num_frames=6)
    assert embed.grid == (3, 2, 2) and embed.num_patches == 12
    video = torch.randn(2, 3, 6, 8, 12)  # not square: the grid comes from the input
    tokens = embed(video)
    assert tokens.shape == (2, 3 * 2 * 3, 12)
    patches = embed.patchify(video, channels_last)
    torch.testing.assert_close(embed.embed_patches(patches, channels_last), tokens, atol=1e-5, rtol=1e-5)
    # One patch by hand: token (t=1, h=0, w=2), pixels in the chosen order.
    block = video[0, :, 2:4, 0:4, 8:12]
    flat = block.permute(1, 2, 3, 0).reshape(-1) if channels_last else block.reshape(-1)
    torch.testing.assert_close(patches[0, (1 * 2 + 0) * 3 + 2], flat)
    with pytest.raises(ValueError, match="multiples"):
        PatchEmbed(12, patch_size=5, img_size=8, num_frames=6)


def test_normalize_video_and_data_config():
    video = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    x = normalize_video(video)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    torch.testing.assert_close(x[0], (video[0].permute(3, 0, 1, 2).float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="video: expected uint8"):
        normalize_video(video.float())
    config = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_frames=4).data_config
    assert config == DataConfig(IMAGENET_MEAN, IMAGENET_STD, num_frames=4, img_size=32, tubelet_size=2, patch_size=8)
    with pytest.raises(AttributeError):
        config.img_size = 64  # frozen
    flux = FluxViT(embed_dim=32, depth=1, num_heads=2, attn_pool_num_heads=2, clip_embed_dim=16, img_size=28,
                   num_frames=4, num_classes=3).data_config
    assert (flux.num_frames, flux.img_size, flux.tubelet_size, flux.patch_size) == (4, 28, 1, 14)
    pretrain = PretrainVisionTransformer(img_size=32, patch_size=8, encoder_embed_dim=24, encoder_depth=1,
                                         encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                         decoder_num_heads=2, num_frames=4).data_config
    assert pretrain.img_size == 32 and pretrain.mean == IMAGENET_MEAN


# --- registry -----------------------------------------------------------------------------------------------------


def test_registry_finds_every_family():
    names = list_models()
    assert "videomae_vit_base_patch16_224" in names and "fluxvit_small_patch14" in names
    assert list_models("pretrain_videomae_*") == sorted(f"pretrain_videomae_{s}" for s in (
        "small_patch16_224", "base_patch16_224", "large_patch16_224", "huge_patch16_224", "giant_patch14_224"))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(registry._MODELS["fluxvit_small_patch14"])


TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_frames=4, num_classes=3)


def _random_vit():
    model = VisionTransformer(**TINY_VIT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _save_layouts(state, folder):
    """The same state dict in every layout the loader reads; returns the paths."""
    from safetensors.torch import save_file

    folder.mkdir()
    paths = {}
    for suffix in (".pth", ".pt", ".bin"):
        paths[suffix] = folder / f"ckpt{suffix}"
        torch.save({"model": state}, paths[suffix])
    paths["nested"] = folder / "nested.pth"
    torch.save({"model": {"module": state}, "epoch": 3}, paths["nested"])
    paths[".safetensors"] = folder / "ckpt.safetensors"
    save_file(state, paths[".safetensors"])
    names = sorted(state)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    shard_names = (("safetensors", "model-{:05d}-of-00002.safetensors"), ("bin", "pytorch_model-{:05d}-of-00002.bin"))
    for kind, fmt in shard_names:
        hf = folder / f"hf_sharded_{kind}"
        hf.mkdir()
        weight_map = {}
        for i, keys in enumerate(halves, 1):
            shard = {k: state[k].contiguous() for k in keys}
            if kind == "safetensors":
                save_file(shard, hf / fmt.format(i))
            else:
                torch.save(shard, hf / fmt.format(i))
            weight_map.update({k: fmt.format(i) for k in keys})
        index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        (hf / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        paths[f"sharded {kind}"] = hf
    single = folder / "hf_single"
    single.mkdir()
    save_file(state, single / "model.safetensors")
    paths["hf folder"] = single
    return paths


def test_loader_reads_every_layout(tmp_path):
    source = _random_vit()
    state = source.state_dict()
    for layout, path in _save_layouts(state, tmp_path / "ckpts").items():
        got = read_state_dict(path)
        assert set(got) == set(state), layout
        model = load_checkpoint(VisionTransformer(**TINY_VIT), path)
        for key, value in state.items():
            assert torch.equal(model.state_dict()[key], value), (layout, key)
        created = create_model("videomae_vit_small_patch16_224", pretrained=path, **TINY_VIT)
        assert torch.equal(created.head.weight, state["head.weight"]), layout
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none"):
        read_state_dict(tmp_path / "empty")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .pth"):
        read_state_dict(tmp_path / "weights.npz")


def test_loader_is_strict_and_applies_filters(tmp_path):
    state = _random_vit().state_dict()
    extra = dict(state, **{"blocks.0.attn.extra": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.weight"}
    with pytest.raises(RuntimeError, match=r"missing keys \[\], unexpected keys \['blocks.0.attn.extra'\]"):
        load_checkpoint(VisionTransformer(**TINY_VIT), extra)
    with pytest.raises(RuntimeError, match=r"missing keys \['blocks.0.mlp.fc1.weight'\]"):
        load_checkpoint(VisionTransformer(**TINY_VIT), missing)
    relaxed = load_checkpoint(VisionTransformer(**TINY_VIT), missing, strict=False)
    assert torch.equal(relaxed.head.weight, state["head.weight"])
    # A filter given to register_model wins over the module's own.
    calls = []

    def renaming_filter(state_dict, model):
        calls.append(type(model).__name__)
        return {k.removeprefix("net."): v for k, v in state_dict.items()}

    @registry.register_model(checkpoint_filter_fn=renaming_filter)
    def _test_only_tiny_vit(**kwargs):
        return VisionTransformer(**{**TINY_VIT, **kwargs})

    try:
        path = tmp_path / "renamed.pth"
        torch.save({f"net.{k}": v for k, v in state.items()}, path)
        model = create_model("_test_only_tiny_vit", pretrained=path)
        assert calls == ["VisionTransformer"] and torch.equal(model.head.bias, state["head.bias"])
    finally:
        registry._MODELS.pop("_test_only_tiny_vit")
        registry._FILTERS.pop("_test_only_tiny_vit")


# --- whole models under torch.compile(fullgraph=True) ---------------------------------------------------------------
# Tiny configurations keep compile times short; each compiled output is compared with eager on the same weights.


def _tiny_videomae():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_frames=4,
                             num_classes=3, init_scale=1.0).eval()


def _tiny_flux():
    torch.manual_seed(0)
    model = FluxViT(embed_dim=32, depth=1, num_heads=2, attn_pool_num_heads=2, clip_embed_dim=16, img_size=28,
                    num_frames=4, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _video_with_static_patches():
    video = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    video[0, :, :16, :16] = video[0, :1, :16, :16]  # a static patch: RLT drops its second tubelet
    return video


def _compare_training_step(eager, compiled_model, forward_args, targets):
    """One cross-entropy step through the compiled module (its backward compiled by AOT autograd) against eager:
    the same loss (the dense forward) and the same gradients."""
    compiled = torch.compile(compiled_model, fullgraph=True)
    losses = []
    for model, forward in ((eager, eager), (compiled_model, compiled)):
        loss = F.cross_entropy(forward(*forward_args), targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    return compiled


def test_compile_videomae_dense_training_and_packed(fresh_dynamo):
    eager, model = _tiny_videomae().train(), _tiny_videomae().train()
    video = _video_with_static_patches()
    compiled = _compare_training_step(eager, model, (normalize_video(video),), torch.tensor([0, 2]))
    model.eval()
    with torch.no_grad():
        tokens = model.tokenize(video)
        assert tokens.patches.shape[0] < 2 * model.patch_embed.num_patches  # the packed path drops tokens
        # The longest clip (max_seqlen) comes from data: Dynamo captures it as an unbacked SymInt.
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            packed = compiled(model.tokenize(video))
        torch.testing.assert_close(packed, model(tokens), atol=1e-5, rtol=1e-5)


def test_compile_fluxvit_dense_training_and_packed(fresh_dynamo):
    eager, model = _tiny_flux().train(), _tiny_flux().train()
    video = torch.randn(2, 3, 4, 28, 28)
    _compare_training_step(eager, model, (video, 10, 1), torch.tensor([1, 2]))  # budget 10 of 16, head 1
    model.eval()
    clips = [torch.randn(3, 4, 28, 28), torch.randn(3, 2, 42, 42)]
    with torch.no_grad():
        packed = torch.compile(model.forward_packed, fullgraph=True)(clips, budgets=[10, None])
        torch.testing.assert_close(packed, model.forward_packed(clips, budgets=[10, None]), atol=1e-5, rtol=1e-5)
