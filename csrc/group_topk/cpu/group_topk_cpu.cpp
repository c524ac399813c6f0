// CPU kernel of group_topk: one task per (clip, group) computes the group's scores into a thread-local buffer,
// finds the k-th largest score with nth_element, and writes the kept tokens in index order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/nvtx.h"
#include "group_topk/group_topk.h"

namespace vidfast::group_topk {
namespace {

template <typename scalar_t>
inline double to_double(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return double(float(v));
  }
}

// ||a - b|| over dim channels, summed in the lane order of group_topk_math.h.
template <typename scalar_t>
inline float row_distance(const scalar_t* a, const scalar_t* b, int64_t dim) {
  double lane[kLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kLanes <= dim; i0 += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      lane[j] = add_squared_difference(lane[j], to_double(a[i0 + j]), to_double(b[i0 + j]));
    }
  }
  for (int j = 0; i0 + j < dim; ++j) {
    lane[j] = add_squared_difference(lane[j], to_double(a[i0 + j]), to_double(b[i0 + j]));
  }
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    for (int j = 0; j < offset; ++j) lane[j] += lane[j + offset];
  }
  return score_from_sum(lane[0]);
}

// Scores of one group's frames_per_group * L tokens (frame-major): distance to the previous frame at the same
// location; the group's first frame copies its second frame's score; a one-frame group scores 0. The AVX2 clone
// vectorizes the lanes 4 wide; -ffp-contract=off keeps its rounding equal to the baseline's and the GPU's.
template <typename scalar_t>
VIDFAST_CPU_CLONES void group_scores(const Shape& s, const scalar_t* group, float* scores) {
  const int64_t frames = s.frames_per_group(), L = s.tokens, D = s.dim;
  // Frame after frame streams the embeddings in memory order; the previous frame is still in cache.
  for (int64_t t = 1; t < frames; ++t) {
    const scalar_t* frame = group + t * L * D;
    for (int64_t l = 0; l < L; ++l) scores[t * L + l] = row_distance(frame + l * D, frame + (l - L) * D, D);
  }
  for (int64_t l = 0; l < L; ++l) scores[l] = frames >= 2 ? scores[L + l] : 0.0f;
}

// Keeps the k highest scores, ties to the lower index, writing kept tokens in ascending index order.
void select_group(const float* scores, int64_t n, int64_t k, int64_t first_index, int64_t* out_indices,
                  float* out_scores, std::vector<uint32_t>& keys) {
  if (k == 0) return;
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = score_key(scores[i]);
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
  const uint32_t threshold = keys[k - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += score_key(scores[i]) > threshold;
  int64_t ties_left = k - above, slot = 0;
  for (int64_t i = 0; i < n && slot < k; ++i) {
    const uint32_t key = score_key(scores[i]);
    const bool take = key > threshold || (key == threshold && ties_left > 0);
    if (!take) continue;
    ties_left -= key == threshold;
    out_indices[slot] = first_index + i;
    out_scores[slot] = scores[i];
    ++slot;
  }
}

std::tuple<at::Tensor, at::Tensor> group_topk_cpu(const at::Tensor& x_in, int64_t num_groups, int64_t budget) {
  const Shape s = check_arguments(x_in, num_groups, budget);
  const at::Tensor x = x_in.contiguous();
  auto indices = at::empty({s.batch, s.budget}, x.options().dtype(at::kLong));
  auto scores = at::empty({s.batch, s.budget}, x.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, scores};
  VIDFAST_NVTX_RANGE("group_topk/cpu");
  const int64_t n = s.group_size();
  int64_t* idx_out = indices.data_ptr<int64_t>();
  float* score_out = scores.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_topk_cpu", [&] {
    const scalar_t* data = x.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> group_score(n);
      std::vector<uint32_t> keys;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.groups, g = task % s.groups;
        group_scores(s, data + (b * s.groups + g) * n * s.dim, group_score.data());
        const int64_t slot = b * s.budget + s.group_offset(g);
        select_group(group_score.data(), n, s.group_budget(g), g * n, idx_out + slot, score_out + slot, keys);
      }
    });
  });
  return {indices, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidfast, CPU, m) { m.impl("group_topk", &group_topk_cpu); }

}  // namespace vidfast::group_topk
