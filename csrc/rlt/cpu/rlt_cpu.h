#pragma once
// The CPU kernels' parts, by job. rlt_cpu.cpp holds the op entry points and puts these together.
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

#include "common/cpu_isa.h"
#include "rlt/rlt.h"

namespace vidfast::rlt::cpu {

// ---- Mask and run lengths (mask.cpp) ------------------------------------------------------------------------

// Writes the keep mask of token rows [begin, end), rows being (b, t', h') in raster order. Each call owns its
// scratch, so threads may call it on disjoint ranges.
using MaskRows = std::function<void(int64_t begin, int64_t end)>;
MaskRows make_mask_rows(const Params& p, const at::Tensor& video, bool* keep);

// rlt_mask's phase 1: the keep mask of every row, in parallel.
void compute_keep(const Params& p, const at::Tensor& video, bool* keep);

// Phase 2: run lengths of every kept token, one task per column (b, h', w').
void compute_lengths(const Grid& g, const bool* keep, int32_t* lengths);

// ---- Schedules of mask and gather (schedule.cpp) ------------------------------------------------------------

// gather(r, first slot of row r, begin, end) copies the kept tokens of row r whose output slots are in
// [begin, end).
using GatherTokens = std::function<void(int64_t, int64_t, int64_t, int64_t)>;

// kMaskFirst: all threads mask, then all gather, each a contiguous share of the tokens (not of the rows: clips
// keep very different shares). kMaskBeside: one thread masks blocks of rows in raster order and publishes their
// slots while the others gather the published rows, a block at a time; the masker gathers too once done.
enum class Schedule : uint8_t { kNone, kMaskFirst, kMaskBeside };

// Runs `schedule`: fills row_start (rows + 1 entries: the output slot of each row's first kept token, a scan in
// raster order) and gathers every kept token. Remembers it as the calling thread's last schedule.
void run_schedule(Schedule schedule, int64_t rows, int64_t wp, const bool* keep, const MaskRows& mask_rows,
                  std::vector<int64_t>& row_start, const GatherTokens& gather);

// The calling thread's last schedule: "mask_first", "mask_beside" or "none" (read by the op _rlt_last_schedule).
const char* last_schedule_name();

// Which schedule is faster depends on the machine's state, not on the input. Where the streaming stores of one
// thread already fill the memory bus (a neighbour loading it, few channels), masking beside the gather hides the
// mask: ~15% faster on the 2-core build machine. Where two threads write twice as fast, masking first is ~15%
// faster, as a mask pass beside streaming stores runs slower. So calls time themselves, in ns per output byte
// averaged over recent calls of each schedule: the first kLearnCalls alternate, then calls use the faster one
// and try the other every kExploreEvery calls.
class ScheduleChooser {
 public:
  static constexpr uint64_t kLearnCalls = 8, kExploreEvery = 8;
  struct Choice {
    Schedule schedule;
    bool timed;  // the process's first call pays the output's page faults, so it does not count
  };

  // Costs per output byte differ with the input and output types, so each pair learns its own.
  static ScheduleChooser& for_types(bool uint8_input, at::ScalarType out_dtype);

  Choice pick();
  void record(Schedule s, double ns_per_byte);

 private:
  std::atomic<uint64_t> calls_{0};
  std::atomic<double> cost_[2] = {0.0, 0.0};  // [mask first, mask beside]; 0: not measured yet
};

// ---- x86 token gathers (gather_x86.cpp) ---------------------------------------------------------------------
// The portable gathers are templates in gather.h.

#if defined(VIDFAST_X86)
// One kept 16-pixel token from uint8 [B, T, H, W, 3] into its patch vector at a 64-byte aligned `out`, for out_t
// float, c10::BFloat16 or c10::Half: with AVX2 (where cpu_has(CpuIsa::kAvx2)) or AVX-512
// (where use_avx512()).
template <typename out_t>
VIDFAST_TARGET_AVX2 void gather_token_uint8_p16_avx2(const Grid& g, const uint8_t* video,
                                                     const U8Normalizer<float>& norm, int64_t b, int64_t t, int64_t h,
                                                     int64_t w, out_t* out);
template <typename out_t>
VIDFAST_TARGET_AVX512 void gather_token_uint8_p16_avx512(const Grid& g, const uint8_t* video,
                                                         const U8Normalizer<float>& norm, int64_t b, int64_t t,
                                                         int64_t h, int64_t w, out_t* out);
#endif

// Whether the AVX-512 paths (mask column sums, gather) may run: they need VBMI's byte permutes.
inline bool use_avx512() { return cpu_has(CpuIsa::kAvx512) && cpu_has_avx512_vbmi(); }

}  // namespace vidfast::rlt::cpu
