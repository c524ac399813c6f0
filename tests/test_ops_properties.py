"""Every op under hypothesis: random shapes (zero-size included), dtypes, strides (non-contiguous, expanded),
NaN/Inf and extreme values, each result compared with the op's float64 reference or rejected with the documented
exception; element counts past 2^31 indexed correctly (no 32-bit wrap).

The suite runs the "suite" profile (few examples, no deadline). `VIDFAST_HYPOTHESIS_PROFILE=thorough` (what
`make sanitize` sets) runs many more.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvidfast.io import sampling
from pyvidfast.ops import (IMAGENET_MEAN, IMAGENET_STD, group_budgets, group_topk, rlt_mask, rlt_tokenize,
                           varlen_attention)

import test_group_topk
import test_rlt
import test_varlen_attention

settings.register_profile("suite", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("VIDFAST_HYPOTHESIS_PROFILE", "suite"))

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_values(seed, shape, dtype, kind):
    """A tensor of `shape` whose values are ordinary ("normal"), near the dtype's limits ("extreme", finite), tiny
    ("tiny", subnormal range) or ordinary with NaN and +-Inf sprinkled in ("nonfinite")."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        low, high = {"extreme": (250, 256), "tiny": (0, 3)}.get(kind, (0, 256))
        return torch.randint(low, high, shape, generator=g, dtype=torch.uint8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    info = torch.finfo(dtype)
    if kind == "extreme":
        x = (x.sign() * info.max * torch.rand(shape, generator=g, dtype=torch.float64).clamp(0.5, 0.999))
    elif kind == "tiny":
        x = x * info.tiny
    elif kind == "nonfinite":
        pick = torch.rand(shape, generator=g)
        x = torch.where(pick < 0.05, math.nan, x)
        x = torch.where((pick >= 0.05) & (pick < 0.08), math.inf, x)
        x = torch.where((pick >= 0.08) & (pick < 0.1), -math.inf, x)
    return x.to(dtype)


def strided_like(x, layout, dim):
    """The same values as `x` in another memory layout: "contiguous", "transposed" (dims `dim` and `dim + 1`
    swapped in memory), "sliced" (every other element of a wider buffer along `dim`), or "expanded" (a stride-0
    view when `dim` has size 1)."""
    if layout == "transposed" and x.dim() > dim + 1:
        out = x.transpose(dim, dim + 1).contiguous().transpose(dim, dim + 1)
    elif layout == "sliced":
        wide = torch.zeros((*x.shape[:dim], 2 * x.shape[dim], *x.shape[dim + 1:]), dtype=x.dtype)
        out = wide.narrow(dim, 0, 2 * x.shape[dim])[(slice(None),) * dim + (slice(None, None, 2),)]
        out.copy_(x)
    elif layout == "expanded" and x.shape[dim] == 1:
        out = x.expand(*x.shape[:dim], 3, *x.shape[dim + 1:])
    else:
        return x
    assert torch.equal(out.nan_to_num(), (x if out.shape == x.shape else x.expand(out.shape)).nan_to_num())
    return out


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])
KINDS = st.sampled_from(["normal", "extreme", "tiny", "nonfinite"])


# ---- rlt_mask / rlt_tokenize -----------------------------------------------------------------------------------

