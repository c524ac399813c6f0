// CPU kernels of rlt_mask and rlt_tokenize: a pass over rows of tokens computes the keep mask from patch
// distances (mask.cpp), a pass over columns gives run lengths, and (rlt_tokenize) a pass over rows, after or
// beside the mask (schedule.cpp), gathers and normalizes the kept patches (gather.h, gather_x86.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "common/cpu_alloc.h"
#include "common/cpu_isa.h"
#include "rlt/cpu/gather.h"
#include "rlt/cpu/rlt_cpu.h"

namespace vidfast::rlt::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> rlt_mask_cpu(const at::Tensor& video_in, int64_t tubelet, int64_t patch,
                                                double threshold, at::ArrayRef<double> mean,
                                                at::ArrayRef<double> std) {
  const Params p = check_arguments(video_in, tubelet, patch, threshold, mean, std, std::nullopt);
  const Grid& g = p.grid;
  const at::Tensor video = video_in.contiguous();
  auto keep = at::empty({g.batch, g.tp, g.hp, g.wp}, video.options().dtype(at::kBool));
  auto lengths = at::empty({g.batch, g.tp, g.hp, g.wp}, video.options().dtype(at::kInt));
  if (keep.numel() > 0) {
    compute_keep(p, video, keep.data_ptr<bool>());
    compute_lengths(g, keep.data_ptr<bool>(), lengths.data_ptr<int32_t>());
  }
  return {keep, lengths};
}

