#pragma once
// Row-major GEMM on float32 (or float64) tiles. libtorch_cpu exports BLAS's sgemm_ / dgemm_ in x86 builds (MKL); it is bound weakly so
// the library still loads against a torch without it, and then a plain loop (correct, slower) takes over.
#include <cstdint>
#include <type_traits>

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

// C[m, n] = alpha * op(A) op(B) + beta * C with op(A) [m, k] and op(B) [k, n]; a transposed operand is stored as
// its transpose, row-major. beta = 0 ignores C's old values (they may be uninitialized).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr bool is_float = std::is_same_v<T, float>;
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

}  // namespace vidfast::attention::cpu
