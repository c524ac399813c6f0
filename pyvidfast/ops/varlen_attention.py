"""Variable-length (packed) attention: every sequence of a batch attends only to itself.

Tokens of all sequences are packed into one ``[N, heads, head_dim]`` tensor and ``cu_seqlens`` gives the bounds,
as in flash-attn's ``flash_attn_varlen_func`` (whose arguments :func:`varlen_attention` mirrors), so no compute or
memory goes to padding. Forward and backward have CPU and CUDA kernels (``torch.ops.vidfast.varlen_attention_fwd``
/ ``_bwd``) with fake kernels and an autograd formula, so the op works under ``torch.compile(fullgraph=True)``.
"""

import math

import torch
from torch import Tensor

CPU_PATHS = ("brgemm", "avx2", "default")


def cpu_path() -> str:
    """The CPU path this process runs: ``brgemm`` (oneDNN's micro-kernel; AVX-512 CPUs), ``avx2`` (the FMA
    micro-kernel of this package; AVX2 CPUs, or where brgemm is refused) or ``default`` (portable code, BLAS tiles).
    ``VIDFAST_ATTENTION_PATH`` forces one, read once per process (as ``ATEN_CPU_CAPABILITY`` is)."""
    return torch.ops.vidfast._varlen_attention_cpu_path()


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | torch.SymInt,
    max_seqlen_k: int | torch.SymInt,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention within each packed sequence.

    Args:
        q: ``[Nq, H, D]`` queries of all sequences, packed; float32, bfloat16 or float16 (float64 on the CPU).
        k, v: ``[Nk, Hkv, D]`` keys and values; ``Hkv`` divides ``H`` (grouped-query attention: query head ``h``
            uses key/value head ``h // (H // Hkv)``). The last dimension of q, k and v must have stride 1.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``: sequence ``b`` owns queries
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; they start at 0,
            never decrease and end at ``Nq`` / ``Nk``. Sequences of length 0 are allowed.
        max_seqlen_q, max_seqlen_k: ints (or SymInts under ``torch.compile``, e.g. from ``.item()``), at least the
            longest query / key sequence. On the CPU the cu_seqlens values are checked against them; on CUDA they
            are trusted (checking would synchronize with the device), as in flash-attn.
        softmax_scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        causal: query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``
            (aligned to the bottom right, as flash-attn >= 2.1). A query that sees no key outputs zeros.
        return_lse: also return the log-sum-exp of the scaled scores, float32 ``[H, Nq]`` (float64 for float64
            inputs; -inf where a query sees no key).

    Returns:
        ``out`` ``[Nq, H, D]`` in q's dtype, or ``(out, lse)``. Computation accumulates in float32 (float64 for
        float64 inputs). Gradients flow to q, k and v, including through ``lse``.
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = torch.ops.vidfast.varlen_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), bool(causal)
    )
    return (out, lse) if return_lse else out


@torch.library.register_fake("vidfast::varlen_attention_fwd")
def _varlen_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "q, k, v: expected 3-D tensors")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "k: the number of key/value heads must divide H")
    torch._check(cu_seqlens_q.shape == cu_seqlens_k.shape, lambda: "cu_seqlens_k: expected the shape of cu_seqlens_q")
    total_q, heads, head_dim = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((total_q, heads, head_dim)), q.new_empty((heads, total_q), dtype=lse_dtype)


@torch.library.register_fake("vidfast::varlen_attention_bwd")
def _varlen_attention_bwd_fake(
    grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal = inputs
    out, lse = output
    # The backward needs every saved tensor for any one of the gradients (dq needs k and v, dk and dv need q), so
    # it is all or nothing.
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_q, grad_k, grad_v = torch.ops.vidfast.varlen_attention_bwd(
        grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, *ctx.args
    )
    grads = [g if needed else None for g, needed in zip((grad_q, grad_k, grad_v), ctx.needs_input_grad[:3])]
    return *grads, None, None, None, None, None, None


torch.library.register_autograd("vidfast::varlen_attention_fwd", _backward, setup_context=_setup_context)
