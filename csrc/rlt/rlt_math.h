#pragma once
// Arithmetic of run-length tokenization shared by the CPU and CUDA kernels: token grid geometry, which frames
// are compared, the distance and keep rule, run lengths, normalization and the patch layout.
#include <cstdint>
#include <type_traits>

#include "common/hostdevice.h"

namespace vidfast::rlt {

struct Token {
  int64_t b, t, h, w;
};

struct Grid {
  int64_t batch, frames, height, width;  // input video
  int64_t tubelet, patch;
  int64_t tp, hp, wp;  // token grid T', H', W'

  VIDFAST_HD int64_t tokens_per_clip() const { return tp * hp * wp; }
  VIDFAST_HD int64_t patch_dim() const { return 3 * tubelet * patch * patch; }
  // Grid coordinates of a flat token index in (b, t', h', w') raster order.
  VIDFAST_HD Token token_at(int64_t index) const {
    return {index / tokens_per_clip(), (index / (wp * hp)) % tp, (index / wp) % hp, index % wp};
  }
  // Tubelet t' >= 1 compares its last frame with the first frame of tubelet t'-1, as the RLT code does.
  VIDFAST_HD int64_t later_frame(int64_t t) const { return t * tubelet + tubelet - 1; }
  VIDFAST_HD int64_t earlier_frame(int64_t t) const { return (t - 1) * tubelet; }
  // Element offsets in the two input layouts: uint8 [B, T, H, W, 3] and floating [B, 3, T, H, W].
  VIDFAST_HD int64_t thwc(int64_t b, int64_t t, int64_t y, int64_t x) const {
    return (((b * frames + t) * height + y) * width + x) * 3;
  }
  VIDFAST_HD int64_t cthw(int64_t b, int64_t c, int64_t t, int64_t y, int64_t x) const {
    return (((b * 3 + c) * frames + t) * height + y) * width + x;
  }
};

// Mean over channels and patch pixels of |later - earlier| in normalized units, from per-channel sums of
// absolute uint8 differences: normalization is affine per channel, so |n(a) - n(b)| = |a - b| / (255 std_c).
VIDFAST_HD double distance_from_u8_sums(const int64_t sums[3], const double inv_std[3], int64_t patch) {
  const double n = 3.0 * double(patch * patch);
  return (double(sums[0]) * inv_std[0] + double(sums[1]) * inv_std[1] + double(sums[2]) * inv_std[2]) /
         (255.0 * n);
}

VIDFAST_HD double distance_from_sum(double sum_abs_diff, int64_t patch) {
  return sum_abs_diff / (3.0 * double(patch * patch));
}

// A token is kept when it starts the clip or its distance is strictly above the threshold.
VIDFAST_HD bool keep_token(int64_t t, double distance, double threshold) { return t == 0 || distance > threshold; }

// uint8 -> normalized value, (v / 255 - mean_c) / std_c, as one multiply-add per element in acc_t (float, or
// double for float64 outputs).
template <typename acc_t>
struct U8Normalizer {
  acc_t scale[3], bias[3];
  VIDFAST_HD U8Normalizer(const double mean[3], const double std[3]) {
    for (int c = 0; c < 3; ++c) {
      scale[c] = acc_t(1.0 / (255.0 * std[c]));
      bias[c] = acc_t(-mean[c] / std[c]);
    }
  }
  VIDFAST_HD acc_t operator()(uint8_t v, int c) const { return acc_t(v) * scale[c] + bias[c]; }
};

// Arithmetic type of element conversions: double when either side is double, else float (so that
// half <-> bfloat16 works and float64 keeps its precision).
template <typename out_t, typename in_t>
using acc_type = std::conditional_t<sizeof(out_t) == 8 || sizeof(in_t) == 8, double, float>;

template <typename out_t, typename in_t>
VIDFAST_HD out_t cast_element(in_t v) {
  return out_t(acc_type<out_t, in_t>(v));
}

// Run lengths along one (h, w) column: a kept token lasts until the next kept token of the column or the clip's
// end; dropped tokens get 0. keep(t) and store(t, length) address the column.
template <class KeepAt, class Store>
VIDFAST_HD void column_run_lengths(int64_t tp, KeepAt keep, Store store) {
  int64_t next_kept = tp;
  for (int64_t t = tp - 1; t >= 0; --t) {
    if (keep(t)) {
      store(t, int32_t(next_kept - t));
      next_kept = t;
    } else {
      store(t, 0);
    }
  }
}

// Patch vector layout: [c][dt][ph][pw], the order of a Conv3d weight [D, 3, tubelet, patch, patch].
struct PatchElement {
  int64_t c, dt, ph, pw;
};
VIDFAST_HD PatchElement patch_element(int64_t e, int64_t tubelet, int64_t patch) {
  PatchElement el;
  el.pw = e % patch;
  e /= patch;
  el.ph = e % patch;
  e /= patch;
  el.dt = e % tubelet;
  el.c = e / tubelet;
  return el;
}

}  // namespace vidfast::rlt
