#pragma once
// The CPU kernels, compiled once per instruction set (kernel_default.cpp, kernel_avx2.cpp, kernel_avx512.cpp all
// include kernel_impl.h with a different CPU_CAPABILITY). Three paths run them (varlen_attention_cpu.cpp picks one
// per process, see selected_path):
//   brgemm  - tile products on oneDNN's brgemm micro-kernel, in the AVX-512 build on AVX-512 CPUs (16-bit tiles too
//             where the CPU has AVX512-BF16 / FP16), else in the AVX2 build;
//   avx2    - the AVX2 build with its own FMA micro-kernel (gemm_avx2.h), for CPUs where brgemm is refused or slower;
//   default - the portable build: BLAS sgemm tiles.
#include <ATen/core/Tensor.h>

#include <optional>

#include "varlen_attention/varlen_attention.h"

namespace vidfast::attention::cpu {

enum class Path { kDefault, kAvx2, kBrgemm };

// The path of this process: VIDFAST_ATTENTION_PATH (brgemm, avx2 or default) where set, else the best one this CPU
// and ATEN_CPU_CAPABILITY allow. Decided on first use; a path the CPU cannot run raises a ValueError.
Path selected_path();

// Tile sizes: a query block of kBlockQ rows meets key blocks of kBlockK rows; the score tile [kBlockQ, kBlockK]
// in float32 (512 KiB) and the key/value tiles stay in a core's L2 cache. The AVX2 path ran fastest with these too
// on Zen 3 (512 KiB of L2): 128 or 64 query rows repack the key/value tiles more often and were 10-20% slower.
constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockK = 512;

#define VIDFAST_ATTENTION_CPU_KERNELS(isa)                                                                         \
  namespace isa {                                                                                                  \
  void forward(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                   \
               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, at::Tensor& out, at::Tensor& lse); \
  void backward(const Params& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,          \
                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,                              \
                const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,                       \
                const at::Tensor& cu_seqlens_k, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v);     \
  bool brgemm_available();                                                                                         \
  }

VIDFAST_ATTENTION_CPU_KERNELS(DEFAULT)
#if defined(VIDFAST_ATTENTION_X86)
VIDFAST_ATTENTION_CPU_KERNELS(AVX2)
VIDFAST_ATTENTION_CPU_KERNELS(AVX512)
#endif
#undef VIDFAST_ATTENTION_CPU_KERNELS

}  // namespace vidfast::attention::cpu
