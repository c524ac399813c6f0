#pragma once
// The CPU kernels, compiled once per instruction set (kernel_default.cpp, kernel_avx2.cpp, kernel_avx512.cpp all
// include kernel_impl.h with a different CPU_CAPABILITY); varlen_attention_cpu.cpp picks one at run time the way
// ATen does (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
#include <ATen/core/Tensor.h>

#include <optional>

#include "varlen_attention/varlen_attention.h"

namespace vidfast::attention::cpu {

// Tile sizes: a query block of kBlockQ rows meets key blocks of kBlockK rows; the score tile [kBlockQ, kBlockK]
// in float32 (128 KiB) and the key/value tiles stay in a core's L2 cache.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

#define VIDFAST_ATTENTION_CPU_KERNELS(isa)                                                                         \
  namespace isa {                                                                                                  \
  void forward(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                   \
               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, at::Tensor& out, at::Tensor& lse); \
  void backward(const Params& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,          \
                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,                              \
                const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,                       \
                const at::Tensor& cu_seqlens_k, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v);     \
  }

VIDFAST_ATTENTION_CPU_KERNELS(DEFAULT)
#if defined(VIDFAST_ATTENTION_X86)
VIDFAST_ATTENTION_CPU_KERNELS(AVX2)
VIDFAST_ATTENTION_CPU_KERNELS(AVX512)
#endif
#undef VIDFAST_ATTENTION_CPU_KERNELS

}  // namespace vidfast::attention::cpu
