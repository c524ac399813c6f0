// CPU kernels of rlt_mask and rlt_tokenize: a pass over rows of tokens computes the keep mask from patch
// distances, a pass over columns gives run lengths, and (rlt_tokenize) a pass over rows, after or beside the mask,
// gathers and normalizes the kept patches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_alloc.h"
#include "common/cpu_dispatch.h"
#include "common/nvtx.h"
#include "rlt/rlt.h"

namespace vidfast::rlt {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VIDFAST_RLT_X86 1
#define VIDFAST_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VIDFAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,fma,f16c")))

// The explicit vector loops below run where ATen would pick AVX2 or AVX-512 (so ATEN_CPU_CAPABILITY=default
// selects the portable loops and =avx2 the AVX2 ones, which the tests compare against); the AVX-512 ones also
// need VBMI's byte permutes.
bool cpu_has_avx2() {
  static const bool has = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return has;
}
bool cpu_has_avx512() {
  static const bool has = at::get_cpu_capability() == "AVX512" && __builtin_cpu_supports("avx512vbmi");
  return has;
}
#endif

// Tells the core that this thread is spinning, so a sibling hyperthread gets the cycles.
inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Sums of |later - earlier| down `rows` image rows, for each of the row_len bytes of a row (contiguous, so the
// loop vectorizes). acc_t is uint16_t while rows * 255 fits, int32_t beyond.
template <typename acc_t>
VIDFAST_CPU_CLONES void column_sums(const uint8_t* later, const uint8_t* earlier, int64_t row_stride, int64_t rows,
                                    int64_t row_len, acc_t* acc) {
  std::fill(acc, acc + row_len, acc_t(0));
  for (int64_t y = 0; y < rows; ++y, later += row_stride, earlier += row_stride) {
#pragma omp simd
    for (int64_t i = 0; i < row_len; ++i) {
      acc[i] += acc_t(later[i] > earlier[i] ? later[i] - earlier[i] : earlier[i] - later[i]);
    }
  }
}

#if defined(VIDFAST_RLT_X86)
// Asks for the same place in the next band of patch rows (the next token row, which the mask reads next): the
// column loops below walk 2 x 16 image rows at once, more streams than the hardware prefetcher follows, and this
// made the mask pass 13-25% faster. Prefetches never fault, so running past the last band is harmless.
inline void prefetch_next_band(const uint8_t* later, const uint8_t* earlier, int64_t band_bytes) {
  auto ahead = [band_bytes](const uint8_t* p) {  // integer arithmetic: the address may lie past the video
    return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(band_bytes));
  };
  _mm_prefetch(ahead(later), _MM_HINT_T0);
  _mm_prefetch(ahead(earlier), _MM_HINT_T0);
}

// column_sums for uint16 sums with the row loop innermost: 32 columns accumulate in registers over all rows, so
// each input byte costs a load and a few byte ops instead of widening to memory-resident int32 sums.
VIDFAST_AVX2 void column_sums_avx2(const uint8_t* later, const uint8_t* earlier, int64_t row_stride, int64_t rows,
                                   int64_t row_len, uint16_t* acc) {
  const __m256i zero = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= row_len; i += 32) {
    __m256i lo = zero, hi = zero;
    for (int64_t y = 0; y < rows; ++y) {
      if (i % 64 == 0) prefetch_next_band(later + y * row_stride + i, earlier + y * row_stride + i, rows * row_stride);
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(later + y * row_stride + i));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(earlier + y * row_stride + i));
      const __m256i diff = _mm256_sub_epi8(_mm256_max_epu8(a, b), _mm256_min_epu8(a, b));
      lo = _mm256_add_epi16(lo, _mm256_unpacklo_epi8(diff, zero));
      hi = _mm256_add_epi16(hi, _mm256_unpackhi_epi8(diff, zero));
    }
    // unpack works within 128-bit lanes: lo holds bytes 0-7 and 16-23, hi 8-15 and 24-31.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
  }
  if (i < row_len) column_sums(later + i, earlier + i, row_stride, rows, row_len - i, acc + i);
}