def assert_rlt_matches_reference(video, tubelet, patch, threshold, mean, std, out_dtype):
    """Both RLT ops against test_rlt's float64 reference. Masks may differ only where the distance is within
    rounding of the threshold; patches equal the reference rounded to out_dtype (NaN where it is NaN). A grid
    with no tokens gives empty outputs."""
    if video.dtype == torch.uint8:
        batch, frames, height, width = video.shape[:4]
    else:
        batch, frames, height, width = video.shape[0], *video.shape[2:]
    grid = (batch, frames // tubelet, height // patch, width // patch)
    if 0 in grid:
        keep, lengths = rlt_mask(video, tubelet, patch, threshold, mean, std)
        assert keep.shape == lengths.shape == grid
        packed = rlt_tokenize(video, tubelet, patch, threshold, mean, std, out_dtype)
        assert packed.patches.shape == (0, 3 * tubelet * patch * patch) and packed.patches.dtype == out_dtype
        assert packed.positions.shape == (0, 3) and packed.cu_seqlens.tolist() == [0] * (batch + 1)
        return
    distance, keep_ref, lengths_ref, tokens_ref = test_rlt.reference(video, tubelet, patch, threshold, mean, std)
    keep, lengths = rlt_mask(video, tubelet, patch, threshold, mean, std)
    assert keep.shape == keep_ref.shape and keep.dtype == torch.bool and lengths.dtype == torch.int32
    finite = torch.isfinite(distance)
    near = finite & ((distance - threshold).abs() <= 1e-5 * distance.abs().clamp(min=1.0))
    assert torch.all((keep == keep_ref) | near), "mask differs away from the threshold"
    if not near.any():
        assert torch.equal(lengths, lengths_ref)
    packed = rlt_tokenize(video, tubelet, patch, threshold, mean, std, out_dtype)
    assert torch.equal(packed.positions, keep.nonzero()[:, 1:].int())
    idx = keep.nonzero()
    expected = tokens_ref[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]].to(out_dtype)
    assert packed.patches.shape == expected.shape and packed.patches.dtype == out_dtype
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}[out_dtype]
    torch.testing.assert_close(packed.patches.double(), expected.double(), rtol=tol, atol=tol, equal_nan=True)
    assert packed.cu_seqlens.tolist() == [0, *keep.reshape(keep.shape[0], -1).sum(1).cumsum(0).tolist()]


@given(
    data=st.data(),
    batch=st.integers(0, 2), tubelet=st.integers(1, 3), tp=st.integers(0, 3), patch=st.sampled_from([1, 2, 3, 4, 16]),
    hp=st.integers(0, 2), wp=st.integers(1, 3), dtype=st.sampled_from([torch.uint8, *FLOATS]), kind=KINDS,
    layout=LAYOUTS, seed=st.integers(0, 2**31),
)
def test_rlt_properties(data, batch, tubelet, tp, patch, hp, wp, dtype, kind, layout, seed):
    threshold = data.draw(st.sampled_from([0.1, 0.0, -1.0, 0.5, 1e30, math.inf, -math.inf]), "threshold")
    mean = data.draw(st.sampled_from([test_rlt.IMAGENET_MEAN, (0.0, 0.5, 1.0)]), "mean")
    std = data.draw(st.sampled_from([test_rlt.IMAGENET_STD, (1e-3, 1.0, 7.0)]), "std")
    out_dtype = data.draw(st.sampled_from(FLOATS), "out_dtype")
    t, h, w = tp * tubelet, hp * patch, wp * patch
    if dtype == torch.uint8:
        video = strided_like(random_values(seed, (batch, t, h, w, 3), dtype, kind), layout, 1)
    else:
        video = strided_like(random_values(seed, (batch, 3, t, h, w), dtype, kind), layout, 2)
    if layout == "expanded" and batch == 1:
        video = video.expand(2, *video.shape[1:])
    assert_rlt_matches_reference(video, tubelet, patch, threshold, mean, std, out_dtype)


@given(
    dim=st.integers(0, 5), size=st.integers(-1, 40), tubelet=st.integers(-2, 4), patch=st.integers(-1, 1100),
    threshold=st.sampled_from([0.1, math.nan]), std=st.sampled_from([(0.2, 0.2, 0.2), (0.0, 1.0, 1.0),
                                                                     (math.inf, 1.0, 1.0), (1.0, 1.0)]),
    dtype=st.sampled_from([torch.uint8, torch.int32, torch.bool, torch.complex64, *FLOATS]),
)
def test_rlt_bad_input_is_rejected_or_correct(dim, size, tubelet, patch, threshold, std, dtype):
    """Random argument combinations: the op either raises ValueError/TypeError naming the argument or agrees
    with the reference; it never crashes."""
    shape = [2, 4, 8, 8, 3][:dim]
    if dim and size >= 0:
        shape[-1] = size
    video = torch.zeros(shape, dtype=dtype) if dtype != torch.uint8 else torch.randint(0, 256, shape, dtype=dtype)
    try:
        keep, lengths = rlt_mask(video, tubelet, patch, threshold, std=std)
    except (ValueError, TypeError) as e:
        assert str(e).split(":")[0] in ("video", "tubelet", "patch", "threshold", "mean", "std"), str(e)
        return
    if keep.numel():
        _, keep_ref, lengths_ref, _ = test_rlt.reference(video, tubelet, patch, threshold, std=std)
        assert torch.equal(keep, keep_ref) and torch.equal(lengths, lengths_ref)


