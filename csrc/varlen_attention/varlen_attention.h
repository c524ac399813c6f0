#pragma once
// Host-side interface of the varlen attention ops, shared by the CPU and CUDA kernels.
#include <ATen/core/Tensor.h>

#include <optional>

#include "varlen_attention/attention_math.h"

namespace vidfast::attention {

struct Params {
  int64_t batch;       // sequences
  int64_t heads;       // query heads H
  int64_t kv_heads;    // key/value heads Hkv, divides H
  int64_t head_dim;    // D
  int64_t total_q, total_k;
  int64_t max_seqlen_q, max_seqlen_k;
  double scale;
  bool causal;
  VIDFAST_HD int64_t group() const { return heads / kv_heads; }
};

// lse is float32, or float64 for float64 inputs (CPU only), so that float64 gradchecks see exact values.
inline at::ScalarType lse_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// Validates shapes, dtypes, devices and strides of the forward arguments, raising ValueError / TypeError that
// name the argument. cu_seqlens values are checked only for CPU tensors (see check_cu_seqlens_values).
Params check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                     const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                     bool causal);

// The same for the backward pass, plus the saved output, lse and incoming gradients.
Params check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, double softmax_scale, bool causal);

// cu_seqlens must start at 0, never decrease, end at the token count, and no sequence may exceed max_seqlen.
// Reading the values of a CUDA tensor would synchronize with the device, so the CUDA path skips this check (as
// flash-attn does) and trusts the caller; the CPU path always runs it.
void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total, int64_t max_seqlen, const char* name,
                             const char* max_name);

}  // namespace vidfast::attention