// The same 64 columns at a time.
VIDFAST_AVX512 void column_sums_avx512(const uint8_t* later, const uint8_t* earlier, int64_t row_stride,
                                       int64_t rows, int64_t row_len, uint16_t* acc) {
  const __m512i zero = _mm512_setzero_si512();
  // unpack works within 128-bit lanes: lo holds bytes 0-7, 16-23, 32-39, 48-55 and hi the 8 after each; these
  // 64-bit lane indices put them back in order.
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  int64_t i = 0;
  for (; i + 64 <= row_len; i += 64) {
    __m512i lo = zero, hi = zero;
    for (int64_t y = 0; y < rows; ++y) {
      prefetch_next_band(later + y * row_stride + i, earlier + y * row_stride + i, rows * row_stride);
      const __m512i a = _mm512_loadu_si512(later + y * row_stride + i);
      const __m512i b = _mm512_loadu_si512(earlier + y * row_stride + i);
      const __m512i diff = _mm512_sub_epi8(_mm512_max_epu8(a, b), _mm512_min_epu8(a, b));
      lo = _mm512_add_epi16(lo, _mm512_unpacklo_epi8(diff, zero));
      hi = _mm512_add_epi16(hi, _mm512_unpackhi_epi8(diff, zero));
    }
    _mm512_storeu_si512(acc + i, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(acc + i + 32, _mm512_permutex2var_epi64(lo, second, hi));
  }
  if (i < row_len) column_sums_avx2(later + i, earlier + i, row_stride, rows, row_len - i, acc + i);
}

// 0/1 weights that pick channel c out of 16 of a 16-pixel patch's 48 interleaved column sums, chunk k.
struct ChannelPicks {
  alignas(32) int16_t w[3][3][16];
  constexpr ChannelPicks() : w() {
    for (int k = 0; k < 3; ++k)
      for (int c = 0; c < 3; ++c)
        for (int i = 0; i < 16; ++i) w[k][c][i] = int16_t((16 * k + i) % 3 == c);
  }
};
constexpr ChannelPicks kChannelPicks;

// Per-channel sums of a 16-pixel patch's 48 uint16 column sums (each at most 16 * 255, so signed 16-bit
// multiply-adds are exact): 9 multiply-adds instead of 48 scalar adds.
VIDFAST_AVX2 void patch16_channel_sums(const uint16_t* a, int64_t sums[3]) {
  __m256i acc[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int k = 0; k < 3; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * k));
    for (int c = 0; c < 3; ++c) {
      const __m256i pick = _mm256_load_si256(reinterpret_cast<const __m256i*>(kChannelPicks.w[k][c]));
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(v, pick));
    }
  }
  for (int c = 0; c < 3; ++c) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(acc[c]), _mm256_extracti128_si256(acc[c], 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
    sums[c] = _mm_cvtsi128_si32(x);
  }
}
#endif