# ---- group_topk ------------------------------------------------------------------------------------------------

def group_topk_reference(x, num_groups, budget):
    """Indices and float32 scores from float64 scores: NaN (of either sign) ranks above every number, equal scores
    and NaNs go to the lower index, kept indices ascending."""
    batch, frames, tokens, _ = x.shape
    n = frames // num_groups * tokens
    scores = test_group_topk.reference_scores(x, num_groups).reshape(batch, num_groups, n).double().numpy()
    indices = []
    for b in range(batch):
        kept = []
        for g, k in enumerate(group_budgets(budget, num_groups)):
            s = scores[b, g]
            order = np.lexsort((np.arange(n), -np.nan_to_num(s, nan=0.0), ~np.isnan(s)))  # last key first
            kept.extend(sorted(g * n + int(i) for i in order[:k]))
        indices.append(kept)
    indices = torch.tensor(indices, dtype=torch.int64).reshape(batch, budget)
    flat = torch.from_numpy(scores).reshape(batch, num_groups * n).float()
    return indices, flat.gather(1, indices)


@given(
    batch=st.integers(0, 3), groups=st.integers(1, 3), per_group=st.integers(0, 4), tokens=st.integers(0, 7),
    dim=st.sampled_from([0, 1, 3, 8, 17, 64]), dtype=st.sampled_from(FLOATS), kind=KINDS, layout=LAYOUTS,
    budget_share=st.floats(0, 1), seed=st.integers(0, 2**31),
)
def test_group_topk_properties(batch, groups, per_group, tokens, dim, dtype, kind, layout, budget_share, seed):
    frames = groups * per_group
    x = strided_like(random_values(seed, (batch, frames, tokens, dim), dtype, kind), layout, 2)
    budget = int(budget_share * frames * tokens)
    indices, scores = group_topk(x, groups, budget, return_scores=True)
    expected_indices, expected_scores = group_topk_reference(x, groups, budget)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-6, atol=0, equal_nan=True)


def test_group_topk_nans_of_either_sign_tie():
    """inf - inf gives a negative NaN on x86, a NaN input a positive one: both rank first and tie (lower index)."""
    x = torch.zeros(1, 2, 4, 1)
    x[0, 1, 0] = math.nan  # token 0 (and 4): positive NaN
    x[0, :, 2] = math.inf  # token 2 (and 6): inf - inf
    x[0, 1, 3] = -math.nan  # token 3 (and 7): negative NaN input
    indices, scores = group_topk(x, 1, 5, return_scores=True)
    assert indices.tolist() == [[0, 2, 3, 4, 6]] and scores.isnan().sum() == 5
    assert torch.equal(indices, group_topk_reference(x, 1, 5)[0])


@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5), groups=st.integers(-1, 5),
       budget=st.integers(-2, 60), dtype=st.sampled_from([torch.int64, torch.uint8, *FLOATS]))
def test_group_topk_bad_input_is_rejected_or_correct(shape, groups, budget, dtype):
    x = torch.ones(shape, dtype=dtype)
    try:
        indices = group_topk(x, groups, budget)
    except (ValueError, TypeError) as e:
        assert str(e).split(":")[0] in ("x", "num_groups", "budget"), str(e)
        return
    assert torch.equal(indices, group_topk_reference(x, groups, budget)[0])


# ---- varlen_attention --------------------------------------------------------------------------------------------

