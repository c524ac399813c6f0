#pragma once
// Host-side interface of the group_topk op, shared by the CPU and CUDA kernels.
#include <ATen/core/Tensor.h>

#include "group_topk/group_topk_math.h"

namespace vidfast::group_topk {

// Validates the arguments (raising ValueError / TypeError that name the argument) and derives the shape.
Shape check_arguments(const at::Tensor& x, int64_t num_groups, int64_t budget);

}  // namespace vidfast::group_topk
