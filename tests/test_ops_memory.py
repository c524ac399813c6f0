"""Memory of the ops: the resident set stays flat over many calls of each op (forward and, where the op has one,
backward). The suite makes 300 calls of each (after 30 to warm up) with a 5 MB bound;
`VIDFAST_MEMORY_CALLS=10000` runs the figure docs/reliability.md reports."""

import os

import pytest
import torch

from conftest import rss_mb

from pyvidfast.ops import group_topk, rlt_mask, rlt_tokenize, varlen_attention

CALLS = int(os.environ.get("VIDFAST_MEMORY_CALLS", "300"))
BOUND_MB = 5


def cases():
    video = torch.randint(0, 256, (2, 4, 32, 48, 3), dtype=torch.uint8)
    big = torch.randint(0, 256, (1, 4, 224, 224, 3), dtype=torch.uint8)  # output over 2 MiB: huge-page blocks
    floats = video.permute(0, 4, 1, 2, 3).float().div(255).requires_grad_()
    x = torch.randn(2, 8, 20, 16)
    cu = torch.tensor([0, 30, 30, 47], dtype=torch.int32)
    q, k, v = (torch.randn(47, 2, 16, requires_grad=True) for _ in range(3))

    def attention():
        out = varlen_attention(q, k, v, cu, cu, 30, 30, causal=True)
        out.sum().backward()

    return {
        "rlt_mask": lambda: rlt_mask(video),
        "rlt_tokenize": lambda: rlt_tokenize(video),
        "rlt_tokenize_huge_pages": lambda: rlt_tokenize(big),
        "rlt_tokenize_backward": lambda: rlt_tokenize(floats, 2, 16, 0.05).patches.sum().backward(),
        "group_topk": lambda: group_topk(x, 4, 33, return_scores=True),
        "varlen_attention_fwd_bwd": attention,
    }


@pytest.mark.skipif(os.environ.get("VIDFAST_SANITIZE") == "1", reason="ASan's quarantine holds freed memory")
@pytest.mark.parametrize("name", list(cases()))
def test_rss_flat_over_repeated_calls(name):
    call = cases()[name]
    for _ in range(30):  # warm up: allocator caches, the schedule chooser, recycled blocks
        call()
    before = rss_mb()
    for _ in range(CALLS):
        call()
    growth = rss_mb() - before
    assert growth < BOUND_MB, f"{name}: RSS grew {growth:.1f} MB over {CALLS} calls"