#if defined(VIDFAST_X86)
// Runs gather_with with the widest vector token gather where out_t is one it writes; false where it is not.
template <typename out_t, typename GatherWith>
bool gather_uint8_p16_vector(const Grid& g, const uint8_t* video, const Params& p, out_t* out,
                             GatherWith& gather_with) {
  if constexpr (std::is_same_v<out_t, double>) {
    return false;
  } else {
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(out) % 64 == 0, "rlt_tokenize: unaligned output");
    const U8Normalizer<float> norm(p.mean, p.std);
    if (use_avx512()) {
      gather_with([&](int64_t b, int64_t t, int64_t h, int64_t w, out_t* dst) {
        gather_token_uint8_p16_avx512<out_t>(g, video, norm, b, t, h, w, dst);
      }, out);
    } else {
      gather_with([&](int64_t b, int64_t t, int64_t h, int64_t w, out_t* dst) {
        gather_token_uint8_p16_avx2<out_t>(g, video, norm, b, t, h, w, dst);
      }, out);
    }
    return true;
  }
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rlt_tokenize_cpu(
    const at::Tensor& video_in, int64_t tubelet, int64_t patch, double threshold, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  const Params p = check_arguments(video_in, tubelet, patch, threshold, mean, std, out_dtype);
  const Grid& g = p.grid;
  check_token_count(g);
  const at::Tensor video = video_in.contiguous();
  const auto options = video.options();
  const int64_t rows = g.batch * g.tp * g.hp, dim = g.patch_dim();
  auto keep = at::empty({g.batch, g.tp, g.hp, g.wp}, options.dtype(at::kBool));
  bool* keep_ptr = keep.data_ptr<bool>();
  // Gathering starts before the token count is known, so patches go to a buffer for every token, trimmed after.
  const at::Tensor patches_bound = empty_cpu_huge_pages({rows * g.wp, dim}, options.dtype(p.out_dtype));
  std::vector<int64_t> row_start(rows + 1, 0);  // output slot of each row's first kept token

  ScheduleChooser& chooser = ScheduleChooser::for_types(p.is_uint8, p.out_dtype);
  const ScheduleChooser::Choice choice = chooser.pick();
  const auto start = std::chrono::steady_clock::now();
  // Runs the chosen schedule with gather_token(b, t', h', w', destination) copying one token.
  auto gather_with = [&](auto gather_token, auto* out) {
    const GatherTokens gather = [&](int64_t r, int64_t slot, int64_t begin, int64_t end) {
      const int64_t b = r / (g.tp * g.hp), t = (r / g.hp) % g.tp, h = r % g.hp;
      for (int64_t w = 0; w < g.wp && slot < end; ++w) {
        if (!keep_ptr[r * g.wp + w]) continue;
        if (slot >= begin) gather_token(b, t, h, w, out + slot * dim);
        ++slot;
      }
    };
    const MaskRows mask_rows = make_mask_rows(p, video, keep_ptr);
    run_schedule(choice.schedule, rows, g.wp, keep_ptr, mask_rows, row_start, gather);
  };
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.out_dtype, "rlt_tokenize_cpu", [&] {
      using out_t = scalar_t;
      out_t* out = patches_bound.data_ptr<out_t>();
      with_patch_size(g.patch, [&](auto patch_constant) {
        constexpr int kPatch = decltype(patch_constant)::value;
        if (p.is_uint8) {
          const uint8_t* data = video.data_ptr<uint8_t>();
          const U8Normalizer<acc_type<out_t, uint8_t>> norm(p.mean, p.std);
#if defined(VIDFAST_X86)
          if (kPatch == 16 && cpu_has(CpuIsa::kAvx2) && gather_uint8_p16_vector(g, data, p, out, gather_with)) return;
#endif
          gather_with([&](int64_t b, int64_t t, int64_t h, int64_t w,
                          out_t* dst) { gather_token_uint8<kPatch, out_t>(g, data, norm, b, t, h, w, dst); },
                      out);
        } else {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, video.scalar_type(), "rlt_tokenize_cpu_in", [&] {
            const scalar_t* data = video.data_ptr<scalar_t>();
            gather_with([&](int64_t b, int64_t t, int64_t h, int64_t w,
                            out_t* dst) { gather_token_float<kPatch, scalar_t, out_t>(g, data, b, t, h, w, dst); },
                        out);
          });
        }
      });
    });
  }

  const int64_t n = row_start[rows];
  if (choice.timed && n > 0) {
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    chooser.record(choice.schedule, ns / double(n * dim * c10::elementSize(p.out_dtype)));
  }

  // Per-token metadata, once every mask is known (a run length looks at later tubelets).
  auto lengths = at::empty({g.batch, g.tp, g.hp, g.wp}, options.dtype(at::kInt));
  compute_lengths(g, keep_ptr, lengths.data_ptr<int32_t>());
  auto positions = at::empty({n, 3}, options.dtype(at::kInt));
  auto token_lengths = at::empty({n}, options.dtype(at::kInt));
  const int32_t* len_ptr = lengths.data_ptr<int32_t>();
  int32_t* pos_out = positions.data_ptr<int32_t>();
  int32_t* len_out = token_lengths.data_ptr<int32_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = (r / g.hp) % g.tp, h = r % g.hp;
      for (int64_t w = 0, slot = row_start[r]; w < g.wp; ++w) {
        if (!keep_ptr[r * g.wp + w]) continue;
        pos_out[3 * slot] = int32_t(t);
        pos_out[3 * slot + 1] = int32_t(h);
        pos_out[3 * slot + 2] = int32_t(w);
        len_out[slot++] = len_ptr[r * g.wp + w];
      }
    }
  });
  auto cu_seqlens = at::empty({g.batch + 1}, options.dtype(at::kInt));
  for (int64_t b = 0; b <= g.batch; ++b) cu_seqlens.data_ptr<int32_t>()[b] = int32_t(row_start[b * g.tp * g.hp]);
  return {first_rows(patches_bound, n), positions, token_lengths, cu_seqlens};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  // Private (tests, benchmarks): which schedule the calling thread's last CPU rlt_tokenize ran: "mask_first",
  // "mask_beside", or "none" before any.
  m.def("_rlt_last_schedule() -> str", [] { return std::string(last_schedule_name()); });
}

TORCH_LIBRARY_IMPL(vidfast, CPU, m) {
  m.impl("rlt_mask", &rlt_mask_cpu);
  m.impl("rlt_tokenize", &rlt_tokenize_cpu);
}

}  // namespace vidfast::rlt::cpu