// keep[b, t', h', w'] for one row (b, t', h') of tokens, from uint8 [B, T, H, W, 3].
template <typename acc_t>
void keep_row_uint8(const Params& p, const uint8_t* video, int64_t b, int64_t t, int64_t h, bool* keep,
                    std::vector<acc_t>& acc) {
  const Grid& g = p.grid;
  const int64_t row_len = g.width * 3;
  acc.resize(row_len);
  const uint8_t* later = video + g.thwc(b, g.later_frame(t), h * g.patch, 0);
  const uint8_t* earlier = video + g.thwc(b, g.earlier_frame(t), h * g.patch, 0);
  bool vector_path = false;  // column sums done by AVX2 or AVX-512 (and channel sums of 16-pixel patches by AVX2)
#if defined(VIDFAST_RLT_X86)
  if constexpr (std::is_same_v<acc_t, uint16_t>) {
    if (cpu_has_avx512()) {
      column_sums_avx512(later, earlier, row_len, g.patch, row_len, acc.data());
    } else if (cpu_has_avx2()) {
      column_sums_avx2(later, earlier, row_len, g.patch, row_len, acc.data());
    }
    vector_path = cpu_has_avx2();
  }
#endif
  if (!vector_path) column_sums(later, earlier, row_len, g.patch, row_len, acc.data());
  for (int64_t w = 0; w < g.wp; ++w) {
    int64_t sums[3] = {0, 0, 0};
    const acc_t* a = acc.data() + w * g.patch * 3;
#if defined(VIDFAST_RLT_X86)
    if constexpr (std::is_same_v<acc_t, uint16_t>) {
      if (vector_path && g.patch == 16) patch16_channel_sums(a, sums);
    }
#endif
    if (!vector_path || g.patch != 16) {
      for (int64_t x = 0; x < g.patch; ++x) {
        sums[0] += a[3 * x];
        sums[1] += a[3 * x + 1];
        sums[2] += a[3 * x + 2];
      }
    }
    keep[w] = keep_token(t, distance_from_u8_sums(sums, p.inv_std, g.patch), p.threshold);
  }
}

// The same from floating [B, 3, T, H, W], already normalized; accumulates in double.
template <typename scalar_t>
VIDFAST_CPU_CLONES void keep_row_float(const Params& p, const scalar_t* video, int64_t b, int64_t t, int64_t h, bool* keep,
                    std::vector<double>& acc) {
  const Grid& g = p.grid;
  acc.assign(g.width, 0.0);
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t ph = 0; ph < g.patch; ++ph) {
      const scalar_t* later = video + g.cthw(b, c, g.later_frame(t), h * g.patch + ph, 0);
      const scalar_t* earlier = video + g.cthw(b, c, g.earlier_frame(t), h * g.patch + ph, 0);
      double* a = acc.data();
#pragma omp simd
      for (int64_t x = 0; x < g.width; ++x) a[x] += std::abs(double(later[x]) - double(earlier[x]));
    }
  }
  for (int64_t w = 0; w < g.wp; ++w) {
    double sum = 0.0;
    for (int64_t x = 0; x < g.patch; ++x) sum += acc[w * g.patch + x];
    keep[w] = keep_token(t, distance_from_sum(sum, g.patch), p.threshold);
  }
}

// Writes the keep mask of token rows [begin, end), rows being (b, t', h') in raster order. Each call owns its
// scratch, so threads may call it on disjoint ranges.
using MaskRows = std::function<void(int64_t begin, int64_t end)>;

MaskRows make_mask_rows(const Params& p, const at::Tensor& video, bool* keep) {
  const Grid& g = p.grid;
  auto rows_with = [&p, &g, keep](auto keep_row, auto* data, auto acc_zero) -> MaskRows {
    return [&p, &g, keep, keep_row, data](int64_t begin, int64_t end) {
      std::vector<decltype(acc_zero)> acc;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (g.tp * g.hp), t = (r / g.hp) % g.tp, h = r % g.hp;
        bool* k = keep + r * g.wp;
        if (t == 0) {
          std::fill(k, k + g.wp, true);
        } else {
          keep_row(p, data, b, t, h, k, acc);
        }
      }
    };
  };
  if (p.is_uint8) {
    const uint8_t* data = video.data_ptr<uint8_t>();
    return g.patch * 255 <= 65535 ? rows_with(keep_row_uint8<uint16_t>, data, uint16_t(0))
                                  : rows_with(keep_row_uint8<int32_t>, data, int32_t(0));
  }
  MaskRows mask_rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, video.scalar_type(), "rlt_mask_cpu", [&] {
    mask_rows = rows_with(keep_row_float<scalar_t>, video.data_ptr<scalar_t>(), double(0));
  });
  return mask_rows;
}

