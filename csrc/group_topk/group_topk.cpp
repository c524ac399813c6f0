// Schema and argument checks of the group-dynamic top-k token selection (FluxViT).
#include "group_topk/group_topk.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace vidfast::group_topk {

Shape check_arguments(const at::Tensor& x, int64_t num_groups, int64_t budget) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D tensor [B, T, L, D] of patch embeddings; got shape ",
                    x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "x: expected dtype float32, float64, float16 or bfloat16; got ", dtype);
  Shape s{x.size(0), x.size(1), x.size(2), x.size(3), num_groups, budget};
  TORCH_CHECK_VALUE(num_groups >= 1 && s.frames % num_groups == 0,
                    "num_groups: expected a positive divisor of the frame count T=", s.frames, "; got ",
                    num_groups);
  TORCH_CHECK_VALUE(budget >= 0 && budget <= s.frames * s.tokens, "budget: expected 0 <= budget <= T*L = ",
                    s.frames * s.tokens, " (T=", s.frames, ", L=", s.tokens, "); got ", budget);
  return s;
}

TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  m.def("group_topk(Tensor x, int num_groups, int budget) -> (Tensor indices, Tensor scores)");
}

}  // namespace vidfast::group_topk
