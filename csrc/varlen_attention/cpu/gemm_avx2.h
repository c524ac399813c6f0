#pragma once
// The float32 GEMM of the AVX2 path: C [m, n] = alpha op(A) op(B) (+ C), for the tile products of attention (k and
// n are at most a few hundred). The register-blocked micro-kernel of BLIS / GotoBLAS: 6 rows x 16 columns of C
// live in 12 AVX registers; each step of the inner dimension broadcasts 6 values of A, loads 16 of B and issues 12
// FMAs. B is first packed into panels of 16 columns (zero-padded past n, so every load is whole; 16-bit B is widened
// to float32 while it is packed); A is read in place through a row and a column stride, so a transposed A
// (dV += P^T dO, dK += dS^T Q) costs nothing. Only the AVX2 build includes this file (gemm.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace vidfast::attention::cpu::CPU_CAPABILITY {

constexpr int kMicroRows = 6;
constexpr int kPanel = 16;  // columns of a packed B panel and of a micro-tile

// 8 consecutive values as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  // A bfloat16 is the upper half of a float32.
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// out[x][j] = in[j][x] for an 8 x 8 block (rows `ld_in` elements / `ld_out` floats apart).
template <typename T>
void transpose_8x8(const T* in, int64_t ld_in, float* out, int64_t ld_out) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(in + i * ld_in);
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 s[8];
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ld_out, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ld_out, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
  }
}

// op(B) [k, n] as ceil(n / 16) panels of k x 16 floats: panel p holds columns 16p .. 16p + 15, zeros past n.
// trans_b: B is stored as its transpose [n, k] (row stride ldb), as K is for S = Q K^T.
template <typename T>
void pack_panels(bool trans_b, int64_t k, int64_t n, const T* b, int64_t ldb, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    float* panel = out + j0 * k;
    const int64_t cols = std::min<int64_t>(kPanel, n - j0);
    if (!trans_b) {
      for (int64_t x = 0; x < k; ++x) {
        const T* src = b + x * ldb + j0;
        float* dst = panel + x * kPanel;
        if (cols == kPanel) {
          _mm256_storeu_ps(dst, load8(src));
          _mm256_storeu_ps(dst + 8, load8(src + 8));
        } else {
          for (int64_t j = 0; j < kPanel; ++j) dst[j] = j < cols ? float(src[j]) : 0.0f;
        }
      }
      continue;
    }
    const T* src = b + j0 * ldb;
    int64_t x = 0;
    if (cols == kPanel) {
      for (; x + 8 <= k; x += 8) {
        transpose_8x8(src + x, ldb, panel + x * kPanel, kPanel);
        transpose_8x8(src + 8 * ldb + x, ldb, panel + x * kPanel + 8, kPanel);
      }
    }
    for (; x < k; ++x) {
      float* dst = panel + x * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) dst[j] = j < cols ? float(src[j * ldb + x]) : 0.0f;
    }
  }
}

// C[R rows, cols <= 16] = alpha A B (+ C) for A(r, x) = a[r * a_row + x * a_col] and one packed panel of B.
template <int R>
void micro_tile(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* panel, float alpha,
                bool accumulate, float* c, int64_t ldc, int64_t cols) {
  // Every loop over r is unrolled, so that the accumulators stay in registers.
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int64_t x = 0; x < k; ++x) {
    const __m256 b0 = _mm256_loadu_ps(panel + x * kPanel), b1 = _mm256_loadu_ps(panel + x * kPanel + 8);
    const float* ax = a + x * a_col;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(ax + r * a_row);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (cols == kPanel) {
      __m256 lo = _mm256_mul_ps(acc[r][0], va), hi = _mm256_mul_ps(acc[r][1], va);
      if (accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, lo);
      _mm256_storeu_ps(cr + 8, hi);
    } else {
      float lanes[kPanel];
      _mm256_storeu_ps(lanes, _mm256_mul_ps(acc[r][0], va));
      _mm256_storeu_ps(lanes + 8, _mm256_mul_ps(acc[r][1], va));
      for (int64_t j = 0; j < cols; ++j) cr[j] = accumulate ? cr[j] + lanes[j] : lanes[j];
    }
  }
}