@given(
    data=st.data(),
    lengths_q=st.lists(st.integers(0, 40), min_size=0, max_size=4),
    kv_heads=st.integers(1, 2), group=st.integers(1, 3), head_dim=st.sampled_from([1, 3, 8, 16, 33, 64]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), causal=st.booleans(),
    layout=st.sampled_from(["contiguous", "sliced", "expanded"]), seed=st.integers(0, 2**31),
)
def test_varlen_attention_properties(data, lengths_q, kv_heads, group, head_dim, dtype, causal, layout, seed):
    """Forward, lse and gradients against test_varlen_attention's float64 reference; the last dim has stride 1,
    other dims may be sliced views or (k, v) expanded over heads."""
    lengths_k = data.draw(st.lists(st.integers(0, 40), min_size=len(lengths_q), max_size=len(lengths_q)), "lk")
    scale = data.draw(st.sampled_from([None, 0.0, -1.0, 3.0]), "scale")
    torch.manual_seed(seed)
    q, k, v, cu_q, cu_k = test_varlen_attention.random_inputs(lengths_q or [], lengths_k or [], kv_heads * group,
                                                              kv_heads, head_dim, dtype)
    if layout == "sliced":  # every other head of a buffer twice as wide: row and head strides are not packed
        q = strided_like(q, "sliced", 1)
        k, v = strided_like(k, "sliced", 1), strided_like(v, "sliced", 1)
    elif layout == "expanded":  # one key/value head shown as kv_heads (stride 0)
        k, v = k[:, :1].expand(k.shape), v[:, :1].expand(v.shape)
    if not lengths_q:  # no sequence at all: empty outputs
        cu_q = cu_k = torch.zeros(1, dtype=torch.int32)
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, 0, 0, scale, causal, return_lse=True)
        assert out.shape == q.shape and lse.shape == (q.shape[1], 0)
        return
    test_varlen_attention.check_against_reference(q, k, v, cu_q, cu_k, causal, scale)


@given(lengths=st.lists(st.integers(1, 30), min_size=2, max_size=4), where=st.sampled_from("qkv"),
       value=st.sampled_from([math.nan, math.inf, -math.inf]), causal=st.booleans(), seed=st.integers(0, 2**31))
def test_varlen_attention_nonfinite_stays_in_its_sequence(lengths, where, value, causal, seed):
    """A NaN or Inf in one token of sequence 0 changes nothing in the other sequences (bit for bit)."""
    torch.manual_seed(seed)
    q, k, v, cu, _ = test_varlen_attention.random_inputs(lengths, lengths, 2, 1, 16, torch.float32)
    clean = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
    poisoned = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    poisoned[where][lengths[0] - 1, 0, 3] = value
    out = varlen_attention(poisoned["q"], poisoned["k"], poisoned["v"], cu, cu, max(lengths), max(lengths),
                           causal=causal)
    assert torch.equal(out[lengths[0]:], clean[lengths[0]:])


@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=4), corrupt=st.sampled_from(
    ["none", "start", "decrease", "end", "max_small", "max_negative", "dtype", "shape"]), seed=st.integers(0, 100))
def test_varlen_attention_lying_cu_seqlens_are_rejected(lengths, corrupt, seed):
    """cu_seqlens that do not describe the packed tensor are a ValueError/TypeError naming the argument."""
    q, k, v, cu, _ = test_varlen_attention.random_inputs(lengths, lengths, 2, 2, 8, torch.float32)
    max_len = max(lengths)
    cu = cu.clone()
    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, len(cu)))
    if corrupt == "start":
        cu[0] = 1
    elif corrupt == "decrease" and len(cu) > 2:
        cu[b - 1], cu[b] = int(cu[b]) + 1, int(cu[b - 1])
    elif corrupt == "end":
        cu[-1] += 1
    elif corrupt == "max_small" and max_len > 0:
        max_len -= 1
    elif corrupt == "max_negative":
        max_len = -1
    elif corrupt == "dtype":
        cu = cu.long()
    elif corrupt == "shape":
        cu = cu[None]
    else:
        corrupt = "none"
    if corrupt == "none":
        varlen_attention(q, k, v, cu, cu, max_len, max_len)
        return
    with pytest.raises((ValueError, TypeError), match="cu_seqlens|max_seqlen"):
        varlen_attention(q, k, v, cu, cu, max_len, max_len)


# ---- frame sampling ------------------------------------------------------------------------------------------------

@given(num_frames=st.integers(1, 500), count=st.integers(1, 40), stride=st.integers(1, 9), views=st.integers(1, 5),
       seed=st.integers(0, 1000))
