// CUDA kernels of rlt_mask and rlt_tokenize: one warp per token computes its distance, one thread per column its
// run lengths, and one block per kept token gathers its normalized patch. Arithmetic comes from rlt_math.h, the
// same as the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/nvtx.h"
#include "rlt/rlt.h"

namespace vidfast::rlt {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per token; uint8 video sums |difference| per channel as integers, floating video in double.
template <typename in_t>
__global__ void keep_kernel(Params p, const in_t* __restrict__ video, bool* __restrict__ keep) {
  const Grid& g = p.grid;
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (token >= g.batch * g.tokens_per_clip()) return;
  const Token k = g.token_at(token);
  if (k.t == 0) {
    if (lane == 0) keep[token] = true;
    return;
  }
  const int64_t later = g.later_frame(k.t), earlier = g.earlier_frame(k.t);
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    // Lanes walk the patch's rows of 3 * patch interleaved RGB bytes.
    const int64_t row_bytes = 3 * g.patch;
    long long sums[3] = {0, 0, 0};
    for (int64_t e = lane; e < g.patch * row_bytes; e += 32) {
      const int64_t y = k.h * g.patch + e / row_bytes, i = e % row_bytes;
      const int d = int(video[g.thwc(k.b, later, y, k.w * g.patch) + i]) -
                    int(video[g.thwc(k.b, earlier, y, k.w * g.patch) + i]);
      sums[i % 3] += d < 0 ? -d : d;
    }
    int64_t total[3];
    for (int c = 0; c < 3; ++c) total[c] = warp_sum(sums[c]);
    if (lane == 0) keep[token] = keep_token(k.t, distance_from_u8_sums(total, p.inv_std, g.patch), p.threshold);
  } else {
    const int64_t pp = g.patch * g.patch;
    double sum = 0.0;
    for (int64_t e = lane; e < 3 * pp; e += 32) {
      const int64_t c = e / pp, y = k.h * g.patch + (e % pp) / g.patch, x = k.w * g.patch + e % g.patch;
      sum += fabs(double(video[g.cthw(k.b, c, later, y, x)]) - double(video[g.cthw(k.b, c, earlier, y, x)]));
    }
    sum = warp_sum(sum);
    if (lane == 0) keep[token] = keep_token(k.t, distance_from_sum(sum, g.patch), p.threshold);
  }
}

__global__ void lengths_kernel(Grid g, const bool* __restrict__ keep, int32_t* __restrict__ lengths) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = g.hp * g.wp;
  if (col >= g.batch * plane) return;
  const int64_t base = (col / plane) * g.tp * plane + col % plane;
  column_run_lengths(
      g.tp, [&](int64_t t) { return keep[base + t * plane]; },
      [&](int64_t t, int32_t len) { lengths[base + t * plane] = len; });
}

// One block per token of the grid; kept tokens write their slot (inclusive scan of keep, minus one).
template <typename in_t, typename out_t>
__global__ void gather_kernel(Params p, const in_t* __restrict__ video, const bool* __restrict__ keep,
                              const int32_t* __restrict__ lengths, const int64_t* __restrict__ inclusive_scan,
                              out_t* __restrict__ patches, int32_t* __restrict__ positions,
                              int32_t* __restrict__ token_lengths) {
  const Grid& g = p.grid;
  const int64_t token = blockIdx.x;
  if (!keep[token]) return;
  const int64_t slot = inclusive_scan[token] - 1;
  const Token k = g.token_at(token);
  if (threadIdx.x == 0) {
    positions[3 * slot] = int32_t(k.t);
    positions[3 * slot + 1] = int32_t(k.h);
    positions[3 * slot + 2] = int32_t(k.w);
    token_lengths[slot] = lengths[token];
  }
  const int64_t dim = g.patch_dim();
  out_t* out = patches + slot * dim;
  for (int64_t e = threadIdx.x; e < dim; e += blockDim.x) {
    const PatchElement el = patch_element(e, g.tubelet, g.patch);
    const int64_t frame = k.t * g.tubelet + el.dt, y = k.h * g.patch + el.ph, x = k.w * g.patch + el.pw;
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      const U8Normalizer<acc_type<out_t, uint8_t>> norm(p.mean, p.std);
      out[e] = out_t(norm(video[g.thwc(k.b, frame, y, x) + el.c], int(el.c)));
    } else {
      out[e] = cast_element<out_t>(video[g.cthw(k.b, el.c, frame, y, x)]);
    }
  }
}

