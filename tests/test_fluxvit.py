"""FluxViT: official parameter layout, parity with the official forward's maths, budgets, packed == per clip."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyvidfast.io import VideoDataset, sampling
from pyvidfast.models import create_model, load_checkpoint
from pyvidfast.models.fluxvit import FluxViT, flux_num_groups, head_for_budget
from pyvidfast.ops import group_budgets, group_topk
from pyvidfast.train.tasks import fluxvit as flux
from pyvidfast.io import decode_frames

TINY = dict(embed_dim=64, depth=2, num_heads=4, attn_pool_num_heads=4, clip_embed_dim=32, img_size=56,
            num_frames=8, num_classes=5)


def official_shapes(c: int, depth: int, grid: int, classes: int, hidden: int) -> dict:
    """Every tensor of an official FluxViT state dict (models/fluxvit.py, non-flash and flash builds alike)."""
    shapes = {"cls_token": (1, 1, c), "pos_embed": (1, 1 + grid, c), "gpe_proj.depthwise_conv.weight": (c, 1, 1, 1, 1),
              "gpe_proj.depthwise_conv.bias": (c,), "patch_embed.proj.weight": (c, 3, 1, 14, 14),
              "patch_embed.proj.bias": (c,), "patch_embed.norm.weight": (c,), "patch_embed.norm_before.weight": (588,),
              "fc_norm.weight": (768,), "fc_norm.bias": (768,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {p + "norm1.weight": (c,), p + "attn.qkv.weight": (3 * c, c), p + "attn.proj.weight": (c, c),
                   p + "attn.proj.bias": (c,), p + "attn.lpe.depthwise_conv.weight": (c, 1, 1, 1, 1),
                   p + "attn.lpe.depthwise_conv.bias": (c,), p + "attn.q_norm.weight": (c,),
                   p + "attn.k_norm.weight": (c,), p + "ls1.gamma": (c,), p + "norm2.weight": (c,),
                   p + "mlp.fc1.weight": (hidden, c), p + "mlp.fc1.bias": (hidden,), p + "mlp.fc2.weight": (c, hidden),
                   p + "mlp.fc2.bias": (c,), p + "ls2.gamma": (c,)}
    for j in range(3):
        p = f"clip_projector.{j}."
        for n in ("q", "k", "v"):
            shapes |= {p + f"norm1_{n}.weight": (c,), p + f"norm1_{n}.bias": (c,),
                       p + f"cross_attn.{n}.weight": (c, c), p + f"cross_attn.{n}_bias": (c,)}
        shapes |= {p + "cross_attn.proj.weight": (768, c), p + "cross_attn.proj.bias": (768,),
                   f"head.{j}.weight": (classes, 768), f"head.{j}.bias": (classes,)}
    for j in range(2):
        p = f"final_clip_decoder_for_projs.{j}."
        shapes |= {p + "head.weight": (768, 768), p + "head.bias": (768,), p + "norm.weight": (768,),
                   p + "norm.bias": (768,)}
    return shapes


@pytest.mark.parametrize("name, c, grid, params", [("fluxvit_small_patch14", 384, 24 * 18 * 18, 28_845_948),
                                                   ("fluxvit_base_patch14", 768, 32 * 20 * 20, 104_560_380)])
def test_official_state_dict_layout(name, c, grid, params):
    model = create_model(name, num_classes=400)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(c, 12, grid, 400, 4 * c)
    assert sum(p.numel() for p in model.parameters()) == params  # 28.85 M / 104.56 M with K400 heads


def randomize(model: FluxViT) -> FluxViT:
    """Random weights everywhere (the init is near-inert: LayerScale 1e-5, identity affines, unit norms)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() >= 2 and "depthwise" not in name and name not in ("pos_embed", "cls_token"):
                p.copy_(r / p[0].numel() ** 0.5)
            elif name.endswith(("norm.weight", "norm_before.weight", "norm1.weight", "norm2.weight", "_q.weight",
                                "_k.weight", "_v.weight", "q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.5 * r)
    return model


# --- the official forward, re-derived step by step from OpenGVLab/FluxViT models/fluxvit.py, on a state dict ------

def ref_rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_depthwise(x5d, sd, prefix):
    w, b = sd[prefix + ".depthwise_conv.weight"], sd[prefix + ".depthwise_conv.bias"]
    return F.conv3d(x5d, w, b, groups=w.shape[0])


def ref_patch_embed(video, sd, p=14):
    b, _, t, h, w = video.shape
    x = video.permute(0, 2, 3, 4, 1)  # "b (t1 t2) (ht hp) (wt wp) c -> b (t1 ht wt) (t2 hp wp c)", t2 = 1
    x = x.reshape(b, t, 1, h // p, p, w // p, p, 3).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, p * p * 3)
    x = ref_rms(x, sd["patch_embed.norm_before.weight"])
    x = x.reshape(b, t, h // p, w // p, 1, p, p, 3).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, 3)
    x = F.conv3d(x.permute(0, 4, 1, 2, 3), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=(1, p, p))
    return ref_rms(x.flatten(3).permute(0, 2, 3, 1), sd["patch_embed.norm.weight"])


def ref_selection_mask(x, budget):
    """sparse_group_token_selection with masking_ratio = 1 - budget / (T L); stable argsort fixes tie order."""
    b, t, l, c = x.shape
    g = 4 if t % 4 == 0 else (1 if t == 2 else 2)
    v = x.reshape(b * g, t // g, l, c)
    tg = t // g
    distance = torch.norm(v[:, : tg - 1] - v[:, 1:], p=2, dim=3).float()  # the op ranks float32 scores
    importance = torch.cat((distance[:, 0, :], distance.flatten(1)), dim=1)
    ids_sorted = torch.argsort(importance, dim=1, descending=True, stable=True)
    keep = int((1 - (1 - budget / (t * l))) * (tg * l))
    assert keep * g == budget, "pick budgets the official float formula keeps exactly"
    mask = torch.ones(b * g, tg * l, dtype=x.dtype)
    mask[:, :keep] = 0
    return torch.gather(mask, 1, torch.argsort(ids_sorted, dim=1)).reshape(b, t * l).bool()


def ref_pos_embed(sd, t0, s0, t, s, c):
    pos = sd["pos_embed"][:, 1:].view(1, t0, s0, s0, c).permute(0, 4, 1, 2, 3)
    pos = ref_depthwise(pos, sd, "gpe_proj").permute(0, 2, 3, 4, 1).reshape(1, -1, c)
    if t != t0:
        pos = pos.view(1, t0, -1, c).permute(0, 2, 3, 1).reshape(-1, c, t0)
        pos = F.interpolate(pos, size=t, mode="linear").view(1, -1, c, t).permute(0, 3, 1, 2).reshape(1, -1, c)
    if s != s0:
        pos = pos.reshape(-1, s0, s0, c).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(s, s), mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(1, t, s, s, c).flatten(1, 3)
    return torch.cat((sd["pos_embed"][:, :1], pos), dim=1)


def ref_block(x, sd, i, heads):
    p = f"blocks.{i}."
    b, n, c = x.shape
    y = ref_rms(x, sd[p + "norm1.weight"])
    qkv = (y @ sd[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = ref_rms(q.transpose(1, 2).flatten(-2, -1), sd[p + "attn.q_norm.weight"]).view(b, n, heads, -1).transpose(1, 2)
    k = ref_rms(k.transpose(1, 2).flatten(-2, -1), sd[p + "attn.k_norm.weight"]).view(b, n, heads, -1).transpose(1, 2)
    lpe = v.permute(0, 2, 1, 3).reshape(b, n, -1).permute(0, 2, 1).reshape(b, c, 1, n, 1)
    v_lpe = ref_depthwise(lpe, sd, p + "attn.lpe").reshape(b, c, n).permute(0, 2, 1)
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    out = F.linear(out + v_lpe, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = x + out * sd[p + "ls1.gamma"]
    y = ref_rms(x, sd[p + "norm2.weight"])
    y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                 sd[p + "mlp.fc2.bias"])
    return x + y * sd[p + "ls2.gamma"]


def ref_head(x, sd, h, heads):
    p = f"clip_projector.{h}."
    b, n, c = x.shape

    def ln(y, name):
        return F.layer_norm(y, (c,), sd[p + name + ".weight"], sd[p + name + ".bias"], eps=1e-5)

    q = F.linear(ln(x.mean(1, keepdim=True), "norm1_q"), sd[p + "cross_attn.q.weight"], sd[p + "cross_attn.q_bias"])
    k = F.linear(ln(x, "norm1_k"), sd[p + "cross_attn.k.weight"], sd[p + "cross_attn.k_bias"])
    v = F.linear(ln(x, "norm1_v"), sd[p + "cross_attn.v.weight"], sd[p + "cross_attn.v_bias"])
    q, k, v = (y.reshape(b, -1, heads, c // heads).transpose(1, 2) for y in (q, k, v))
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    pooled = F.linear((attn @ v).transpose(1, 2).reshape(b, 1, c), sd[p + "cross_attn.proj.weight"],
                      sd[p + "cross_attn.proj.bias"]).squeeze(1)
    pooled = F.layer_norm(pooled, (pooled.shape[-1],), sd["fc_norm.weight"], sd["fc_norm.bias"])
    return F.linear(pooled, sd[f"head.{h}.weight"], sd[f"head.{h}.bias"])


def official_forward(sd, video, budget, head, cfg):
    c, heads, s0 = cfg["embed_dim"], cfg["num_heads"], cfg["img_size"] // 14
    x = ref_patch_embed(video, sd)
    b, t, l, _ = x.shape
    mask = ref_selection_mask(x, budget) if budget is not None and budget < t * l else None
    x = torch.cat((sd["cls_token"].expand(b, -1, -1), x.reshape(b, t * l, c)), dim=1)
    x = x + ref_pos_embed(sd, cfg["num_frames"], s0, t, int(l**0.5), c)
    if mask is not None:
        x = torch.cat((x[:, :1], x[:, 1:][~mask].view(b, -1, c)), dim=1)
    for i in range(cfg["depth"]):
        x = ref_block(x, sd, i, heads)
    return ref_head(x, sd, head, cfg["attn_pool_num_heads"])


@pytest.mark.parametrize("frames, size, budget, head", [
    (8, 56, 64, 1),  # native grid, 4 groups of 2 frames
    (8, 56, None, 0),  # all tokens
    (6, 70, 90, 2),  # resampled position grid (time and space), 2 groups
    (12, 42, 72, 0),  # 4 groups of 3 frames, smaller grid
])
def test_parity_with_official_maths(frames, size, budget, head):
    torch.manual_seed(0)
    model = randomize(FluxViT(**TINY).double()).eval()
    video = torch.randn(2, 3, frames, size, size, dtype=torch.float64)
    expected = official_forward(model.state_dict(), video, budget, head, TINY)
    torch.testing.assert_close(model(video, budget=budget, head=head), expected, rtol=1e-9, atol=1e-9)


def test_parity_on_a_real_clip_float32(sample_clips):
    model = randomize(FluxViT(**TINY)).eval()
    frames = decode_frames(sample_clips["bikes.mp4"], 8, stride=4, size=(56, 56))
    video = frames.permute(3, 0, 1, 2).float().div(255).sub(0.45).div(0.225).unsqueeze(0).repeat(2, 1, 1, 1, 1)
    video[1] = video[1].flip(-1)
    expected = official_forward({k: v.double() for k, v in model.state_dict().items()}, video.double(), 64, 1, TINY)
    with torch.no_grad():
        torch.testing.assert_close(model(video, budget=64, head=1).double(), expected, rtol=1e-3, atol=1e-3)


def test_budgets_exact_and_groups():
    model = FluxViT(**TINY).eval()
    for frames, budget in [(8, 100), (6, 77), (4, 33), (5, 41), (2, 31), (8, 128), (8, 500)]:
        video = torch.randn(2, 3, frames, 56, 56)
        tokens, indices = model.embed(video, budget)
        kept = min(budget, frames * 16)
        assert tokens.shape == (2, 1 + kept, 64)
        assert (indices is None) == (budget >= frames * 16)
    assert [flux_num_groups(t) for t in (2, 4, 5, 6, 8, 12, 24)] == [1, 2, 1, 2, 4, 4, 4]
    assert [head_for_budget(b) for b in (None, 4096, 3072, 2500, 2048, 1600, 1024, 512)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_load_official_checkpoint_layout(tmp_path):
    source = randomize(FluxViT(**TINY))
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save({"module": state}, tmp_path / "ckpt.pth")
    model = load_checkpoint(FluxViT(**TINY), tmp_path / "ckpt.pth")
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    # A checkpoint whose pos_embed has another grid (8 frames at 3x3) is resampled to the native 8 x 4 x 4.
    state = dict(source.state_dict(), pos_embed=torch.randn(1, 1 + 8 * 9, 64))
    load_checkpoint(model, state)
    assert model.pos_embed.shape == (1, 1 + 8 * 16, 64)
    with pytest.raises(RuntimeError, match=r"missing keys \['cls_token'\]"):
        load_checkpoint(model, {k: v for k, v in source.state_dict().items() if k != "cls_token"})


def test_packed_equals_per_clip():
    """Three clips of different lengths, resolutions and budgets, packed through varlen_attention."""
    model = randomize(FluxViT(**TINY)).eval()
    clips = [torch.randn(3, 8, 56, 56), torch.randn(3, 6, 70, 70), torch.randn(3, 4, 42, 42)]
    budgets = [64, 100, None]
    with torch.no_grad():
        packed = model.forward_packed(clips, budgets)
        single = torch.cat([model(v.unsqueeze(0), budget=b) for v, b in zip(clips, budgets)])
    torch.testing.assert_close(packed, single, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # no budgets: every clip keeps all its tokens
        everything = model.forward_packed(clips)
        single = torch.cat([model(v.unsqueeze(0)) for v in clips])
    torch.testing.assert_close(everything, single, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="budgets: expected one per clip"):
        model.forward_packed(clips, budgets=[64])
    model.train()
    model.forward_packed(clips, budgets, heads=[0, 1, 2]).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_training_step_backward():
    model = randomize(FluxViT(**TINY, drop_path_rate=0.2)).train()
    video = torch.randn(2, 3, 8, 56, 56)
    loss = model(video, budget=40, head=2).logsumexp(-1).mean()
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None and model.pos_embed.grad.abs().sum() > 0


# --- pyvidfast.train.tasks.fluxvit ------------------------------------------------------------------------------


def test_flexi_sampling():
    sampling = flux.FlexiSampling()
    settings = sampling.settings()
    assert all(2048 <= t * (r // 14) ** 2 <= 6144 and t % 2 == 0 and 6 <= t <= 24 and r % 28 == 0
               for t, r in settings)
    assert (8, 224) in settings and (24, 336) not in settings and (6, 112) not in settings
    g = torch.Generator().manual_seed(0)
    draws = {sampling.draw(g) for _ in range(200)}
    assert draws <= set(settings) and len(draws) > len(settings) // 2
    with pytest.raises(ValueError, match="no \\(frames, resolution\\)"):
        flux.FlexiSampling(min_tokens=10, max_tokens=20).draw()


def test_select_tokens_uses_the_group_rule():
    x = torch.randn(2, 6, 16, 8)
    assert torch.equal(flux.select_tokens(x, 50), group_topk(x, 2, 50))
    assert flux.select_tokens(x, 96) is None


def test_multi_budget_loss():
    model = randomize(FluxViT(**TINY)).train()
    video, targets = torch.randn(2, 3, 8, 56, 56), torch.tensor([1, 3])
    loss, logits, kept = flux.multi_budget_loss(model, video, targets, F.cross_entropy, budgets=(96, 64, 32))
    pooled = [model.pool(model.forward_tokens(video, b)[0], h) for h, b in enumerate((96, 64, 32))]
    align = sum(F.smooth_l1_loss(F.normalize(model.final_clip_decoder_for_projs[h - 1](pooled[h]), dim=-1),
                                 F.normalize(pooled[0], dim=-1)) for h in (1, 2))
    expected = sum(F.cross_entropy(model.classify(p, h), targets) for h, p in enumerate(pooled)) + align
    torch.testing.assert_close(loss, expected)
    assert kept == [96, 64, 32]  # of 8 x 4 x 4 = 128 patch tokens
    loss.backward()
    assert all(model.head[h].weight.grad is not None for h in range(3))


def test_teacher_token_map():
    # Student 8 x 4 x 4 (tubelet 1, patch 14) onto a teacher 4 x 2 x 2 (tubelet 2, patch 28 of the same clip).
    mapping = flux.teacher_token_map((8, 4, 4), (4, 2, 2))
    t, y, x = torch.meshgrid(torch.arange(8), torch.arange(4), torch.arange(4), indexing="ij")
    torch.testing.assert_close(mapping, ((t // 2 * 2 + y // 2) * 2 + x // 2).reshape(-1))
    assert torch.equal(flux.teacher_token_map((3, 5, 5), (3, 5, 5)), torch.arange(75))


def test_double_mask():
    x = torch.randn(2, 8, 16, 12)
    everything = torch.arange(128).expand(2, 128)
    identity = torch.arange(128)
    # A teacher that keeps everything leaves the student's own selection.
    assert torch.equal(flux.double_mask(x, 40, everything, identity, 128), group_topk(x, 4, 40))
    # A teacher that keeps half: the student keeps only tokens with targets while there are enough.
    teacher = group_topk(x.flip(-1) * torch.linspace(0, 1, 12), 4, 64)
    kept = flux.double_mask(x, 30, teacher, identity, 128)
    assert torch.all(kept[:, 1:] > kept[:, :-1])
    for b in range(2):
        assert set(kept[b].tolist()) <= set(teacher[b].tolist())
        assert torch.bincount(kept[b] // 32, minlength=4).tolist() == group_budgets(30, 4)
    # Too few teacher tokens in a group: the rest of its slots go to its best other tokens.
    few = torch.tensor([[0, 1]] * 2)
    kept = flux.double_mask(x, 8, few, identity, 128)
    assert kept.shape == (2, 8) and {0, 1} <= set(kept[0].tolist())


def test_double_mask_distillation_loss():
    student = [torch.randn(2, 1 + 6, 10)]
    student_idx = torch.tensor([[0, 2, 3, 5, 8, 9]] * 2)
    teacher_idx = torch.tensor([[0, 1, 2, 3, 5, 8, 9, 11]] * 2)
    identity = torch.arange(12)
    # Teacher tokens equal to the student's own: loss 0 with identity projectors.
    teacher = torch.zeros(2, 8, 10)
    slots = torch.searchsorted(teacher_idx[0], student_idx[0])
    teacher[:, slots] = student[0][:, 1:]
    loss = flux.double_mask_distillation_loss(student, student_idx, [teacher], teacher_idx, identity, [nn.Identity()])
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # Tokens without a teacher target do not count: changing them changes nothing.
    other_idx = torch.tensor([[0, 2, 3, 5, 8, 10]] * 2)  # 10 is not kept by the teacher
    changed = [student[0].clone()]
    changed[0][:, -1] = torch.randn(10)
    loss = flux.double_mask_distillation_loss(changed, other_idx, [teacher], teacher_idx, identity, [nn.Identity()])
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    loss = flux.double_mask_distillation_loss(student, student_idx, [torch.randn(2, 8, 10)], teacher_idx, identity,
                                              [nn.Identity()])
    assert 0.2 < float(loss) < 1.8


def test_double_mask_step_with_a_stand_in_teacher():
    """A VideoMAE-shaped stand-in teacher (patch 16, tubelet 2): patch embeddings and their per-layer maps."""
    student = randomize(FluxViT(**TINY)).train()
    weight = torch.randn(24, 3, 2, 16, 16) * 0.02

    def teacher_embed(video):
        return F.conv3d(video, weight, stride=(2, 16, 16)).flatten(3).permute(0, 2, 3, 1)

    def teacher_forward(video, keep, layers):
        x = teacher_embed(video).flatten(1, 2)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return [torch.tanh(x * (i + 1)) for i in range(len(layers))]

    settings = flux.DoubleMaskSettings(teacher_resolutions=(64,), teacher_budget=20, student_layers=(0, 1),
                                       teacher_layers=(0, 1))
    clip = torch.randn(2, 3, 8, 64, 64)
    student_video = F.interpolate(clip, size=(8, 56, 56), mode="trilinear")
    projectors = [nn.Linear(64, 24) for _ in range(2)]
    loss = flux.double_mask_step(student, student_video, 48, clip, teacher_embed, teacher_forward, projectors,
                                 settings)
    assert torch.isfinite(loss) and 0 < float(loss.detach()) < 2
    loss.backward()
    assert projectors[0].weight.grad is not None and student.blocks[0].attn.qkv.weight.grad is not None


def test_token_settings_and_sampling(sample_clips, tmp_path):
    assert [flux.token_setting(b).head for b in (3072, 2048, 1024, 512)] == [0, 1, 2, 2]
    for budget in (3072, 2048, 1024, 512, 1500):
        s = flux.token_setting(budget)
        assert budget < s.tokens <= 2.5 * budget
    # Token-optimized inference on a real clip: 8 frames at 70 px (200 tokens) cut to a 100-token budget.
    (tmp_path / "list.txt").write_text(f"{sample_clips['balle-jbart.mp4']} 0\n")
    video, _ = VideoDataset(tmp_path / "list.txt", lambda r: sampling.segments(len(r), 8), size=70, crop=70)[0]
    assert video.shape == (3, 8, 70, 70) and abs(float(video.mean())) < 3
    model = randomize(FluxViT(**TINY)).eval()
    with torch.no_grad():
        assert model(video.unsqueeze(0), budget=100).shape == (1, 5)