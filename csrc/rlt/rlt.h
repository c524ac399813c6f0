#pragma once
// Host-side interface of the RLT ops, shared by the CPU and CUDA kernels.
#include <ATen/core/Tensor.h>

#include <tuple>

#include "rlt/rlt_math.h"

namespace vidfast::rlt {

struct Params {
  Grid grid;
  bool is_uint8;  // decoder layout [B, T, H, W, 3] uint8, else model layout [B, 3, T, H, W] floating
  double threshold;
  double mean[3], std[3], inv_std[3];
  at::ScalarType out_dtype;
};

// Validates the arguments (raising ValueError / TypeError that name the argument) and derives the token grid.
Params check_arguments(const at::Tensor& video, int64_t tubelet, int64_t patch, double threshold,
                       at::ArrayRef<double> mean, at::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype);

// rlt_tokenize counts tokens in int32 (cu_seqlens, the CUDA gather's grid): a ValueError for more than 2^31 - 1,
// raised before any pixel is gathered (on the CPU, before the video is read or copied).
void check_token_count(const Grid& grid);

// Packs per-clip token counts into the outputs of rlt_tokenize that do not depend on pixels.
at::Tensor cu_seqlens_from_keep(const at::Tensor& keep);

}  // namespace vidfast::rlt