// rlt_mask's phase 1: the keep mask, one task per row.
void compute_keep(const Params& p, const at::Tensor& video, bool* keep) {
  VIDFAST_NVTX_RANGE("rlt/mask");
  const MaskRows mask_rows = make_mask_rows(p, video, keep);
  at::parallel_for(0, p.grid.batch * p.grid.tp * p.grid.hp, 1, mask_rows);
}

int64_t kept_in_row(const bool* keep, int64_t r, int64_t wp) {
  return std::count(keep + r * wp, keep + (r + 1) * wp, true);
}

// gather(r, first slot of row r, begin, end) copies the kept tokens of row r whose output slots are in
// [begin, end).
using GatherTokens = std::function<void(int64_t, int64_t, int64_t, int64_t)>;

// rlt_tokenize's two schedules of mask and gather; both fill row_start (rows + 1 entries: the output slot of each
// row's first kept token, a scan in raster order) and gather every kept token.
//
// Mask first: all threads mask, then all gather, each a contiguous share of the tokens (not of the rows: clips
// keep very different shares).
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
#if defined(VIDFAST_RLT_X86)
    _mm_sfence();  // orders any streaming stores before the join
#endif
  });
}

// Mask beside gather: one thread masks blocks of rows in raster order and publishes their slots while the others
// gather the published rows, a block at a time; the masker gathers too once the mask is done.
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
#if defined(VIDFAST_RLT_X86)
    _mm_sfence();
#endif
  };
  // Where the pool runs fewer threads than asked, one call covers several workers and masks before it gathers.
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t) {
    if (begin == 0) mask_role();
    gather_role();
  });
}

// Which schedule is faster depends on the machine's state, not on the input. Where the streaming stores of one
// thread already fill the memory bus (a neighbour loading it, few channels), masking beside the gather hides the
// mask: ~15% faster on the 2-core build machine. Where two threads write twice as fast, masking first is ~15%
// faster, as a mask pass beside streaming stores runs slower. So calls time themselves, in ns per output byte
// averaged over recent calls of each schedule: the first kLearnCalls alternate, then calls use the faster one
// and try the other every kExploreEvery calls.
class ScheduleChooser {
 public:
  static constexpr uint64_t kLearnCalls = 8, kExploreEvery = 8;
  enum Schedule { kMaskFirst = 0, kMaskBeside = 1 };
  struct Choice {
    Schedule schedule;
    bool timed;  // the process's first call pays the output's page faults, so it does not count
  };

  // Costs per output byte differ with the input and output types, so each pair learns its own.
  static ScheduleChooser& for_types(bool uint8_input, at::ScalarType out_dtype) {
    static std::mutex mutex;
    static std::map<std::pair<bool, at::ScalarType>, ScheduleChooser> choosers;
    std::lock_guard<std::mutex> lock(mutex);
    return choosers[{uint8_input, out_dtype}];
  }

  Choice pick() {
    const uint64_t call = calls_.fetch_add(1);
    if (call <= kLearnCalls) return {Schedule(call % 2), call > 0};
    const Schedule best = cost_[kMaskBeside].load() < cost_[kMaskFirst].load() ? kMaskBeside : kMaskFirst;
    return {call % kExploreEvery == 0 ? Schedule(1 - best) : best, true};
  }
  void record(Schedule s, double ns_per_byte) {
    const double old = cost_[s].load();
    cost_[s].store(old == 0.0 ? ns_per_byte : 0.5 * (old + ns_per_byte));
  }

 private:
  std::atomic<uint64_t> calls_{0};
  std::atomic<double> cost_[2] = {0.0, 0.0};  // 0: not measured yet
};

// Phase 2: run lengths, one task per column (b, h', w').
void compute_lengths(const Grid& g, const bool* keep, int32_t* lengths) {
  const int64_t plane = g.hp * g.wp;
  at::parallel_for(0, g.batch * plane, 256, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      const int64_t base = (col / plane) * g.tp * plane + col % plane;
      column_run_lengths(
          g.tp, [&](int64_t t) { return keep[base + t * plane]; },
          [&](int64_t t, int32_t len) { lengths[base + t * plane] = len; });
    }
  });
}

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