def test_sampling_indices_stay_inside_the_video(num_frames, count, stride, views, seed):
    g = torch.Generator().manual_seed(seed)
    clips = [sampling.dense(num_frames, count, stride, generator=g), sampling.segments(num_frames, count),
             sampling.segments(num_frames, count, random=True, generator=g), sampling.uniform(num_frames, count),
             *sampling.dense_views(num_frames, count, stride, views), *sampling.segment_views(num_frames, count, views)]
    for clip in clips:
        assert len(clip) == count and all(0 <= i < num_frames for i in clip), clip
    ts = torch.sort(torch.rand(num_frames, generator=g, dtype=torch.float64) * num_frames / 10).values
    ts -= ts[0].clone()
    picked = sampling.per_second(ts, fps=float(stride), max_frames=count)
    assert picked == sorted(set(picked)) and all(0 <= i < num_frames for i in picked) and len(picked) <= count


# ---- negative strides and 64-bit sizes ---------------------------------------------------------------------------

def test_negative_stride_views_cannot_reach_the_ops():
    """torch has no negative-stride tensors: numpy's reversed views and as_strided with a negative stride are
    refused before any op sees them, so the ops need no check of their own."""
    with pytest.raises(ValueError, match="negative"):
        torch.from_numpy(np.zeros((2, 4, 16, 16, 3), dtype=np.uint8)[:, ::-1])
    with pytest.raises(RuntimeError, match="[Nn]egative"):
        torch.zeros(64).as_strided((4,), (-1,), 10)


def _available_bytes():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


