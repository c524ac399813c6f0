// rlt_mask's two passes on the CPU: the keep mask of each row of tokens from patch distances (vector column sums
// on x86), and the run lengths of each column of tokens.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/nvtx.h"
#include "rlt/cpu/rlt_cpu.h"

namespace vidfast::rlt::cpu {
namespace {

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

#if defined(VIDFAST_X86)
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
VIDFAST_TARGET_AVX2 void column_sums_avx2(const uint8_t* later, const uint8_t* earlier, int64_t row_stride, int64_t rows,
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
VIDFAST_TARGET_AVX512 void column_sums_avx512(const uint8_t* later, const uint8_t* earlier, int64_t row_stride,
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
VIDFAST_TARGET_AVX2 void patch16_channel_sums(const uint16_t* a, int64_t sums[3]) {
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
#if defined(VIDFAST_X86)
  if constexpr (std::is_same_v<acc_t, uint16_t>) {
    if (use_avx512()) {
      column_sums_avx512(later, earlier, row_len, g.patch, row_len, acc.data());
    } else if (cpu_has(CpuIsa::kAvx2)) {
      column_sums_avx2(later, earlier, row_len, g.patch, row_len, acc.data());
    }
    vector_path = cpu_has(CpuIsa::kAvx2);
  }
#endif
  if (!vector_path) column_sums(later, earlier, row_len, g.patch, row_len, acc.data());
  for (int64_t w = 0; w < g.wp; ++w) {
    int64_t sums[3] = {0, 0, 0};
    const acc_t* a = acc.data() + w * g.patch * 3;
#if defined(VIDFAST_X86)
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

}  // namespace

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

}  // namespace vidfast::rlt::cpu
