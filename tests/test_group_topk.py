import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyvidfast.ops import group_budgets, group_topk
from pyvidfast.io import decode_frames

from conftest import DEVICES


def reference_scores(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Float64 scores [B, T, L], rounded to float32 as the op returns them."""
    batch, frames, tokens, dim = x.shape
    per_group = frames // num_groups
    grouped = x.double().reshape(batch, num_groups, per_group, tokens, dim)
    scores = torch.zeros(batch, num_groups, per_group, tokens, dtype=torch.float64)
    if per_group >= 2:
        distance = (grouped[:, :, 1:] - grouped[:, :, :-1]).pow(2).sum(-1).sqrt()
        scores[:, :, 1:] = distance
        scores[:, :, 0] = distance[:, :, 0]
    return scores.reshape(batch, frames, tokens).float()


def reference_select(scores: torch.Tensor, num_groups: int, budget: int) -> torch.Tensor:
    """Per group: highest score first, lower index first among equals (np.lexsort), then ascending."""
    batch, frames, tokens = scores.shape
    n = frames // num_groups * tokens
    flat = scores.reshape(batch, num_groups, n).numpy()
    rows = []
    for b in range(batch):
        kept = []
        for g, k in enumerate(group_budgets(budget, num_groups)):
            order = np.lexsort((np.arange(n), -flat[b, g].astype(np.float64)))
            kept.extend(sorted(g * n + int(i) for i in order[:k]))
        rows.append(kept)
    return torch.tensor(rows, dtype=torch.int64).reshape(batch, budget)


def check_against_reference(x, num_groups, budget, device="cpu"):
    """Runs the op on `device` and compares with the float64 reference computed on the CPU."""
    indices, scores = group_topk(x.to(device), num_groups, budget, return_scores=True)
    assert indices.device.type == scores.device.type == torch.device(device).type
    indices, scores = indices.cpu(), scores.cpu()
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == scores.shape == (x.shape[0], budget)
    expected_scores = reference_scores(x, num_groups)
    torch.testing.assert_close(indices, reference_select(expected_scores, num_groups, budget), rtol=0, atol=0)
    gathered = expected_scores.reshape(x.shape[0], -1).gather(1, indices)
    torch.testing.assert_close(scores, gathered, rtol=1e-6, atol=0)
    return indices, scores


SHAPES = [  # B, T, L, D, G, K
    (2, 8, 7, 33, 4, 13),
    (3, 6, 5, 1, 2, 29),
    (1, 4, 3, 64, 4, 5),  # one-frame groups: every score is 0
    (2, 2, 9, 17, 1, 18),  # keep everything
    (2, 10, 6, 40, 2, 0),  # keep nothing
    (1, 1, 1, 3, 1, 1),
    (2, 12, 16, 100, 4, 61),
    (1, 16, 20, 31, 4, 3),  # fewer tokens than groups get the extras
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_random_matches_reference(shape, dtype, device):
    batch, frames, tokens, dim, groups, budget = shape
    x = torch.randn(batch, frames, tokens, dim).to(dtype)
    check_against_reference(x, groups, budget, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_large_groups_and_ties_match_reference(dtype, device):
    # On CUDA, groups of 11776 tokens fill the shared-memory score buffer; 16000 tokens take the global scratch
    # path. A repeated frame gives exact zero scores, so the tie rule is exercised.
    for shape, groups, budget in [((8, 16, 256, 384), 4, 2048), ((3, 6, 49, 65), 2, 77), ((2, 4, 3, 8), 4, 5),
                                  ((1, 2, 5888, 4), 1, 7000), ((2, 8, 2000, 8), 1, 9001)]:
        x = torch.randn(shape).to(dtype)
        x[:, 1] = x[:, 0]
        check_against_reference(x, groups, budget, device)


def test_counts_order_and_first_frame_rule():
    x = torch.randn(3, 12, 10, 24)
    indices, scores = check_against_reference(x, 4, 101)
    n = 3 * 10
    for row in indices:
        assert torch.all(row[1:] > row[:-1])
        counts = torch.bincount(row // n, minlength=4).tolist()
        assert counts == group_budgets(101, 4) == [26, 25, 25, 25]
    # Frame 0 of a group copies frame 1's score, so the pair (0, l) / (1, l) ties and 0 wins a split tie.
    x = torch.zeros(1, 2, 1, 4)
    x[0, 1, 0, 0] = 3.0
    indices, scores = group_topk(x, 1, 1, return_scores=True)
    assert indices.tolist() == [[0]] and scores.tolist() == [[3.0]]


def test_ties_go_to_lower_index():
    # A static clip: every distance is 0, so each group keeps its first tokens.
    x = torch.randn(2, 1, 6, 8).expand(2, 8, 6, 8).contiguous()
    indices = group_topk(x, 2, 7)
    n = 4 * 6
    assert indices.tolist() == [[0, 1, 2, 3, n + 0, n + 1, n + 2]] * 2
    # Equal non-zero scores at several locations: the lower indices win.
    x = torch.zeros(1, 3, 5, 2)
    x[0, 1, :, 0] = 1.0
    x[0, 2, :, 0] = 2.0
    indices, scores = group_topk(x, 1, 7, return_scores=True)
    assert indices.tolist() == [[0, 1, 2, 3, 4, 5, 6]]
    assert scores.tolist() == [[1.0] * 7]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_ranks_first_and_noncontiguous_input(device):
    x = torch.randn(1, 4, 6, 5)
    x[0, 2, 4, 1] = float("nan")
    indices, scores = group_topk(x.to(device), 1, 2, return_scores=True)
    assert 2 * 6 + 4 in indices.tolist()[0] and torch.isnan(scores).any()
    y = torch.randn(2, 6, 8, 10).transpose(1, 2)  # [B, L=8, T=6, D] viewed as [B, T', L', D] non-contiguously
    check_against_reference(y, 2, 17, device)


@pytest.mark.parametrize("name", ["vtest.avi", "bikes.mp4"])
def test_real_clip_embeddings(sample_clips, name):
    """Scores on patch embeddings of a real clip: Conv3d patch projection (patch 14) + RMS normalization."""
    frames = decode_frames(sample_clips[name], 8, stride=3, size=(112, 112))
    video = frames.permute(3, 0, 1, 2).float().div(255).unsqueeze(0)  # [1, 3, T, H, W]
    weight = torch.randn(48, 3, 1, 14, 14) * 0.02
    x = F.conv3d(video, weight, stride=(1, 14, 14)).flatten(3).permute(0, 2, 3, 1)  # [1, T, L, D]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    for groups, budget in [(4, 256), (2, 100), (1, 511)]:
        check_against_reference(x, groups, budget)
    # A frame shown twice scores 0 at every location of the repeat: those tokens go last.
    doubled = torch.cat([x[:, :4], x[:, 3:4], x[:, 5:]], dim=1)
    indices = group_topk(doubled, 1, 6 * 64)
    assert not bool(((indices >= 4 * 64) & (indices < 5 * 64)).any())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    x = torch.randn(2, 8, 4, 3, device=device)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        group_topk(x[0], 2, 4)
    with pytest.raises(TypeError, match="x: expected dtype"):
        group_topk(x.to(torch.int32), 2, 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_topk(x, 3, 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_topk(x, 0, 4)
    with pytest.raises(ValueError, match="budget"):
        group_topk(x, 2, 33)
    with pytest.raises(ValueError, match="budget"):
        group_topk(x, 2, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in [(torch.randn(2, 8, 7, 33, device=device), 4, 13),
                 (torch.randn(1, 6, 5, 3, dtype=torch.float64, device=device), 2, 0)]:
        torch.library.opcheck(torch.ops.vidfast.group_topk.default, args)


def test_torch_compile_fullgraph():
    def select_and_gather(x, tokens):
        indices = group_topk(x, 4, 20)
        return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    x = torch.randn(2, 8, 6, 16)
    tokens = torch.randn(2, 48, 5)
    compiled = torch.compile(select_and_gather, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, tokens), select_and_gather(x, tokens))
