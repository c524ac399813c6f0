"""varlen_attention against a float64 dense reference, gradcheck, opcheck, checks of bad input and torch.compile.
Each test body runs on every device (CUDA skipped without a GPU); every CPU path (brgemm, avx2, default) this CPU
can run is checked against the reference in a fresh process that forces it with VIDFAST_ATTENTION_PATH."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyvidfast.io import decode_frames
from pyvidfast.ops import rlt_tokenize, varlen_attention
from pyvidfast.ops.varlen_attention import CPU_PATHS, cpu_path
from tests.conftest import requires_cuda_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda_kernels)]

# Error budgets, relative to the largest magnitude of the reference tensor. float32 accumulates like the reference
# up to rounding (1e-7 per operation, sums of a few hundred terms). bfloat16 / float16 inputs are exact in the
# reference too, so the error comes from rounding the output (2^-9 / 2^-12 relative), from rounding P to the input
# type for P V where 16-bit tiles run on brgemm, and, in the backward pass, from rounding the gradients once more;
# float64 inputs run the kernel in float64.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def cu_seqlens(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def reference(q, k, v, cu_q, cu_k, scale, causal):
    """Dense softmax attention per sequence in float64; lse is -inf where a query sees no key."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    group = q.shape[1] // k.shape[1]
    for b in range(len(cq) - 1):
        qi = q[cq[b] : cq[b + 1]].double().transpose(0, 1)
        ki = k[ck[b] : ck[b + 1]].double().transpose(0, 1).repeat_interleave(group, 0)
        vi = v[ck[b] : ck[b + 1]].double().transpose(0, 1).repeat_interleave(group, 0)
        s = qi @ ki.transpose(1, 2) * scale
        lq, lk = qi.shape[1], ki.shape[1]
        if causal:
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None]
            s = s.masked_fill(j > i + lk - lq, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        outs.append((p @ vi).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def random_inputs(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, device="cpu"):
    q = torch.randn(sum(lengths_q), heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=dtype, device=device)
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


def assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOLERANCE[dtype] * max(scale, 1e-3), f"{what}: max error {err:.3g} vs magnitude {scale:.3g}"


def check_against_reference(q, k, v, cu_q, cu_k, causal, scale=None, device="cpu"):
    """Forward output, lse, and gradients of a loss using both out and lse, against the float64 reference."""
    dtype = q.dtype
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0),
                                softmax_scale=scale, causal=causal, return_lse=True)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*ref_leaves, cu_q.cpu(), cu_k.cpu(), scale, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.cpu(), ref_out, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "lse: -inf exactly where a query sees no key"
    assert (lse.cpu()[~finite] == -math.inf).all()
    assert_close(lse.cpu()[finite], ref_lse[finite], dtype, "lse")
    grad_out = torch.randn_like(ref_out)
    grad_lse = torch.randn_like(ref_lse).masked_fill(~finite, 0.0)
    loss = (out.double() * grad_out.to(out.device)).sum() + (lse.double().nan_to_num(0, 0, 0) * grad_lse.to(out.device)).sum()
    loss.backward()
    ((ref_out * grad_out).sum() + (ref_lse.nan_to_num(0, 0, 0) * grad_lse).sum()).backward()
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad.cpu(), ref_leaf.grad, dtype, f"grad of {name}")
    return out, lse


