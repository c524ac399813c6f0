"""Python wrappers, fake kernels and autograd formulas of the ``torch.ops.vidfast`` custom ops."""
from pyvidfast._library import load_library

load_library()  # before the wrappers register fakes: without a build, a clear ImportError

from pyvidfast.ops.varlen_attention import varlen_attention
from pyvidfast.ops.rlt import IMAGENET_MEAN, IMAGENET_STD, PackedTokens, RLTTokenizer, rlt_mask, rlt_tokenize
from pyvidfast.ops.group_topk import group_budgets, group_topk

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "PackedTokens", "RLTTokenizer", "group_budgets", "group_topk", "rlt_mask",
    "rlt_tokenize", "varlen_attention",
]
