// CUDA kernel of group_topk: one block per (clip, group). Its warps compute the group's scores (one warp per
// token, lanes over channels, the lane order of group_topk_math.h) into shared memory (global scratch when the
// group is too large), a block-wide radix select over the scores' bits finds the k-th largest score, and a
// block-wide ordered compaction writes the kept tokens in index order, ties to the lower index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/nvtx.h"
#include "group_topk/group_topk.h"

namespace vidfast::group_topk {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Scores stay in dynamic shared memory up to this size; with the static arrays it stays under the 48 KiB a block
// gets without opting in. Larger groups keep their scores in a global scratch buffer (served from L2).
constexpr int64_t kSharedScoreBytes = 46 * 1024;

template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return double(float(v));
  }
}

// The count of set bits of `ballot` held by lanes below this one.
__device__ __forceinline__ int lanes_below(unsigned ballot) {
  return __popc(ballot & ((1u << (threadIdx.x % 32)) - 1u));
}

// Where this thread stands among the block's threads whose flag is set, in thread order, and how many are set.
// Every thread of the block calls it; warp_count is kWarps ints of shared scratch.
struct BlockRank {
  int64_t rank, total;
};
__device__ __forceinline__ BlockRank block_rank(bool flag, int* warp_count) {
  const int warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (threadIdx.x % 32 == 0) warp_count[warp] = __popc(ballot);
  __syncthreads();
  BlockRank r{lanes_below(ballot), 0};
  for (int w = 0; w < kWarps; ++w) {
    r.rank += w < warp ? warp_count[w] : 0;
    r.total += warp_count[w];
  }
  __syncthreads();  // warp_count is reused by the next call
  return r;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    group_topk_kernel(Shape s, const scalar_t* __restrict__ x, float* __restrict__ scratch, bool scores_in_shared,
                      int64_t* __restrict__ out_indices, float* __restrict__ out_scores) {
  extern __shared__ float shared_scores[];
  __shared__ int histogram[256];
  __shared__ int warp_count[kWarps];
  __shared__ uint32_t chosen_prefix;
  __shared__ int64_t chosen_remaining;

  const int64_t task = blockIdx.x, b = task / s.groups, g = task % s.groups;
  const int64_t frames = s.frames_per_group(), L = s.tokens, D = s.dim, n = s.group_size();
  const int64_t k = s.group_budget(g);
  if (k == 0) return;
  float* scores = scores_in_shared ? shared_scores : scratch + task * n;
  const scalar_t* group = x + task * n * D;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // 1. Scores of frames 1.. of the group: one warp per token.
  for (int64_t token = L + warp; token < n; token += kWarps) {
    const scalar_t* row = group + token * D;
    const scalar_t* prev = row - L * D;
    double sum = 0.0;
    for (int64_t c = lane; c < D; c += kLanes) sum = add_squared_difference(sum, to_double(row[c]), to_double(prev[c]));
    for (int offset = kLanes / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) scores[token] = score_from_sum(sum);
  }
  __syncthreads();
  for (int64_t l = threadIdx.x; l < L; l += kThreads) scores[l] = frames >= 2 ? scores[L + l] : 0.0f;
  __syncthreads();

  // 2. Radix select, 8 bits at a time from the top: the k-th largest key, and how many keys equal to it to keep.
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int bin = threadIdx.x; bin < 256; bin += kThreads) histogram[bin] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const uint32_t key = score_key(scores[i]);
      if ((key & prefix_mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xFFu], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      for (int bin = 255; bin >= 0; --bin) {
        if (above + histogram[bin] >= remaining) {
          chosen_prefix = prefix | (uint32_t(bin) << shift);
          chosen_remaining = remaining - above;
          break;
        }
        above += histogram[bin];
      }
    }
    __syncthreads();
    prefix = chosen_prefix;
    remaining = chosen_remaining;
    prefix_mask |= 0xFFu << shift;
  }
  const uint32_t threshold = prefix;
  const int64_t ties_to_keep = remaining;

  // 3. Ordered compaction over chunks of kThreads tokens: keys above the threshold, and the first ties_to_keep
  // keys equal to it, in index order.
  const int64_t out_base = b * s.budget + s.group_offset(g);
  int64_t ties_before_chunk = 0, kept_before_chunk = 0;
  for (int64_t chunk = 0; chunk < n; chunk += kThreads) {
    const int64_t i = chunk + threadIdx.x;
    const uint32_t key = i < n ? score_key(scores[i]) : 0u;
    const bool above = i < n && key > threshold, tie = i < n && key == threshold;

    const BlockRank tie_rank = block_rank(tie, warp_count);
    const bool keep = above || (tie && ties_before_chunk + tie_rank.rank < ties_to_keep);
    const BlockRank kept_rank = block_rank(keep, warp_count);
    const int64_t slot = kept_before_chunk + kept_rank.rank;
    if (keep) {
      out_indices[out_base + slot] = g * n + i;
      out_scores[out_base + slot] = scores[i];
    }
    ties_before_chunk += tie_rank.total;
    kept_before_chunk += kept_rank.total;
    if (kept_before_chunk == k) break;  // uniform across the block
  }
}

std::tuple<at::Tensor, at::Tensor> group_topk_cuda(const at::Tensor& x_in, int64_t num_groups, int64_t budget) {
  const Shape s = check_arguments(x_in, num_groups, budget);
  TORCH_CHECK_VALUE(s.group_size() <= INT32_MAX, "x: a group of T/num_groups * L tokens must hold fewer than 2^31 "
                    "tokens; got ", s.group_size());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto indices = at::empty({s.batch, s.budget}, x.options().dtype(at::kLong));
  auto scores = at::empty({s.batch, s.budget}, x.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, scores};
  VIDFAST_NVTX_RANGE("group_topk/cuda");
  const int64_t blocks = s.batch * s.groups;
  const int64_t score_bytes = s.group_size() * int64_t(sizeof(float));
  const bool scores_in_shared = score_bytes <= kSharedScoreBytes;
  at::Tensor scratch = scores_in_shared ? at::Tensor() : at::empty({blocks * s.group_size()}, scores.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_topk_cuda", [&] {
    group_topk_kernel<scalar_t><<<unsigned(blocks), kThreads, scores_in_shared ? size_t(score_bytes) : 0, stream>>>(
        s, x.data_ptr<scalar_t>(), scores_in_shared ? nullptr : scratch.data_ptr<float>(), scores_in_shared,
        indices.data_ptr<int64_t>(), scores.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidfast, CUDA, m) { m.impl("group_topk", &group_topk_cuda); }

}  // namespace vidfast::group_topk
