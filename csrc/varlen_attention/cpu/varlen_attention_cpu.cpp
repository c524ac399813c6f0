// CPU entry points of the varlen attention ops: checks, output allocation, and the choice of the kernel compiled
// for the best instruction set this CPU (and ATEN_CPU_CAPABILITY) allows.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "varlen_attention/cpu/kernel.h"
#include "varlen_attention/varlen_attention.h"

namespace vidfast::attention::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa best_isa() {
#if defined(VIDFAST_ATTENTION_X86)
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const Params p =
      check_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal);
  auto out = at::empty({p.total_q, p.heads, p.head_dim}, q.options());
  auto lse = at::empty({p.heads, p.total_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  switch (best_isa()) {
#if defined(VIDFAST_ATTENTION_X86)
    case Isa::kAvx512:
      AVX512::forward(p, q, k, v, cu_q, cu_k, out, lse);
      break;
    case Isa::kAvx2:
      AVX2::forward(p, q, k, v, cu_q, cu_k, out, lse);
      break;
#endif
    default:
      DEFAULT::forward(p, q, k, v, cu_q, cu_k, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const Params p = check_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, softmax_scale, causal);
  auto grad_q = at::empty({p.total_q, p.heads, p.head_dim}, q.options());
  auto grad_k = at::empty({p.total_k, p.kv_heads, p.head_dim}, q.options());
  auto grad_v = at::empty({p.total_k, p.kv_heads, p.head_dim}, q.options());
  const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const auto lse_c = lse.contiguous();
  std::optional<at::Tensor> grad_lse_c;
  if (grad_lse) grad_lse_c = grad_lse->contiguous();
  switch (best_isa()) {
#if defined(VIDFAST_ATTENTION_X86)
    case Isa::kAvx512:
      AVX512::backward(p, grad_out, q, k, v, out, lse_c, grad_lse_c, cu_q, cu_k, grad_q, grad_k, grad_v);
      break;
    case Isa::kAvx2:
      AVX2::backward(p, grad_out, q, k, v, out, lse_c, grad_lse_c, cu_q, cu_k, grad_q, grad_k, grad_v);
      break;
#endif
    default:
      DEFAULT::backward(p, grad_out, q, k, v, out, lse_c, grad_lse_c, cu_q, cu_k, grad_q, grad_k, grad_v);
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidfast, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace vidfast::attention::cpu
