#pragma once
// The softmax exponentials of the AVX2 build: p = exp(s - shift) for scores s <= shift (the row maximum in the
// forward pass, the log-sum-exp in the backward one), as 2^t with t = s log2(e) - shift log2(e) (one FMA) split into
// an integer n and |f| <= 1/2: 2^f from a degree-5 polynomial (relative error 1.9e-7, about 1.5 float32 ulp; at::vec's
// exp_u20 allows 20 ulp), 2^n added to its exponent bits. About 12 instructions per 8 values against exp_u20's 19
// plus the subtraction, since no overflow can occur (t <= 0) and t below -126 (p < 1.2e-38, nothing next to a row
// sum of at least 1) is clamped to -126 rather than flushed to zero. NaN scores stay NaN. Only the AVX2 build
// includes this file (kernel_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace vidfast::attention::cpu::CPU_CAPABILITY {

// 2^t for t <= 0 (t a little above 0 from rounding is fine).
inline __m256 exp2_nonpositive(__m256 t) {
  // Lawson-weighted least squares fit of 2^f on [-1/2, 1/2], constant term 1, coefficients rounded to float32.
  const __m256 c1 = _mm256_set1_ps(0.693147003650665f), c2 = _mm256_set1_ps(0.240222424268723f);
  const __m256 c3 = _mm256_set1_ps(0.0555073358118534f), c4 = _mm256_set1_ps(0.00967151299118996f);
  const __m256 c5 = _mm256_set1_ps(0.00132647273130715f);
  t = _mm256_max_ps(_mm256_set1_ps(-126.0f), t);  // max(a, NaN) is NaN with t second
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_fmadd_ps(c5, f, c4);
  p = _mm256_fmadd_ps(p, f, c3);
  p = _mm256_fmadd_ps(p, f, c2);
  p = _mm256_fmadd_ps(p, f, c1);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), exponent));
}

// s[j] = exp(s[j] - shift) for j < n; returns their sum. shift = +inf (a row that saw no key) gives zeros.
inline float exp_and_sum_avx2(float* s, int64_t n, float shift) {
  if (shift == INFINITY) {
    std::fill(s, s + n, 0.0f);
    return 0.0f;
  }
  const float log2e = 1.44269504088896341f;
  const __m256 vlog2e = _mm256_set1_ps(log2e), offset = _mm256_set1_ps(-shift * log2e);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();  // two chains hide the add latency
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp2_nonpositive(_mm256_fmadd_ps(_mm256_loadu_ps(s + j), vlog2e, offset));
    const __m256 e1 = exp2_nonpositive(_mm256_fmadd_ps(_mm256_loadu_ps(s + j + 8), vlog2e, offset));
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp2_nonpositive(_mm256_fmadd_ps(_mm256_loadu_ps(s + j), vlog2e, offset));
    _mm256_storeu_ps(s + j, e);
    sum0 = _mm256_add_ps(sum0, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(sum0, sum1));
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

}  // namespace vidfast::attention::cpu::CPU_CAPABILITY
