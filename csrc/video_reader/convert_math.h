#pragma once
// Arithmetic of the fused frame conversion (colour conversion + antialiased bilinear resize + normalization),
// shared by the CPU kernel and the CUDA NV12 kernel so both compute the same numbers.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/hostdevice.h"

namespace vidfast::video_reader {

// rgb[c] = sum_k matrix[c][k] * (sample[k] - offset[k]) for the three input planes (Y, U, V or G, B, R).
struct ColorTransform {
  float matrix[3][3];
  float offset[3];
};

// YUV -> RGB in [0, 255] from the luma weights kr, kb of the colour space (BT.601: 0.299/0.114, BT.709:
// 0.2126/0.0722, BT.2020: 0.2627/0.0593). Limited range maps Y 16..235 and U/V 16..240 onto 0..255.
inline ColorTransform yuv_to_rgb_transform(double kr, double kb, bool full_range) {
  const double kg = 1.0 - kr - kb;
  const double ys = full_range ? 1.0 : 255.0 / 219.0;
  const double cs = full_range ? 1.0 : 255.0 / 224.0;
  ColorTransform t{};
  const double m[3][3] = {
      {ys, 0.0, cs * 2.0 * (1.0 - kr)},
      {ys, -cs * 2.0 * (1.0 - kb) * kb / kg, -cs * 2.0 * (1.0 - kr) * kr / kg},
      {ys, cs * 2.0 * (1.0 - kb), 0.0},
  };
  for (int c = 0; c < 3; ++c) {
    for (int k = 0; k < 3; ++k) t.matrix[c][k] = static_cast<float>(m[c][k]);
  }
  t.offset[0] = full_range ? 0.0f : 16.0f;
  t.offset[1] = 128.0f;
  t.offset[2] = 128.0f;
  return t;
}

// Planar G, B, R (libswscale's GBRP, used for pixel formats the kernels do not read directly) -> R, G, B.
inline ColorTransform gbr_to_rgb_transform() {
  ColorTransform t{};
  t.matrix[0][2] = 1.0f;  // R <- plane 2
  t.matrix[1][0] = 1.0f;  // G <- plane 0
  t.matrix[2][1] = 1.0f;  // B <- plane 1
  return t;
}

VIDFAST_HD void apply_color(const ColorTransform& t, const float sample[3], float rgb[3]) {
  const float a = sample[0] - t.offset[0], b = sample[1] - t.offset[1], c = sample[2] - t.offset[2];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const float v = t.matrix[i][0] * a + t.matrix[i][1] * b + t.matrix[i][2] * c;
    rgb[i] = fminf(fmaxf(v, 0.0f), 255.0f);
  }
}

// out = rgb * scale + bias per channel: uint8 keeps 0..255 (scale 1, bias 0, rounded later), floating output is
// (rgb / 255 - mean) / std, or rgb / 255 without mean/std.
struct Normalize {
  float scale[3];
  float bias[3];
};

// One axis of PyTorch's antialiased bilinear interpolation (interpolate(..., mode="bilinear", antialias=True,
// align_corners=False)): a triangle filter stretched by the scale when shrinking, plain bilinear when growing.
// `scale` is source samples per output sample; `in_size` bounds the taps (samples past it are left out and the
// weights renormalized, i.e. the edge is not padded).
struct ResizeAxis {
  float scale;
  float support;  // half-width of the filter, in source samples
  float inv_filter_scale;
  int in_size;
};

VIDFAST_HD ResizeAxis make_axis(int in_size, float source_extent, int out_size) {
  ResizeAxis a;
  a.scale = source_extent / static_cast<float>(out_size);
  a.support = a.scale >= 1.0f ? a.scale : 1.0f;
  a.inv_filter_scale = a.scale >= 1.0f ? 1.0f / a.scale : 1.0f;
  a.in_size = in_size;
  return a;
}

// Taps of output sample i: source samples [first, first + count).
VIDFAST_HD void axis_taps(const ResizeAxis& a, int i, int* first, int* count) {
  const float center = a.scale * (static_cast<float>(i) + 0.5f);
  int lo = static_cast<int>(center - a.support + 0.5f);  // truncation toward zero, as PyTorch does
  if (lo < 0) lo = 0;
  int hi = static_cast<int>(center + a.support + 0.5f);
  if (hi > a.in_size) hi = a.in_size;
  *first = lo;
  *count = hi > lo ? hi - lo : 0;
}

// Unnormalized weight of source sample j for output sample i (divide by the sum over the taps).
VIDFAST_HD float axis_weight(const ResizeAxis& a, int i, int j) {
  const float center = a.scale * (static_cast<float>(i) + 0.5f);
  const float x = (static_cast<float>(j) - center + 0.5f) * a.inv_filter_scale;
  const float w = 1.0f - fabsf(x);
  return w > 0.0f ? w : 0.0f;
}

VIDFAST_HD uint8_t to_uint8(float v) {
  return static_cast<uint8_t>(fminf(fmaxf(v + 0.5f, 0.0f), 255.0f));
}

// A converted value in the output dtype: uint8 rounds and clamps, floating types convert.
template <typename T>
VIDFAST_HD T store_value(float v) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    return to_uint8(v);
  } else {
    return T(v);
  }
}

}  // namespace vidfast::video_reader