// float -> out_t for finite values. bfloat16 rounds to nearest even with plain integer arithmetic, which
// vectorizes (c10's conversion branches on NaN, which cannot occur for normalized uint8 pixels).
template <typename out_t, typename acc_t>
inline out_t from_finite(acc_t v) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    uint32_t bits;
    const float f = float(v);
    std::memcpy(&bits, &f, sizeof(bits));
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return c10::BFloat16(uint16_t(bits >> 16), c10::BFloat16::from_bits());
  } else {
    return out_t(v);
  }
}

// Copies one kept token's normalized pixels into its [c][dt][ph][pw] patch vector (de-interleaving RGB).
// kPatch > 0 fixes the patch size at compile time (the common 14 and 16), so the row loops unroll into whole
// vectors; kPatch == 0 reads it from the grid.
template <int kPatch, typename out_t>
VIDFAST_CPU_CLONES void gather_token_uint8(const Grid& g, const uint8_t* __restrict video,
                                           const U8Normalizer<acc_type<out_t, uint8_t>>& norm, int64_t b, int64_t t,
                                           int64_t h, int64_t w, out_t* __restrict out) {
  const int64_t patch = kPatch > 0 ? kPatch : g.patch;
  const int64_t pp = patch * patch, channel_stride = g.tubelet * pp;
  const auto s0 = norm.scale[0], s1 = norm.scale[1], s2 = norm.scale[2];
  const auto b0 = norm.bias[0], b1 = norm.bias[1], b2 = norm.bias[2];
  for (int64_t dt = 0; dt < g.tubelet; ++dt) {
    for (int64_t ph = 0; ph < patch; ++ph) {
      const uint8_t* __restrict src = video + g.thwc(b, t * g.tubelet + dt, h * patch + ph, w * patch);
      out_t* __restrict r = out + dt * pp + ph * patch;
      out_t* __restrict gch = r + channel_stride;
      out_t* __restrict bch = r + 2 * channel_stride;
      for (int64_t pw = 0; pw < patch; ++pw) {
        r[pw] = from_finite<out_t>(src[3 * pw] * s0 + b0);
        gch[pw] = from_finite<out_t>(src[3 * pw + 1] * s1 + b1);
        bch[pw] = from_finite<out_t>(src[3 * pw + 2] * s2 + b2);
      }
    }
  }
}

#if defined(VIDFAST_RLT_X86)
// pshufb masks that take channel c of 16 interleaved RGB pixels (48 bytes in three 16-byte loads) from load k:
// byte i of channel c is byte 3i + c of the row; 0x80 zeroes the lanes another load provides.
struct DeinterleaveMasks {
  alignas(16) int8_t m[3][3][16];
  constexpr DeinterleaveMasks() : m() {
    for (int c = 0; c < 3; ++c)
      for (int k = 0; k < 3; ++k)
        for (int i = 0; i < 16; ++i) m[c][k][i] = (3 * i + c) / 16 == k ? int8_t((3 * i + c) % 16) : int8_t(-128);
  }
};
constexpr DeinterleaveMasks kDeinterleave;

// bfloat16 bits (in the low half of each 32-bit lane) of 8 finite floats, rounded to nearest even as
// from_finite does.
VIDFAST_AVX2 inline __m256i bfloat16_bits(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
}

// 16 floats -> out_t at a 32-byte aligned dst, written around the caches: the output is far larger than the
// caches and this op does not read it again, so streaming stores save the read-for-ownership of every line.
template <typename out_t>
VIDFAST_AVX2 inline void stream16(out_t* dst, __m256 lo, __m256 hi) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + 8, hi);
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    // packus interleaves 128-bit lanes; the permute puts the 16 halves back in order.
    const __m256i packed = _mm256_packus_epi32(bfloat16_bits(lo), bfloat16_bits(hi));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(packed, 0xD8));
  } else {
    static_assert(std::is_same_v<out_t, c10::Half>);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT),
                                                                         _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT)));
  }
}