@pytest.mark.skipif(os.environ.get("VIDFAST_SANITIZE") == "1", reason="2 GB input: too slow under ASan")
@pytest.mark.skipif(_available_bytes() < 8 << 30, reason="needs 8 GB of free memory for a 2.15 GB video")
def test_rlt_past_two_to_the_31_elements():
    """A uint8 video of 2 153 250 816 > 2^31 elements, still but for patches planted in its last frame (three of
    them past element 2^31): rlt_mask finds them where they are and rlt_tokenize gathers their pixels, so no
    index wraps at 32 bits. bfloat16 patches keep the output small: the first frame's tokens (1/8 of the video)
    at 2 bytes each."""
    frames, patch, side = 8, 16, 592 * 16
    video = torch.zeros((1, frames, side, side, 3), dtype=torch.uint8)
    assert video.numel() > 2**31
    planted = [(10, 10), (585, 300), (591, 0), (591, 591)]  # (h', w') in the last frame, raster order
    g = torch.Generator().manual_seed(0)
    for h, w in planted:
        video[0, -1, h * patch:(h + 1) * patch, w * patch:(w + 1) * patch] = torch.randint(
            128, 256, (patch, patch, 3), generator=g, dtype=torch.uint8)
    flat_index = lambda h, w: (((frames - 1) * side + h * patch) * side + w * patch) * 3  # noqa: E731
    assert flat_index(*planted[0]) < 2**31 and all(flat_index(h, w) >= 2**31 for h, w in planted[1:])

    keep, lengths = rlt_mask(video, tubelet=1, patch=patch)
    expected = torch.zeros_like(keep)
    expected[:, 0] = True
    expected_lengths = torch.zeros_like(lengths)
    expected_lengths[:, 0] = frames
    for h, w in planted:
        expected[0, -1, h, w] = True
        expected_lengths[0, 0, h, w], expected_lengths[0, -1, h, w] = frames - 1, 1
    assert torch.equal(keep, expected)
    assert torch.equal(lengths, expected_lengths)

    tokens = rlt_tokenize(video, tubelet=1, patch=patch, out_dtype=torch.bfloat16)
    first = (side // patch) ** 2
    assert tokens.cu_seqlens.tolist() == [0, first + len(planted)]
    assert tokens.positions[first:].tolist() == [[frames - 1, h, w] for h, w in planted]
    assert torch.equal(tokens.lengths, expected_lengths[keep])
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    # A zero patch normalizes to -mean/std exactly (one multiply-add by zero); every first-frame token is one.
    zero_patch = (-mean / std).expand(3, patch, patch).reshape(-1).float().bfloat16()
    assert bool((tokens.patches[:first] == zero_patch).all())
    for k, (h, w) in enumerate(planted):
        pixels = video[0, -1, h * patch:(h + 1) * patch, w * patch:(w + 1) * patch].permute(2, 0, 1).double()
        reference = ((pixels / 255 - mean) / std).reshape(-1)
        torch.testing.assert_close(tokens.patches[first + k].double(), reference, atol=0, rtol=2**-8)


@pytest.mark.skipif(os.environ.get("VIDFAST_SANITIZE") == "1", reason="4 GB input: too slow under ASan")
@pytest.mark.skipif(_available_bytes() < 10 << 30, reason="needs 10 GB of free memory for a 4.3 GB input")
def test_group_topk_cpu_past_two_to_the_31_elements():
    """bfloat16 embeddings [1, 2, 2^23 + 1, 128], 2^31 + 256 elements, zero but for three rows of the second
    frame, two of them past element 2^31: the CPU kernel scores them where they are (the first frame copies the
    second frame's scores) and keeps exactly those tokens, so no index wraps at 32 bits."""
    tokens, dim = 2**23 + 1, 128
    x = torch.zeros((1, 2, tokens, dim), dtype=torch.bfloat16)
    assert x.numel() > 2**31
    planted = [5, tokens - 2, tokens - 1]
    assert (tokens + planted[0]) * dim < 2**31 <= (tokens + planted[1]) * dim
    for k, l in enumerate(planted):  # small integers: exact in bfloat16, and their sums of squares in float64
        x[0, 1, l] = (torch.arange(dim) % (3 + k) + 1).to(torch.bfloat16)
    indices, scores = group_topk(x, num_groups=1, budget=2 * len(planted), return_scores=True)
    assert indices.tolist() == [[*planted, *(tokens + l for l in planted)]]
    row_scores = [x[0, 1, l].double().square().sum().sqrt().float() for l in planted]
    assert torch.equal(scores, torch.stack(row_scores * 2).view(1, -1))


def test_rlt_tokenize_past_two_to_the_31_tokens_is_refused():
    # cu_seqlens are int32: 2^31 tokens (a stride-0 view, no memory) are a ValueError from the op itself (the
    # wrapper adds no check of its own), never a wrap; so in the fake kernel (torch.compile's path), where
    # 2^31 - 1 tokens still pass.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    message = r"^video: at most 2\^31 - 1 tokens .*; got 1 \* 2147483648 \* 1 \* 1 = 2147483648$"
    many = torch.zeros(1, 1, 1, 1, 3, dtype=torch.uint8).expand(1, 2**31, 1, 1, 3)
    with pytest.raises(ValueError, match=message):
        rlt_tokenize(many, tubelet=1, patch=1)
    floating = torch.zeros(1, 3, 1, 1, 1).expand(2, 3, 2**30, 1, 1)
    with pytest.raises(ValueError, match=r"^video: at most 2\^31 - 1 tokens .*= 2147483648$"):
        rlt_tokenize(floating, tubelet=1, patch=1)
    with FakeTensorMode(shape_env=ShapeEnv()):
        fits = torch.empty((1, 2**31 - 1, 1, 1, 3), dtype=torch.uint8)
        assert torch.ops.vidfast.rlt_tokenize(fits, 1, 1)[3].shape == (2,)
        with pytest.raises(ValueError, match=message):
            torch.ops.vidfast.rlt_tokenize(torch.empty((1, 2**31, 1, 1, 3), dtype=torch.uint8), 1, 1)


def test_varlen_attention_past_two_to_the_31_tokens_is_refused():
    # cu_seqlens are int32: 2^31 query or key tokens (stride-0 views, no memory) are a ValueError, never a wrap.
    many = torch.zeros(1, 1, 8).expand(2**31, 1, 8)
    few = torch.zeros(4, 1, 8)
    cu_many, cu_few = (torch.tensor([0, n], dtype=torch.int32) for n in (2**31 - 1, 4))
    with pytest.raises(ValueError, match="^q: at most 2\\^31 - 1 tokens"):
        varlen_attention(many, few, few, cu_many, cu_few, 2**31 - 1, 4)
    with pytest.raises(ValueError, match="^k: at most 2\\^31 - 1 tokens"):
        varlen_attention(few, many, many, cu_few, cu_many, 4, 2**31 - 1)
