#pragma once
// Arithmetic of variable-length attention shared by the CPU and CUDA kernels: sequence bounds, the causal key
// range (aligned to the bottom right, as flash-attn does), block counts and the online-softmax bookkeeping.
// Scores are kept in natural-log units: p = exp(scale * s - shift).
#include <cmath>
#include <cstdint>

#include "common/hostdevice.h"

namespace vidfast::attention {

// Keys [0, key_end) of a sequence are visible to its query row i. With causal masking the last query sees every
// key and earlier queries see one key fewer per row, so a query row may see no key at all when lq > lk.
VIDFAST_HD int64_t key_end(int64_t i, int64_t lq, int64_t lk, bool causal) {
  if (!causal) return lk;
  const int64_t end = i + 1 + lk - lq;
  return end < 0 ? 0 : (end > lk ? lk : end);
}

VIDFAST_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The value subtracted inside exp() for a row whose running maximum is m. A row that has seen only masked scores
// has m = -inf; subtracting 0 instead keeps exp(-inf - shift) = 0 rather than NaN.
template <typename T>
VIDFAST_HD T softmax_shift(T m) {
  return m == T(-INFINITY) ? T(0) : m;
}

// Factor that rescales a row's running sum and output when its maximum moves from m_old to m_new (>= m_old).
template <typename T>
VIDFAST_HD T softmax_rescale(T m_old, T m_new) {
  using std::exp;
  return exp(m_old - softmax_shift(m_new));
}

// Log-sum-exp of a finished row; -inf for a row that saw no key.
template <typename T>
VIDFAST_HD T softmax_lse(T m, T sum) {
  using std::log;
  return sum > T(0) ? m + log(sum) : T(-INFINITY);
}

// 1 / sum, with rows that saw no key giving a zero output as flash-attn does.
template <typename T>
VIDFAST_HD T softmax_inverse_sum(T sum) {
  return sum > T(0) ? T(1) / sum : T(0);
}

// The backward pass recomputes p = exp(scale * s - lse); a row with lse = -inf saw no key and must give p = 0.
template <typename T>
VIDFAST_HD T backward_shift(T lse) {
  return lse == T(-INFINITY) ? T(INFINITY) : lse;
}

}  // namespace vidfast::attention