# Lengths around the CPU tiles (256 queries x 512 keys) and the AVX2 micro-tiles (6 rows x 16 columns), with empty
# and single-token sequences.
LENGTHS = [[0, 1, 300, 257, 7, 0], [513]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_reference(device, dtype, causal, lengths):
    q, k, v, cu_q, cu_k = random_inputs(lengths, lengths, heads=3, kv_heads=3, head_dim=64, dtype=dtype,
                                        device=device)
    check_against_reference(q, k, v, cu_q, cu_k, causal)


# bfloat16 with an even head dim takes the 16-bit brgemm tiles where the CPU has them; 33 takes widened tiles. On
# the AVX2 path, 33 and 80 leave partial 16-column panels. On CUDA 32, 64, 80, 96 and 128 take the tensor cores.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 33, 80, 96, 128])
def test_grouped_query_and_head_dims(device, dtype, causal, head_dim):
    q, k, v, cu_q, cu_k = random_inputs([70, 0, 141], [70, 0, 141], heads=6, kv_heads=2, head_dim=head_dim,
                                        dtype=dtype, device=device)
    check_against_reference(q, k, v, cu_q, cu_k, causal)


# The AVX2 path's micro-kernels are compiled for head dims 64 and 128, others (40) take the generic loop; 1 and 13
# leave partial strips and panels, and the forward cuts 1567 queries into four equal blocks of whole strips.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_odd_lengths_and_compiled_head_dims(device, dtype, causal, head_dim):
    q, k, v, cu_q, cu_k = random_inputs([1, 13, 1567], [1, 13, 1567], heads=2, kv_heads=1, head_dim=head_dim,
                                        dtype=dtype, device=device)
    check_against_reference(q, k, v, cu_q, cu_k, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_different_query_and_key_lengths(device, dtype, causal):
    # More queries than keys (causal rows that see no key), more keys than queries, and empty sides.
    q, k, v, cu_q, cu_k = random_inputs([40, 5, 0, 3, 300, 129], [9, 60, 4, 0, 271, 200], heads=2, kv_heads=1,
                                        head_dim=32, dtype=dtype, device=device)
    out, lse = check_against_reference(q, k, v, cu_q, cu_k, causal, scale=0.3)
    assert (out[45:48] == 0).all(), "queries of a sequence with no key output zeros"


@pytest.mark.parametrize("device", DEVICES)
def test_negative_scale_and_large_scores(device):
    q, k, v, cu_q, cu_k = random_inputs([33, 65], [33, 65], heads=2, kv_heads=2, head_dim=32, dtype=torch.float32,
                                        device=device)
    check_against_reference(q * 30, k, v, cu_q, cu_k, causal=False, scale=-0.7)


# The reference tests above, run again in a fresh process per CPU path: the path is chosen once per process. (The
# -k expression leaves this test out, or each run would start another.) Of the 1567-token cases only head dim 64
# (the others test the AVX2 path's compiled head dims, which this process's own run covers where it is the path).
REFERENCE_TESTS = "matches_reference or grouped_query or (odd_lengths and 64) or different_query"
PRINT_PATH = "from pyvidfast.ops.varlen_attention import cpu_path; print(cpu_path())"


@pytest.mark.parametrize("path", CPU_PATHS)
def test_every_cpu_path_matches_reference(path):
    if path == cpu_path():
        pytest.skip(f"{path} is this process's path: the reference tests in this run check it")
    env = {**os.environ, "VIDFAST_ATTENTION_PATH": path}
    root = Path(__file__).parents[1]
    probe = subprocess.run([sys.executable, "-c", PRINT_PATH], env=env, cwd=root, capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        assert "ValueError: VIDFAST_ATTENTION_PATH=" in probe.stderr, probe.stderr
        pytest.skip(probe.stderr.strip().splitlines()[-1])
    assert probe.stdout.strip() == path
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k",
                          f"({REFERENCE_TESTS}) and not cuda and not every_cpu_path"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"path {path}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"


def test_unknown_cpu_path_raises():
    env = {**os.environ, "VIDFAST_ATTENTION_PATH": "avx1024"}
    run = subprocess.run([sys.executable, "-c", PRINT_PATH], env=env, cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "ValueError: VIDFAST_ATTENTION_PATH: expected brgemm, avx2 or default; got 'avx1024'" in run.stderr


BENCH_LIMIT = """
import torch
from bench.varlen_attention import usable_matmul_limit
rate = lambda f32, bf16: {str(torch.float32): {"gflop_per_s": f32}, str(torch.bfloat16): {"gflop_per_s": bf16}}
print(usable_matmul_limit(rate(140.0, 1.2))[str(torch.bfloat16)], usable_matmul_limit(rate(140.0, 900.0))[str(torch.bfloat16)])
"""


def test_bench_matmul_limit_of_widened_bfloat16():
    """The benchmark's matmul limit for bfloat16 is float32's where a bfloat16 matmul is slower (AVX2: ours widens
    the tiles to float32), the bfloat16 one where it is faster (16-bit dot products). A subprocess, because the
    benchmark module changes malloc's settings on import."""
    run = subprocess.run([sys.executable, "-c", BENCH_LIMIT], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["140.0", "900.0"], run.stdout + run.stderr


def test_float64_gradcheck():
    q, k, v, cu_q, cu_k = random_inputs([3, 0, 5], [4, 0, 5], heads=2, kv_heads=1, head_dim=8, dtype=torch.float64)
    for causal in (False, True):
        def fn(q, k, v):
            out, lse = varlen_attention(q, k, v, cu_q, cu_k, 5, 5, causal=causal, return_lse=True)
            return out, lse.nan_to_num(0, 0, 0)

        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_no_leak_across_sequences(device):
    """Changing every token of the neighbours must leave a sequence's output and gradients unchanged, bit for bit."""
    q, k, v, cu_q, cu_k = random_inputs([50, 200, 31], [50, 200, 31], heads=2, kv_heads=2, head_dim=32,
                                        dtype=torch.float32, device=device)
    mid = slice(50, 250)

    def run(q, k, v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, cu_q, cu_k, 200, 200)
        out[mid].sum().backward()
        return out[mid].detach(), [t.grad for t in leaves]

    out, grads = run(q, k, v)
    noisy = [t.clone() for t in (q, k, v)]
    for t in noisy:
        t[:50] = 1e3 * torch.randn_like(t[:50])
        t[250:] = -1e3
    out2, grads2 = run(*noisy)
    assert torch.equal(out, out2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g[mid], g2[mid])
        assert (g2[:50] == 0).all() and (g2[250:] == 0).all()
    alone = varlen_attention(q[mid], k[mid], v[mid], cu_seqlens([200], device), cu_seqlens([200], device), 200, 200)
    assert torch.allclose(out, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_some_inputs_only(device):
    """Only v requires a gradient: it equals v's gradient when all three do, and q, k get none."""
    q, k, v, cu, _ = random_inputs([12, 30], [12, 30], heads=2, kv_heads=1, head_dim=32, dtype=torch.float32,
                                   device=device)
    grad = torch.randn_like(q)
    v_only = v.clone().requires_grad_()
    varlen_attention(q, k, v_only, cu, cu, 30, 30).backward(grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    varlen_attention(*leaves, cu, cu, 30, 30).backward(grad)
    assert torch.equal(v_only.grad, leaves[2].grad)
    assert q.grad is None and k.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """q, k, v as views of a packed qkv tensor [N, 3, H, D] (rows not contiguous) give the same result."""
    lengths = [20, 45]
    qkv = torch.randn(sum(lengths), 3, 4, 32, device=device)
    cu = cu_seqlens(lengths, device)
    q, k, v = qkv.unbind(1)
    out = varlen_attention(q, k, v, cu, cu, 45, 45, causal=True)
    expected = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 45, 45, causal=True)
    assert torch.equal(out, expected)


def test_real_clips(sample_clips):
    """Queries, keys and values projected from RLT tokens of real clips, with their real kept lengths."""
    clips = [decode_frames(sample_clips[name], 8, size=(64, 64)) for name in ("vtest.avi", "bikes.mp4")]
    tokens = rlt_tokenize(torch.stack(clips), tubelet=2, patch=16)
    lengths = (tokens.cu_seqlens[1:] - tokens.cu_seqlens[:-1]).tolist()
    assert lengths[0] != lengths[1] or lengths[0] < 64, "clips should keep different token counts"
    projection = torch.randn(tokens.patches.shape[1], 3 * 4 * 32) / math.sqrt(tokens.patches.shape[1])
    q, k, v = (tokens.patches @ projection).view(-1, 3, 4, 32).unbind(1)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(q.to(dtype), k.to(dtype), v.to(dtype), tokens.cu_seqlens, tokens.cu_seqlens,
                                causal=False)


def opcheck_samples(device):
    cases = []
    for dtype, causal in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]:
        q, k, v, cu_q, cu_k = random_inputs([5, 0, 17], [5, 0, 17], heads=4, kv_heads=2, head_dim=16, dtype=dtype,
                                            device=device)
        cases.append((q, k, v, cu_q, cu_k, causal))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(3))
def test_opcheck(device, case):
    q, k, v, cu_q, cu_k, causal = opcheck_samples(device)[case]
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 17, 17, 0.25, causal)
    torch.library.opcheck(torch.ops.vidfast.varlen_attention_fwd.default, args)
    out, lse = torch.ops.vidfast.varlen_attention_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse), cu_q, cu_k,
                17, 17, 0.25, causal)
    torch.library.opcheck(torch.ops.vidfast.varlen_attention_bwd.default, bwd_args)


def compiled_matches_eager(attend, inputs):
    """attend(q, k, v, cu) compiled with fullgraph=True: the same loss and gradients as eagerly."""
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    compiled(*leaves, inputs[3]).backward()
    eager = [t.clone().requires_grad_() for t in inputs[:3]]
    attend(*eager, inputs[3]).backward()
    for a, b in zip(leaves, eager):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v, cu_q, _ = random_inputs([9, 23], [9, 23], heads=2, kv_heads=1, head_dim=32, dtype=torch.float32,
                                     device=device)

    def attend(q, k, v, cu):
        return varlen_attention(q, k, v, cu, cu, 23, 23, causal=True).square().sum()

    compiled_matches_eager(attend, (q, k, v, cu_q))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_data_dependent_max_seqlen(device):
    """The longest sequence read from cu_seqlens inside the compiled function (an unbacked SymInt) traces without a
    graph break: the schema takes SymInt, the fake kernels ignore the value, the kernels get a plain int."""
    q, k, v, cu_q, _ = random_inputs([9, 23, 4], [9, 23, 4], heads=2, kv_heads=2, head_dim=32, dtype=torch.float32,
                                     device=device)

    def attend(q, k, v, cu):
        longest = int((cu[1:] - cu[:-1]).max())
        return varlen_attention(q, k, v, cu, cu, longest, longest).square().sum()

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled_matches_eager(attend, (q, k, v, cu_q))


def bad_inputs():
    q, k, v, cu, _ = random_inputs([3, 4], [3, 4], heads=4, kv_heads=2, head_dim=8, dtype=torch.float32)
    ok = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4)
    return [
        (dict(q=q[0]), ValueError, "q: expected a 3-D tensor"),
        (dict(k=k.double()), TypeError, "k: expected the dtype of q"),
        (dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q: expected dtype float32"),
        (dict(v=v[:, :1]), ValueError, "v: expected the shape of k"),
        (dict(k=k[..., :4], v=v[..., :4]), ValueError, "k: expected the head dim of q"),
        (dict(k=k[:, :1].expand(-1, 3, -1), v=v[:, :1].expand(-1, 3, -1)), ValueError, "must divide"),
        (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "q: expected the last dimension"),
        (dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q: expected dtype int32"),
        (dict(cu_seqlens_k=cu[None]), ValueError, "cu_seqlens_k: expected a 1-D tensor"),
        (dict(cu_seqlens_k=cu[:2]), ValueError, "cu_seqlens_k: expected as many sequences"),
        (dict(cu_seqlens_q=cu + 1), ValueError, "cu_seqlens_q: expected to start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32), max_seqlen_q=7), ValueError, "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens_k: expected to end"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen_q: must be at least the longest sequence"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected a non-negative integer"),
    ], ok


@pytest.mark.parametrize("case", range(15))
def test_bad_input_raises(case):
    cases, ok = bad_inputs()
    change, error, message = cases[case]
    with pytest.raises(error, match=message):
        varlen_attention(**{**ok, **change})


def test_bad_backward_input_raises():
    q, k, v, cu, _ = random_inputs([3, 4], [3, 4], heads=2, kv_heads=2, head_dim=8, dtype=torch.float32)
    out, lse = torch.ops.vidfast.varlen_attention_fwd(q, k, v, cu, cu, 4, 4, 0.5, False)
    with pytest.raises(ValueError, match="lse: expected shape"):
        torch.ops.vidfast.varlen_attention_bwd(out, q, k, v, out, lse.t(), None, cu, cu, 4, 4, 0.5, False)
    with pytest.raises(ValueError, match="grad_out: expected the shape of q"):
        torch.ops.vidfast.varlen_attention_bwd(out[:3], q, k, v, out, lse, None, cu, cu, 4, 4, 0.5, False)


# ------------------------------------------------------------------------------------ CPU and CUDA together


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(dtype):
    lengths = [17, 0, 250, 1000, 33]
    q, k, v, cu_q, cu_k = random_inputs(lengths, lengths, heads=6, kv_heads=3, head_dim=64, dtype=dtype)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, cu_q.to(device), cu_k.to(device), 1000, 1000, causal=True)
        out.float().square().sum().backward()
        results.append([out.detach().cpu().double()] + [t.grad.cpu().double() for t in leaves])
    for name, a, b in zip(["out", "grad q", "grad k", "grad v"], *results):
        assert_close(a, b, dtype, name)
