"""Memory of the ops: the resident set stays flat (growth under 5 MB) over 10,000 calls of each op of
`torch.ops.vidfast`, after 30 calls to warm up allocator caches, the schedule chooser and the recycled blocks.

Each op's kernels are called directly 10,000 times in the suite (a fraction of a millisecond each on small
inputs, one intra-op thread). Three cases cost about a millisecond a call (the autograd paths, which run through
torch's Python autograd machinery, and an output from the recycled huge-page blocks), so the suite makes 1,000
calls of those; `make memory` (`VIDFAST_MEMORY_CALLS=10000`) runs every case at 10,000 and prints each growth,
the figures docs/reliability.md reports."""

import os

import pytest
import torch

from conftest import rss_mb

from pyvidfast.ops import group_topk, rlt_mask, rlt_tokenize, varlen_attention

CALLS = os.environ.get("VIDFAST_MEMORY_CALLS")
BOUND_MB = 5


def cases():
    """name -> (call, calls in the suite)."""
    video = torch.randint(0, 256, (2, 4, 32, 48, 3), dtype=torch.uint8)
    big = torch.randint(0, 256, (1, 4, 224, 224, 3), dtype=torch.uint8)  # output over 2 MiB: huge-page blocks
    floats = torch.rand(1, 3, 2, 32, 32, requires_grad=True)
    x = torch.randn(2, 8, 20, 16)
    cu = torch.tensor([0, 30, 30, 47], dtype=torch.int32)
    q, k, v = (torch.randn(47, 2, 16, requires_grad=True) for _ in range(3))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = varlen_attention(qd, kd, vd, cu, cu, 30, 30, 0.25, causal=True, return_lse=True)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)

    def attention_autograd():
        varlen_attention(q, k, v, cu, cu, 30, 30, causal=True).sum().backward()

    return {
        "rlt_mask": (lambda: rlt_mask(video), 10_000),
        "rlt_tokenize": (lambda: rlt_tokenize(video), 10_000),
        "rlt_tokenize_huge_pages": (lambda: rlt_tokenize(big), 1_000),
        "rlt_tokenize_backward": (lambda: rlt_tokenize(floats, 2, 16, 0.05).patches.sum().backward(), 1_000),
        "group_topk": (lambda: group_topk(x, 4, 33, return_scores=True), 10_000),
        "varlen_attention_fwd": (lambda: varlen_attention(qd, kd, vd, cu, cu, 30, 30, 0.25, causal=True), 10_000),
        "varlen_attention_bwd": (lambda: torch.ops.vidfast.varlen_attention_bwd(
            grad_out, qd, kd, vd, out, lse, grad_lse, cu, cu, 30, 30, 0.25, True), 10_000),
        "varlen_attention_autograd": (attention_autograd, 1_000),
    }


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded machine OpenMP's barriers make these tiny calls 20-50 times slower at two
    threads, and a per-call leak in a parallel loop leaks the same when the loop runs inline."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_op_has_a_memory_case(monkeypatch):
    public = {name.removeprefix("vidfast::") for name in torch._C._dispatch_get_all_op_names()
              if name.startswith("vidfast::") and not name.startswith("vidfast::_")}
    assert public, "no vidfast op is registered"
    called = set()

    def counted(name, op):
        def call(*args, **kwargs):
            called.add(name)
            return op(*args, **kwargs)
        return call

    for name in public:  # the wrappers and autograd formulas look the ops up in torch.ops.vidfast at each call
        monkeypatch.setattr(torch.ops.vidfast, name, counted(name, getattr(torch.ops.vidfast, name)))
    for call, _ in cases().values():
        call()
    assert public <= called, f"ops with no memory case: {sorted(public - called)}"


@pytest.mark.skipif(os.environ.get("VIDFAST_SANITIZE") == "1", reason="ASan's quarantine holds freed memory")
@pytest.mark.parametrize("name", list(cases()))
def test_rss_flat_over_repeated_calls(name):
    call, calls = cases()[name]
    calls = int(CALLS or calls)
    for _ in range(30):  # warm up: allocator caches, the schedule chooser, recycled blocks
        call()
    before = rss_mb()
    for _ in range(calls):
        call()
    growth = rss_mb() - before
    print(f"{name}: RSS growth {growth:.2f} MB over {calls} calls")
    assert growth < BOUND_MB, f"{name}: RSS grew {growth:.1f} MB over {calls} calls"
