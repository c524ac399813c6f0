// CPU entry points of the varlen attention ops: checks, output allocation, and the choice of the path (kernel.h):
// the best this CPU (and ATEN_CPU_CAPABILITY) allows, or the one VIDFAST_ATTENTION_PATH names.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "varlen_attention/cpu/kernel.h"
#include "varlen_attention/varlen_attention.h"

namespace vidfast::attention::cpu {
namespace {

// Which build runs a path: brgemm runs the AVX-512 build on AVX-512 CPUs and the AVX2 build elsewhere.
enum class Build { kDefault, kAvx2, kAvx512 };

Path choose_path() {
#if defined(VIDFAST_ATTENTION_X86)
  const std::string capability = at::get_cpu_capability();  // named in the errors below
  const bool vector = cpu_has(CpuIsa::kAvx2);
  const bool brgemm = vector && AVX2::brgemm_available();
#else
  const std::string capability = "DEFAULT";
  const bool vector = false, brgemm = false;
#endif
  const char* forced = std::getenv("VIDFAST_ATTENTION_PATH");
  if (forced != nullptr && *forced != '\0') {
    const std::string name = forced;
    if (name == "default") return Path::kDefault;
    if (name == "avx2") {
      VIDFAST_CHECK_VALUE(vector, "VIDFAST_ATTENTION_PATH=avx2: needs a CPU (and ATEN_CPU_CAPABILITY) with AVX2; "
                          "this process runs CPU capability ", capability);
      return Path::kAvx2;
    }
    if (name == "brgemm") {
      VIDFAST_CHECK_VALUE(brgemm, "VIDFAST_ATTENTION_PATH=brgemm: oneDNN's brgemm micro-kernel does not run on this "
                          "CPU (CPU capability ", capability, ")");
      return Path::kBrgemm;
    }
    VIDFAST_CHECK_VALUE(false, "VIDFAST_ATTENTION_PATH: expected brgemm, avx2 or default; got '", name, "'");
  }
  if (cpu_isa() == CpuIsa::kAvx512 && brgemm) return Path::kBrgemm;
  return vector ? Path::kAvx2 : Path::kDefault;
}

Build build_of(Path path) {
  if (path == Path::kDefault) return Build::kDefault;
  if (path == Path::kBrgemm && cpu_isa() == CpuIsa::kAvx512) return Build::kAvx512;
  return Build::kAvx2;
}

const char* path_name(Path path) {
  switch (path) {
    case Path::kBrgemm: return "brgemm";
    case Path::kAvx2: return "avx2";
    default: return "default";
  }
}

std::string selected_path_name() { return path_name(selected_path()); }

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const Params p =
      check_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal);
  auto out = at::empty({p.total_q, p.heads, p.head_dim}, q.options());
  auto lse = at::empty({p.heads, p.total_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  switch (build_of(selected_path())) {
#if defined(VIDFAST_ATTENTION_X86)
    case Build::kAvx512:
      AVX512::forward(p, q, k, v, cu_q, cu_k, out, lse);
      break;
    case Build::kAvx2:
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
  switch (build_of(selected_path())) {
#if defined(VIDFAST_ATTENTION_X86)
    case Build::kAvx512:
      AVX512::backward(p, grad_out, q, k, v, out, lse_c, grad_lse_c, cu_q, cu_k, grad_q, grad_k, grad_v);
      break;
    case Build::kAvx2:
      AVX2::backward(p, grad_out, q, k, v, out, lse_c, grad_lse_c, cu_q, cu_k, grad_q, grad_k, grad_v);
      break;
#endif
    default:
      DEFAULT::backward(p, grad_out, q, k, v, out, lse_c, grad_lse_c, cu_q, cu_k, grad_q, grad_k, grad_v);
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

Path selected_path() {
  static const Path path = choose_path();
  return path;
}

// Which path varlen_attention takes on this CPU, for `python -m pyvidfast info` and the benchmark.
TORCH_LIBRARY_FRAGMENT(vidfast, m) { m.def("_varlen_attention_cpu_path() -> str", &selected_path_name); }

TORCH_LIBRARY_IMPL(vidfast, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace vidfast::attention::cpu
