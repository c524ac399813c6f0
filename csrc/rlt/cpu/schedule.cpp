// rlt_tokenize's two schedules of mask and gather, and the chooser that times them.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/nvtx.h"
#include "rlt/cpu/rlt_cpu.h"

namespace vidfast::rlt::cpu {
namespace {

// Tells the core that this thread is spinning, so a sibling hyperthread gets the cycles.
inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

int64_t kept_in_row(const bool* keep, int64_t r, int64_t wp) {
  return std::count(keep + r * wp, keep + (r + 1) * wp, true);
}

// Schedule::kMaskFirst (rlt_cpu.h says what each schedule does).
void mask_then_gather(int64_t rows, int64_t wp, const bool* keep, const MaskRows& mask_rows,
                      std::vector<int64_t>& row_start, const GatherTokens& gather) {
  {
    VIDFAST_NVTX_RANGE("rlt/mask");
    at::parallel_for(0, rows, 1, mask_rows);
  }
  row_start.assign(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) row_start[r + 1] = row_start[r] + kept_in_row(keep, r, wp);
  VIDFAST_NVTX_RANGE("rlt/gather");
  at::parallel_for(0, row_start[rows], 64, [&](int64_t begin, int64_t end) {
    int64_t r = std::upper_bound(row_start.begin(), row_start.end(), begin) - row_start.begin() - 1;
    for (; r < rows && row_start[r] < end; ++r) {
      gather(r, row_start[r], std::max(begin, row_start[r]), std::min(end, row_start[r + 1]));
    }
#if defined(VIDFAST_X86)
    _mm_sfence();  // orders any streaming stores before the join
#endif
  });
}

// Schedule::kMaskBeside.
void mask_beside_gather(int64_t rows, int64_t wp, const bool* keep, const MaskRows& mask_rows,
                        std::vector<int64_t>& row_start, const GatherTokens& gather) {
  constexpr int64_t kRowsPerBlock = 8;  // blocks keep the threads off each other's cache lines
  alignas(64) std::atomic<int64_t> published_rows{0};
  alignas(64) std::atomic<int64_t> next_block{0};
  row_start.assign(rows + 1, 0);
  auto mask_role = [&] {
    VIDFAST_NVTX_RANGE("rlt/mask");
    for (int64_t begin = 0; begin < rows; begin += kRowsPerBlock) {
      const int64_t end = std::min(rows, begin + kRowsPerBlock);
      mask_rows(begin, end);
      for (int64_t r = begin; r < end; ++r) row_start[r + 1] = row_start[r] + kept_in_row(keep, r, wp);
      published_rows.store(end, std::memory_order_release);
    }
  };
  auto gather_role = [&] {
    VIDFAST_NVTX_RANGE("rlt/gather");
    for (int64_t begin; (begin = next_block.fetch_add(1) * kRowsPerBlock) < rows;) {
      const int64_t end = std::min(rows, begin + kRowsPerBlock);
      // The masker is running and waits on no one, so this wait ends; it is rare, as masking a row costs a
      // fraction of gathering it.
      for (int spins = 0; published_rows.load(std::memory_order_acquire) < end; ++spins) {
        if (spins < 1000) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
      }
      for (int64_t r = begin; r < end; ++r) gather(r, row_start[r], row_start[r], row_start[r + 1]);
    }
#if defined(VIDFAST_X86)
    _mm_sfence();
#endif
  };
  // Where the pool runs fewer threads than asked, one call covers several workers and masks before it gathers.
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t) {
    if (begin == 0) mask_role();
    gather_role();
  });
}

thread_local Schedule last_schedule = Schedule::kNone;

}  // namespace

void run_schedule(Schedule schedule, int64_t rows, int64_t wp, const bool* keep, const MaskRows& mask_rows,
                  std::vector<int64_t>& row_start, const GatherTokens& gather) {
  if (schedule == Schedule::kMaskBeside) {
    mask_beside_gather(rows, wp, keep, mask_rows, row_start, gather);
  } else {
    mask_then_gather(rows, wp, keep, mask_rows, row_start, gather);
  }
  last_schedule = schedule;
}

const char* last_schedule_name() {
  switch (last_schedule) {
    case Schedule::kMaskFirst:
      return "mask_first";
    case Schedule::kMaskBeside:
      return "mask_beside";
    default:
      return "none";
  }
}

ScheduleChooser& ScheduleChooser::for_types(bool uint8_input, at::ScalarType out_dtype) {
  static std::mutex mutex;
  static std::map<std::pair<bool, at::ScalarType>, ScheduleChooser> choosers;
  std::lock_guard<std::mutex> lock(mutex);
  return choosers[{uint8_input, out_dtype}];
}

ScheduleChooser::Choice ScheduleChooser::pick() {
  const uint64_t call = calls_.fetch_add(1);
  if (call <= kLearnCalls) return {call % 2 ? Schedule::kMaskBeside : Schedule::kMaskFirst, call > 0};
  const Schedule best = cost_[1].load() < cost_[0].load() ? Schedule::kMaskBeside : Schedule::kMaskFirst;
  const Schedule other = best == Schedule::kMaskBeside ? Schedule::kMaskFirst : Schedule::kMaskBeside;
  return {call % kExploreEvery == 0 ? other : best, true};
}

void ScheduleChooser::record(Schedule s, double ns_per_byte) {
  // Threads record at once: a compare-exchange loop, so no thread's measurement overwrites another's unseen.
  std::atomic<double>& cost = cost_[s == Schedule::kMaskBeside ? 1 : 0];
  double old = cost.load();
  while (!cost.compare_exchange_weak(old, old == 0.0 ? ns_per_byte : 0.5 * (old + ns_per_byte))) {
  }
}

}  // namespace vidfast::rlt::cpu
