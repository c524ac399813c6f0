#pragma once
// Row-major GEMM on float32 (or float64) tiles. On the avx2 path float32 tiles go to this package's FMA micro-kernel
// (gemm_avx2.h); on the brgemm path (x86 with AVX2 or AVX-512) to oneDNN's batch-reduce GEMM micro-kernel
// (at::native::cpublas::brgemm, JIT-compiled for the CPU), measured 2.3x faster per core than MKL's sgemm on this
// project's AMD build machine, where MKL takes its generic AVX2 path. Otherwise BLAS's sgemm_ /
// dgemm_, which libtorch_cpu exports in x86 builds (MKL); they are bound weakly so the library still loads against a
// torch without them, and then a plain loop (correct, slower) takes over. Included by kernel_impl.h once per
// CPU_CAPABILITY, so everything that depends on it lives in that namespace.
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <cstdint>
#include <type_traits>
#include <vector>

#include "varlen_attention/cpu/kernel.h"
#if defined(CPU_CAPABILITY_AVX2)
#include "varlen_attention/cpu/gemm_avx2.h"
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));

// MKL would otherwise start its own threads inside each of our worker threads: with OpenMP's spinning waits that
// oversubscribes the cores and was measured 10-50x slower under load.
// libtorch exports MKL's Fortran-style entry (argument by pointer).
extern "C" int mkl_set_num_threads_local_(const int* threads) __attribute__((weak));

namespace vidfast::attention::cpu {

// While alive, BLAS calls from this thread run on this thread only.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    const int one = 1;
    saved_ = mkl_set_num_threads_local_ ? mkl_set_num_threads_local_(&one) : 0;
  }
  ~SingleThreadedBlas() {
    if (mkl_set_num_threads_local_) mkl_set_num_threads_local_(&saved_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int saved_ = 0;
};

// Whether torch's brgemm runs T x T -> float32 here: oneDNN builds its micro-kernels on first use and throws where
// the CPU (or the build) has none for T, so one tiny call, checked against its answer, decides for the process.
// 16-bit T (B in the VNNI-2 layout of pack_vnni) needs the matching dot-product instructions (AVX512-BF16, AMX,
// AVX512-FP16); without them the kernels widen tiles to float32.
template <typename T>
bool brgemm_works() {
  static const bool works = [] {
    try {
      // A [1, 2] times B [2, 1]: for one column the VNNI-2 layout is the plain one.
      const T a[2] = {T(2.0f), T(3.0f)}, b[2] = {T(5.0f), T(7.0f)};
      float c = 1.0f;
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, true, a, b, &c, sizeof(T) == 2);
      at::native::cpublas::brgemm_release(sizeof(T) == 2);
      return c == 32.0f;
    } catch (...) {
      return false;
    }
  }();
  return works;
}

// Drops the hardware state brgemm may leave on this thread (the AMX tile configuration on CPUs that have AMX), as
// PyTorch's own kernels do after their tiles.
inline void release_brgemm() {
  if (brgemm_works<float>()) at::native::cpublas::brgemm_release(false);
  if (brgemm_works<at::BFloat16>() || brgemm_works<at::Half>()) at::native::cpublas::brgemm_release(true);
}

namespace CPU_CAPABILITY {

// dst[j * ld_dst + i] = scale * src[i * ld_src + j] for i < rows, j < cols (an optionally scaled transpose, or copy
// when `transpose` is false), in 16 x 16 register blocks.
template <typename T>
void copy_scaled(bool transpose, int64_t rows, int64_t cols, T scale, const T* src, int64_t ld_src, T* dst,
                 int64_t ld_dst) {
  using Vec = at::vec::Vectorized<T>;
  if (!transpose) {
    for (int64_t i = 0; i < rows; ++i) {
      at::vec::map([scale](Vec x) { return x * Vec(scale); }, dst + i * ld_dst, src + i * ld_src, cols);
    }
    return;
  }
  constexpr int kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int bi = int(std::min<int64_t>(kBlock, rows - i0)), bj = int(std::min<int64_t>(kBlock, cols - j0));
      T* out = dst + j0 * ld_dst + i0;
      if (bi == kBlock && bj == kBlock) {
        at::vec::transpose_mxn<T, kBlock, kBlock>(src + i0 * ld_src + j0, ld_src, out, ld_dst);
      } else {
        at::vec::transpose_mxn<T>(src + i0 * ld_src + j0, ld_src, out, ld_dst, bi, bj);
      }
      if (scale != T(1)) {
        for (int j = 0; j < bj; ++j) {
          at::vec::map([scale](Vec x) { return x * Vec(scale); }, out + j * ld_dst, out + j * ld_dst, bi);
        }
      }
    }
  }
}

