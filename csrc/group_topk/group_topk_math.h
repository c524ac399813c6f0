#pragma once
// Arithmetic of the group-dynamic top-k selection shared by the CPU and CUDA kernels: how the budget is split
// over the groups, the order in which a token's squared distance is summed, and the sort key of a score. Sharing
// these makes both kernels produce bit-identical scores and therefore identical selections.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/hostdevice.h"

namespace vidfast::group_topk {

// A token's squared distance is summed by kLanes partial sums (lane j takes channels j, j + kLanes, ...), then
// combined by a halving tree: the order of a warp's shuffle-down reduction, which the CPU kernel replays.
constexpr int kLanes = 32;

struct Shape {
  int64_t batch, frames, tokens, dim;  // x is [B, T, L, D]
  int64_t groups, budget;              // G divides T; 0 <= budget <= T * L

  VIDFAST_HD int64_t frames_per_group() const { return frames / groups; }
  VIDFAST_HD int64_t group_size() const { return frames_per_group() * tokens; }
  // Group g keeps budget / G tokens, plus one for the first budget % G groups: sizes differ by at most 1.
  VIDFAST_HD int64_t group_budget(int64_t g) const { return budget / groups + (g < budget % groups ? 1 : 0); }
  // Where group g's tokens start in a clip's output row (the sum of the earlier groups' budgets).
  VIDFAST_HD int64_t group_offset(int64_t g) const {
    return g * (budget / groups) + (g < budget % groups ? g : budget % groups);
  }
};

// Adds (a - b)^2 to a lane's partial sum in float64, without fused multiply-add so both devices round alike.
VIDFAST_HD double add_squared_difference(double sum, double a, double b) {
#if defined(__CUDA_ARCH__)
  const double d = __dsub_rn(a, b);
  return __dadd_rn(sum, __dmul_rn(d, d));
#else
  const double d = a - b;
  return sum + d * d;
#endif
}

VIDFAST_HD float score_from_sum(double sum_of_squares) { return float(sqrt(sum_of_squares)); }

// Scores are non-negative (or NaN), so their IEEE bits order like unsigned integers. Every NaN gets the one key
// above +inf: NaNs differ in sign and payload (inf - inf gives a negative NaN on x86, a NaN input stays positive),
// and ranking them by those bits would break "NaNs tie, the lower index first".
VIDFAST_HD uint32_t score_key(float score) {
  if (score != score) return 0xFFFFFFFFu;
#if defined(__CUDA_ARCH__)
  return __float_as_uint(score);
#else
  uint32_t key;
  std::memcpy(&key, &score, sizeof key);
  return key;
#endif
}

}  // namespace vidfast::group_topk