// gather_token_uint8 for 16-pixel patches with explicit shuffles: the compiler's stride-3 loads cost twice the
// memory traffic's time. Each patch row is three 16-byte loads, three shuffles per channel, and 16 outputs per
// channel (a whole cache line in float32; every such row starts 64-byte aligned in a 64-byte aligned output).
template <typename out_t>
VIDFAST_AVX2 void gather_token_uint8_p16_avx2(const Grid& g, const uint8_t* __restrict video,
                                              const U8Normalizer<float>& norm, int64_t b, int64_t t, int64_t h,
                                              int64_t w, out_t* __restrict out) {
  constexpr int64_t kPatch = 16, kPP = kPatch * kPatch;
  const int64_t channel_stride = g.tubelet * kPP;
  __m128i masks[3][3];
  __m256 scale[3], bias[3];
  for (int c = 0; c < 3; ++c) {
    for (int k = 0; k < 3; ++k) masks[c][k] = _mm_load_si128(reinterpret_cast<const __m128i*>(kDeinterleave.m[c][k]));
    scale[c] = _mm256_set1_ps(norm.scale[c]);
    bias[c] = _mm256_set1_ps(norm.bias[c]);
  }
  for (int64_t dt = 0; dt < g.tubelet; ++dt) {
    const uint8_t* src = video + g.thwc(b, t * g.tubelet + dt, h * kPatch, w * kPatch);
    const int64_t row_stride = g.width * 3;
    out_t* dst = out + dt * kPP;
    for (int64_t ph = 0; ph < kPatch; ++ph, src += row_stride, dst += kPatch) {
      const __m128i in[3] = {_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32))};
      for (int c = 0; c < 3; ++c) {
        const __m128i bytes = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(in[0], masks[c][0]),
                                                        _mm_shuffle_epi8(in[1], masks[c][1])),
                                           _mm_shuffle_epi8(in[2], masks[c][2]));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
        stream16<out_t>(dst + c * channel_stride, _mm256_fmadd_ps(lo, scale[c], bias[c]),
                               _mm256_fmadd_ps(hi, scale[c], bias[c]));
      }
    }
  }
}

// 16 floats -> out_t at a 64-byte (float32) or 32-byte aligned dst, streamed as stream16 does.
template <typename out_t>
VIDFAST_AVX512 inline void stream16_avx512(out_t* dst, __m512 x) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm512_stream_ps(dst, x);
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
  } else {
    static_assert(std::is_same_v<out_t, c10::Half>);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
}

// Byte i of a permuted patch row is byte 3 (i % 16) + i / 16 of the interleaved one: R, G, B in 16-byte lanes.
struct PlanarOrder {
  alignas(64) uint8_t index[64];
  constexpr PlanarOrder() : index() {
    for (int i = 0; i < 48; ++i) index[i] = uint8_t(3 * (i % 16) + i / 16);
  }
};
constexpr PlanarOrder kPlanarOrder;