// micro_tile for rows = 1 .. kMicroRows chosen at run time.
inline void micro_tile_rows(int rows, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* panel,
                            float alpha, bool accumulate, float* c, int64_t ldc, int64_t cols) {
  switch (rows) {
    case 6: micro_tile<6>(k, a, a_row, a_col, panel, alpha, accumulate, c, ldc, cols); break;
    case 5: micro_tile<5>(k, a, a_row, a_col, panel, alpha, accumulate, c, ldc, cols); break;
    case 4: micro_tile<4>(k, a, a_row, a_col, panel, alpha, accumulate, c, ldc, cols); break;
    case 3: micro_tile<3>(k, a, a_row, a_col, panel, alpha, accumulate, c, ldc, cols); break;
    case 2: micro_tile<2>(k, a, a_row, a_col, panel, alpha, accumulate, c, ldc, cols); break;
    default: micro_tile<1>(k, a, a_row, a_col, panel, alpha, accumulate, c, ldc, cols); break;
  }
}

// C[m, n] = alpha op(A) B (+ C where accumulate) for B [k, n] already in `panels` (pack_panels), op(A) read
// through the strides of a row-major A (lda) or of its transpose. panel_outer: each panel meets every row block
// before the next panel is read (for a few rows of A against many panels, as the forward's score strips: a panel
// then comes from L2 once, not once per row block); else each row block meets every panel.
inline void gemm_panels(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                        const float* panels, bool accumulate, float* c, int64_t ldc, bool panel_outer = false) {
  const int64_t a_row = trans_a ? 1 : lda, a_col = trans_a ? lda : 1;
  const auto tile = [&](int64_t i0, int64_t j0) {
    micro_tile_rows(int(std::min<int64_t>(kMicroRows, m - i0)), k, a + i0 * a_row, a_row, a_col, panels + j0 * k,
                    alpha, accumulate, c + i0 * ldc + j0, ldc, std::min<int64_t>(kPanel, n - j0));
  };
  if (panel_outer) {
    for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
      for (int64_t i0 = 0; i0 < m; i0 += kMicroRows) tile(i0, j0);
    }
  } else {
    for (int64_t i0 = 0; i0 < m; i0 += kMicroRows) {
      for (int64_t j0 = 0; j0 < n; j0 += kPanel) tile(i0, j0);
    }
  }
}

// C[m, n] += A B for a row-major A [m, k] (lda) and B [k, n] in `panels` (the forward's P V), the inner dimension
// in chunks of kc: a chunk of a panel (kc x 16 floats) comes from L2 once and serves every row block of A from L1,
// where whole panels (k x 16) would be read from L2 once per row block. Measured 4-5% faster forwards on Zen 3
// (kc = 128, 512 keys, 12 rows); each chunk adds a load and store of C.
inline void gemm_panels_accumulate_chunked(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                           const float* panels, float* c, int64_t ldc, int64_t kc) {
  for (int64_t x0 = 0; x0 < k; x0 += kc) {
    const int64_t chunk_k = std::min(kc, k - x0);
    for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
      const float* chunk = panels + j0 * k + x0 * kPanel;
      for (int64_t i0 = 0; i0 < m; i0 += kMicroRows) {
        micro_tile_rows(int(std::min<int64_t>(kMicroRows, m - i0)), chunk_k, a + i0 * lda + x0, lda, 1, chunk, 1.0f,
                        true, c + i0 * ldc + j0, ldc, std::min<int64_t>(kPanel, n - j0));
      }
    }
  }
}

// The floats `panels` needs for op(B) [k, n].
inline int64_t panel_floats(int64_t k, int64_t n) { return (n + kPanel - 1) / kPanel * kPanel * k; }

// C[m, n] = alpha op(A) op(B) (+ C where accumulate), B packed into `panels` (panel_floats(k, n) floats) first.
inline void gemm_packed(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc,
                        float* panels) {
  pack_panels(trans_b, k, n, b, ldb, panels);
  gemm_panels(trans_a, m, n, k, alpha, a, lda, panels, accumulate, c, ldc);
}

}  // namespace vidfast::attention::cpu::CPU_CAPABILITY
