"""Group-dynamic top-k token selection (FluxViT, "Make Your Training Flexible", ICCV 2025).

The frames of a clip are cut into ``num_groups`` contiguous temporal groups; inside each group a token scores the
L2 distance between its patch embedding and the embedding at the same location in the previous frame, and the
highest-scoring tokens are kept. ``group_topk`` computes the scores and selects in one pass per (clip, group).
"""

import torch
from torch import Tensor


def group_topk(x: Tensor, num_groups: int, budget: int, return_scores: bool = False):
    """Indices of the ``budget`` tokens of each clip that change most inside their temporal group.

    Args:
        x: patch embeddings ``[B, T, L, D]`` (float32, float64, float16 or bfloat16; FluxViT uses the output of the
            patch embedding after its normalization). Not differentiated: the selection is a discrete choice.
        num_groups: G, the number of contiguous temporal groups; must divide T.
        budget: K, tokens kept per clip, ``0 <= K <= T * L``. Group g keeps ``K // G`` tokens plus one when
            ``g < K % G``, so the total is exactly K (the official code truncates ``(1 - ratio) * T/G * L`` per
            group and may keep fewer).
        return_scores: also return the kept tokens' scores.

    Score of token (t, l) in a group of frames t0..t1: ``||x[t, l] - x[t-1, l]||_2`` for t > t0, summed in
    float64 and rounded to float32; the group's first frame takes its second frame's score (as the official code
    does); a one-frame group scores 0. NaN scores rank above every number and tie with each other, whatever
    their sign. Within a group the highest scores are kept; equal scores go to the lower index, so the CPU and CUDA
    kernels select the same tokens.

    Returns:
        ``indices`` int64 ``[B, K]`` into the flattened ``T * L`` tokens of each clip, ascending; with
        ``return_scores`` also ``scores`` float32 ``[B, K]``, the score of each kept token.
    """
    indices, scores = torch.ops.vidfast.group_topk(x.detach(), int(num_groups), int(budget))
    return (indices, scores) if return_scores else indices


def group_budgets(budget: int, num_groups: int) -> list[int]:
    """Tokens kept per group for a clip budget: sizes differ by at most 1, earlier groups take the extra."""
    return [budget // num_groups + (1 if g < budget % num_groups else 0) for g in range(num_groups)]


@torch.library.register_fake("vidfast::group_topk")
def _group_topk_fake(x, num_groups, budget):
    torch._check(x.dim() == 4, lambda: f"x: expected a 4-D tensor [B, T, L, D]; got shape {tuple(x.shape)}")
    torch._check(
        x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        lambda: f"x: expected dtype float32, float64, float16 or bfloat16; got {x.dtype}",
    )
    frames, tokens = x.shape[1], x.shape[2]
    torch._check(num_groups >= 1 and frames % num_groups == 0, lambda: "num_groups: must divide T")
    torch._check(0 <= budget <= frames * tokens, lambda: "budget: expected 0 <= budget <= T*L")
    batch = x.shape[0]
    return (
        x.new_empty((batch, budget), dtype=torch.int64),
        x.new_empty((batch, budget), dtype=torch.float32),
    )