// gather_token_uint8_p16_avx2 with AVX-512: one masked 48-byte load and one byte permute split a patch row into
// its R, G and B bytes, and each channel's 16 values are one register.
template <typename out_t>
VIDFAST_AVX512 void gather_token_uint8_p16_avx512(const Grid& g, const uint8_t* __restrict video,
                                                  const U8Normalizer<float>& norm, int64_t b, int64_t t, int64_t h,
                                                  int64_t w, out_t* __restrict out) {
  constexpr int64_t kPatch = 16, kPP = kPatch * kPatch;
  const int64_t channel_stride = g.tubelet * kPP, row_stride = g.width * 3;
  const __m512i order = _mm512_load_si512(kPlanarOrder.index);
  const __m512 s0 = _mm512_set1_ps(norm.scale[0]), s1 = _mm512_set1_ps(norm.scale[1]), s2 = _mm512_set1_ps(norm.scale[2]);
  const __m512 b0 = _mm512_set1_ps(norm.bias[0]), b1 = _mm512_set1_ps(norm.bias[1]), b2 = _mm512_set1_ps(norm.bias[2]);
  for (int64_t dt = 0; dt < g.tubelet; ++dt) {
    const uint8_t* src = video + g.thwc(b, t * g.tubelet + dt, h * kPatch, w * kPatch);
    out_t* dst = out + dt * kPP;
    for (int64_t ph = 0; ph < kPatch; ++ph, src += row_stride, dst += kPatch) {
      const __m512i planar = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8((1ull << 48) - 1, src));
      const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(planar)));
      const __m512 gr = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(planar, 1)));
      const __m512 bl = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(planar, 2)));
      stream16_avx512<out_t>(dst, _mm512_fmadd_ps(r, s0, b0));
      stream16_avx512<out_t>(dst + channel_stride, _mm512_fmadd_ps(gr, s1, b1));
      stream16_avx512<out_t>(dst + 2 * channel_stride, _mm512_fmadd_ps(bl, s2, b2));
    }
  }
}

// Runs gather_with with the widest vector token gather where out_t is one it writes; false where it is not.
template <typename out_t, typename GatherWith>
bool gather_uint8_p16_vector(const Grid& g, const uint8_t* video, const Params& p, out_t* out,
                             GatherWith& gather_with) {
  if constexpr (std::is_same_v<out_t, double>) {
    return false;
  } else {
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(out) % 64 == 0, "rlt_tokenize: unaligned output");
    const U8Normalizer<float> norm(p.mean, p.std);
    if (cpu_has_avx512()) {
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

template <int kPatch, typename in_t, typename out_t>
VIDFAST_CPU_CLONES void gather_token_float(const Grid& g, const in_t* __restrict video, int64_t b, int64_t t,
                                           int64_t h, int64_t w, out_t* __restrict out) {
  const int64_t patch = kPatch > 0 ? kPatch : g.patch;
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t dt = 0; dt < g.tubelet; ++dt) {
      for (int64_t ph = 0; ph < patch; ++ph) {
        const in_t* __restrict src = video + g.cthw(b, c, t * g.tubelet + dt, h * patch + ph, w * patch);
        out_t* __restrict dst = out + ((c * g.tubelet + dt) * patch + ph) * patch;
        for (int64_t pw = 0; pw < patch; ++pw) dst[pw] = cast_element<out_t>(src[pw]);
      }
    }
  }
}

// Calls fn with the patch size as a compile-time constant where it is a common one.
template <typename Fn>
void with_patch_size(int64_t patch, Fn&& fn) {
  if (patch == 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (patch == 14) {
    fn(std::integral_constant<int, 14>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rlt_tokenize_cpu(
    const at::Tensor& video_in, int64_t tubelet, int64_t patch, double threshold, at::ArrayRef<double> mean,
    at::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  const Params p = check_arguments(video_in, tubelet, patch, threshold, mean, std, out_dtype);
  const Grid& g = p.grid;
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
    if (choice.schedule == ScheduleChooser::kMaskBeside) {
      mask_beside_gather(rows, g.wp, keep_ptr, mask_rows, row_start, gather);
    } else {
      mask_then_gather(rows, g.wp, keep_ptr, mask_rows, row_start, gather);
    }
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
#if defined(VIDFAST_RLT_X86)
          if (kPatch == 16 && cpu_has_avx2() && gather_uint8_p16_vector(g, data, p, out, gather_with)) return;
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

TORCH_LIBRARY_IMPL(vidfast, CPU, m) {
  m.impl("rlt_mask", &rlt_mask_cpu);
  m.impl("rlt_tokenize", &rlt_tokenize_cpu);
}

}  // namespace vidfast::rlt