std::tuple<Params, at::Tensor, at::Tensor, at::Tensor> mask_and_lengths(
    const at::Tensor& video_in, int64_t tubelet, int64_t patch, double threshold, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  Params p = check_arguments(video_in, tubelet, patch, threshold, mean, std, out_dtype);
  const Grid& g = p.grid;
  const c10::cuda::CUDAGuard guard(video_in.device());
  at::Tensor video = video_in.contiguous();
  auto keep = at::empty({g.batch, g.tp, g.hp, g.wp}, video.options().dtype(at::kBool));
  auto lengths = at::empty({g.batch, g.tp, g.hp, g.wp}, video.options().dtype(at::kInt));
  const int64_t tokens = keep.numel();
  if (tokens == 0) return {p, video, keep, lengths};
  VIDFAST_NVTX_RANGE("rlt/mask");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = unsigned((tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, video.scalar_type(), "rlt_mask_cuda", [&] {
    keep_kernel<scalar_t>
        <<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(p, video.data_ptr<scalar_t>(), keep.data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t columns = g.batch * g.hp * g.wp;
  lengths_kernel<<<unsigned((columns + 255) / 256), 256, 0, stream>>>(g, keep.data_ptr<bool>(),
                                                                      lengths.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {p, video, keep, lengths};
}

std::tuple<at::Tensor, at::Tensor> rlt_mask_cuda(const at::Tensor& video, int64_t tubelet, int64_t patch,
                                                 double threshold, at::ArrayRef<double> mean,
                                                 at::ArrayRef<double> std) {
  auto [p, contiguous, keep, lengths] = mask_and_lengths(video, tubelet, patch, threshold, mean, std, std::nullopt);
  return {keep, lengths};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rlt_tokenize_cuda(
    const at::Tensor& video_in, int64_t tubelet, int64_t patch, double threshold, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  auto [p, video, keep, lengths] = mask_and_lengths(video_in, tubelet, patch, threshold, mean, std, out_dtype);
  const Grid& g = p.grid;
  check_token_count(g);
  const c10::cuda::CUDAGuard guard(video.device());
  auto cu_seqlens = cu_seqlens_from_keep(keep);
  auto scan = keep.reshape({-1}).cumsum(0, at::kLong);
  // The token count sizes the outputs, so it must come to the host (the only sync).
  const int64_t n = keep.numel() == 0 ? 0 : scan[-1].item<int64_t>();
  auto options = video.options();
  auto patches = at::empty({n, g.patch_dim()}, options.dtype(p.out_dtype));
  auto positions = at::empty({n, 3}, options.dtype(at::kInt));
  auto token_lengths = at::empty({n}, options.dtype(at::kInt));
  if (n == 0) return {patches, positions, token_lengths, cu_seqlens};
  VIDFAST_NVTX_RANGE("rlt/gather");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = unsigned(keep.numel());
  const unsigned threads = unsigned(std::min<int64_t>(256, ((g.patch_dim() + 31) / 32) * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.out_dtype, "rlt_tokenize_cuda", [&] {
    using out_t = scalar_t;
    auto launch = [&](auto* data) {
      using in_t = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
      gather_kernel<in_t, out_t><<<blocks, threads, 0, stream>>>(
          p, data, keep.data_ptr<bool>(), lengths.data_ptr<int32_t>(), scan.data_ptr<int64_t>(),
          patches.data_ptr<out_t>(), positions.data_ptr<int32_t>(), token_lengths.data_ptr<int32_t>());
    };
    if (p.is_uint8) {
      launch(video.data_ptr<uint8_t>());
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, video.scalar_type(), "rlt_tokenize_cuda_in",
                                      [&] { launch(video.data_ptr<scalar_t>()); });
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {patches, positions, token_lengths, cu_seqlens};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidfast, CUDA, m) {
  m.impl("rlt_mask", &rlt_mask_cuda);
  m.impl("rlt_tokenize", &rlt_tokenize_cuda);
}

}  // namespace vidfast::rlt