// B [k, n] (trans_b: stored as its transpose [n, k]) in the VNNI-2 layout of 16-bit brgemm, where each pair of
// consecutive k sits together: out[((kk / 2) * n + j) * 2 + kk % 2] = B[kk, j], an odd k padded with a zero row.
template <typename T>
void pack_vnni(bool trans_b, int64_t k, int64_t n, const T* b, int64_t ldb, T* out) {
  static_assert(sizeof(T) == 2);
  const int64_t pairs = (k + 1) / 2;
  if (trans_b && k % 2 == 0 && ldb % 2 == 0 && reinterpret_cast<uintptr_t>(b) % 4 == 0) {
    // Each pair is 4 contiguous bytes of a stored row: the packing is a transpose of 32-bit units, which the
    // float transpose moves bit for bit (scale 1 multiplies nothing).
    copy_scaled<float>(true, n, pairs, 1.0f, reinterpret_cast<const float*>(b), ldb / 2, reinterpret_cast<float*>(out),
                       n);
    return;
  }
  for (int64_t pair = 0; pair < pairs; ++pair) {
    T* o = out + pair * n * 2;
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
    if (!trans_b && 2 * pair + 1 < k) {
      // Interleave rows 2 pair and 2 pair + 1: unpack works within 128-bit lanes, the permutes restore the order.
      const T* r0 = b + 2 * pair * ldb;
      const T* r1 = r0 + ldb;
      const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
      for (; j + 32 <= n; j += 32) {
        const __m512i x = _mm512_loadu_si512(r0 + j), y = _mm512_loadu_si512(r1 + j);
        const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
        _mm512_storeu_si512(o + 2 * j, _mm512_permutex2var_epi64(lo, first, hi));
        _mm512_storeu_si512(o + 2 * j + 32, _mm512_permutex2var_epi64(lo, second, hi));
      }
    }
#endif
    for (; j < n; ++j) {
      for (int half = 0; half < 2; ++half) {
        const int64_t kk = 2 * pair + half;
        o[2 * j + half] = kk < k ? (trans_b ? b[j * ldb + kk] : b[kk * ldb + j]) : T(0.0f);
      }
    }
  }
}

// C[m, n] (+)= A op(B) for 16-bit A [m, k] (row stride lda; for an odd k the caller provides a zero column k)
// and B [k, n] (trans_b: stored as [n, k]), which is packed into `pack` first; C float32.
template <typename T>
void gemm_half(bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
               T* pack, bool accumulate, float* c, int64_t ldc) {
  pack_vnni(trans_b, k, n, b, ldb, pack);
  at::native::cpublas::brgemm(m, n, k + k % 2, lda, n, ldc, accumulate, a, pack, c, true);
}

// Per-thread buffers for operands that brgemm needs transposed or scaled (it computes C (+)= A B, row-major).
template <typename T>
T* scratch(int which, int64_t size) {
  thread_local std::vector<T> buffers[2];
  if (int64_t(buffers[which].size()) < size) buffers[which].resize(size);
  return buffers[which].data();
}

// C[m, n] = alpha * op(A) op(B) + beta * C with op(A) [m, k] and op(B) [k, n]; a transposed operand is stored as
// its transpose, row-major. beta is 0 or 1; beta = 0 ignores C's old values (they may be uninitialized).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr bool is_float = std::is_same_v<T, float>;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (is_float) {
    if (selected_path() == Path::kAvx2) {
      gemm_packed(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta != T(0), c, ldc,
                  scratch<T>(1, panel_floats(k, n)));
      return;
    }
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (is_float) {
    if (brgemm_works<float>() && k > 0) {
      // alpha goes into an operand that is copied anyway, else into a copy of the smaller one.
      const bool copy_a = trans_a || (alpha != T(1) && !trans_b && m * k <= k * n);
      const bool copy_b = trans_b || (alpha != T(1) && !copy_a);
      if (copy_a) {
        T* buffer = scratch<T>(0, m * k);
        copy_scaled(trans_a, trans_a ? k : m, trans_a ? m : k, alpha, a, lda, buffer, k);
        a = buffer;
        lda = k;
      }
      if (copy_b) {
        T* buffer = scratch<T>(1, k * n);
        copy_scaled(trans_b, trans_b ? n : k, trans_b ? k : n, copy_a ? T(1) : alpha, b, ldb, buffer, n);
        b = buffer;
        ldb = n;
      }
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta != T(0), a, b, c, false);
      return;
    }
  }
#endif
  if (is_float ? sgemm_ != nullptr : dgemm_ != nullptr) {
    // BLAS is column-major: the row-major C is C^T there, and C^T = op(B)^T op(A)^T.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
    if constexpr (is_float) {
      sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    } else {
      dgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : beta * ci[j];
    for (int64_t x = 0; x < k; ++x) {
      const T ax = alpha * (trans_a ? a[x * lda + i] : a[i * lda + x]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) ci[j] += ax * b[j * ldb + x];
      } else {
        const T* bx = b + x * ldb;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ci[j] += ax * bx[j];
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace vidfast::attention::cpu
