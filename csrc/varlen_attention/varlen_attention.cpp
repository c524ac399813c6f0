// Schemas and argument checks of the variable-length (packed) attention ops.
#include "varlen_attention/varlen_attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace vidfast::attention {
namespace {

void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  VIDFAST_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                         (dtype == at::kDouble && t.device().is_cpu()),
                     name, ": expected dtype float32, bfloat16 or float16 (or float64 on the CPU); got ", dtype,
                     " on ", t.device());
}

void check_tokens(const at::Tensor& t, const char* name, const char* layout) {
  VIDFAST_CHECK_VALUE(t.dim() == 3, name, ": expected a 3-D tensor ", layout, "; got shape ", t.sizes());
  VIDFAST_CHECK_VALUE(t.size(2) == 0 || t.stride(2) == 1, name,
                      ": expected the last dimension to be contiguous (stride 1); got strides ", t.strides());
  check_floating(t, name);
}

void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  VIDFAST_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ": expected the dtype of q (", q.scalar_type(),
                     "); got ", t.scalar_type());
  VIDFAST_CHECK_VALUE(t.device() == q.device(), name, ": expected the device of q (", q.device(), "); got ",
                      t.device());
}

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  VIDFAST_CHECK_TYPE(cu.scalar_type() == at::kInt, name, ": expected dtype int32; got ", cu.scalar_type());
  VIDFAST_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name, ": expected a 1-D tensor [B + 1]; got shape ",
                      cu.sizes());
  VIDFAST_CHECK_VALUE(cu.device() == q.device(), name, ": expected the device of q (", q.device(), "); got ",
                      cu.device());
}

}  // namespace

void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total, int64_t max_seqlen, const char* name,
                             const char* max_name) {
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  VIDFAST_CHECK_VALUE(c[0] == 0, name, ": expected to start at 0; got ", c[0]);
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    VIDFAST_CHECK_VALUE(len >= 0, name, ": expected non-decreasing values; got ", c[b], " then ", c[b + 1],
                        " at index ", b);
    VIDFAST_CHECK_VALUE(len <= max_seqlen, max_name, ": must be at least the longest sequence; sequence ", b,
                        " has ", len, " tokens, ", max_name, "=", max_seqlen);
  }
  VIDFAST_CHECK_VALUE(c[n - 1] == total, name, ": expected to end at the token count ", total, "; got ", c[n - 1]);
}

Params check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                     const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                     bool causal) {
  check_tokens(q, "q", "[Nq, H, D]");
  check_tokens(k, "k", "[Nk, Hkv, D]");
  check_tokens(v, "v", "[Nk, Hkv, D]");
  check_same(k, q, "k");
  check_same(v, q, "v");
  VIDFAST_CHECK_VALUE(k.sizes() == v.sizes(), "v: expected the shape of k ", k.sizes(), "; got ", v.sizes());
  VIDFAST_CHECK_VALUE(k.size(2) == q.size(2), "k: expected the head dim of q (", q.size(2), "); got ", k.size(2));
  VIDFAST_CHECK_VALUE(q.size(2) >= 1, "q: expected a head dim of at least 1; got shape ", q.sizes());
  VIDFAST_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                      "k: the number of key/value heads must divide the number of query heads; got H=", q.size(1),
                      ", Hkv=", k.size(1));
  check_cu_seqlens(cu_seqlens_q, q, "cu_seqlens_q");
  check_cu_seqlens(cu_seqlens_k, q, "cu_seqlens_k");
  VIDFAST_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                      "cu_seqlens_k: expected as many sequences as cu_seqlens_q (", cu_seqlens_q.size(0),
                      " entries); got ", cu_seqlens_k.size(0));
  VIDFAST_CHECK_VALUE(max_seqlen_q >= 0, "max_seqlen_q: expected a non-negative integer; got ", max_seqlen_q);
  VIDFAST_CHECK_VALUE(max_seqlen_k >= 0, "max_seqlen_k: expected a non-negative integer; got ", max_seqlen_k);
  VIDFAST_CHECK_VALUE(std::isfinite(softmax_scale), "softmax_scale: expected a finite number; got ", softmax_scale);
  VIDFAST_CHECK_VALUE(q.size(0) <= INT32_MAX, "q: at most 2^31 - 1 tokens are supported (cu_seqlens are int32)");
  VIDFAST_CHECK_VALUE(k.size(0) <= INT32_MAX, "k: at most 2^31 - 1 tokens are supported (cu_seqlens are int32)");
  if (q.device().is_cpu()) {
    check_cu_seqlens_values(cu_seqlens_q, q.size(0), max_seqlen_q, "cu_seqlens_q", "max_seqlen_q");
    check_cu_seqlens_values(cu_seqlens_k, k.size(0), max_seqlen_k, "cu_seqlens_k", "max_seqlen_k");
  }
  Params p{};
  p.batch = cu_seqlens_q.size(0) - 1;
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.head_dim = q.size(2);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.scale = softmax_scale;
  p.causal = causal;
  return p;
}

Params check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, double softmax_scale, bool causal) {
  Params p = check_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_tokens(*t, name, "[Nq, H, D]");
    check_same(*t, q, name);
    VIDFAST_CHECK_VALUE(t->sizes() == q.sizes(), name, ": expected the shape of q ", q.sizes(), "; got ", t->sizes());
  }
  const std::vector<int64_t> lse_shape{p.heads, p.total_q};
  auto check_lse = [&](const at::Tensor& t, const char* name) {
    VIDFAST_CHECK_TYPE(t.scalar_type() == lse_dtype(q.scalar_type()), name, ": expected dtype ",
                       lse_dtype(q.scalar_type()), " for inputs of dtype ", q.scalar_type(), "; got ", t.scalar_type());
    VIDFAST_CHECK_VALUE(t.sizes() == at::IntArrayRef(lse_shape), name, ": expected shape [H, Nq] = ", lse_shape,
                        "; got ", t.sizes());
    VIDFAST_CHECK_VALUE(t.device() == q.device(), name, ": expected the device of q (", q.device(), "); got ",
                        t.device());
  };
  check_lse(lse, "lse");
  if (grad_lse) check_lse(*grad_lse, "grad_lse");
  return p;
}

// The lengths are SymInt so that a packing whose longest clip comes from data (rlt_tokenize under
// torch.compile) traces without a graph break; the kernels receive them as plain ints.
TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "float softmax_scale, bool causal) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

}  // namespace vidfast::attention
