// Fused conversion on the CPU: for a band of output rows, each input plane is resampled horizontally (only the
// source rows the band needs) into a small float buffer of output width, then the vertical taps, the colour
// conversion and the normalization run together and write straight into the output tensor. No full-size RGB
// picture is ever made.
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <vector>

#include "video_reader/convert.h"

namespace vidfast::video_reader {
namespace {

// Normalized taps of one axis for outputs [begin, end): zero weights at either end are dropped, so an identity
// axis costs one tap per sample.
struct AxisTable {
  std::vector<int> first, count;
  std::vector<float> weights;  // max_taps per output
  int max_taps = 0;

  void build(const ResizeAxis& a, int begin, int end) {
    const int n = end - begin;
    first.resize(n);
    count.resize(n);
    max_taps = static_cast<int>(a.support * 2.0f) + 3;
    weights.assign(static_cast<size_t>(n) * max_taps, 0.0f);
    for (int i = 0; i < n; ++i) {
      int lo, cnt;
      axis_taps(a, begin + i, &lo, &cnt);
      float* w = &weights[static_cast<size_t>(i) * max_taps];
      float total = 0.0f;
      for (int t = 0; t < cnt; ++t) total += axis_weight(a, begin + i, lo + t);
      int kept_lo = lo, kept_hi = lo + cnt;
      while (kept_lo < kept_hi && axis_weight(a, begin + i, kept_lo) == 0.0f) ++kept_lo;
      while (kept_hi > kept_lo && axis_weight(a, begin + i, kept_hi - 1) == 0.0f) --kept_hi;
      if (kept_hi == kept_lo || total <= 0.0f) {  // degenerate (cannot happen for in_size >= 1): nearest sample
        kept_lo = std::min(std::max(lo, 0), a.in_size - 1);
        kept_hi = kept_lo + 1;
        total = 0.0f;
      }
      first[i] = kept_lo;
      count[i] = kept_hi - kept_lo;
      for (int t = 0; t < count[i]; ++t) {
        w[t] = total > 0.0f ? axis_weight(a, begin + i, kept_lo + t) / total : 1.0f;
      }
    }
  }
};

template <typename T>
void convert_rows(const PictureView& pic, const OutputSpec& spec, T* out, int row_begin, int row_end) {
  const int ow = spec.width;
  const int rows = row_end - row_begin;
  // Per plane: horizontal taps, vertical taps of the band, and the horizontally resampled source rows.
  AxisTable htab[3], vtab[3];
  std::vector<float> hbuf[3];
  int src_lo[3];
  for (int p = 0; p < 3; ++p) {
    const Plane& pl = pic.planes[p];
    htab[p].build(make_axis(pl.width, pl.extent_x, ow), 0, ow);
    vtab[p].build(make_axis(pl.height, pl.extent_y, spec.height), row_begin, row_end);
    int lo = pl.height, hi = 0;
    for (int r = 0; r < rows; ++r) {
      lo = std::min(lo, vtab[p].first[r]);
      hi = std::max(hi, vtab[p].first[r] + vtab[p].count[r]);
    }
    src_lo[p] = lo;
    hbuf[p].assign(static_cast<size_t>(std::max(hi - lo, 0)) * ow, 0.0f);
    const AxisTable& h = htab[p];
    for (int sy = lo; sy < hi; ++sy) {
      const uint8_t* src = pl.data + sy * pl.linesize;
      float* dst = &hbuf[p][static_cast<size_t>(sy - lo) * ow];
      for (int ox = 0; ox < ow; ++ox) {
        const float* w = &h.weights[static_cast<size_t>(ox) * h.max_taps];
        const uint8_t* s = src + static_cast<int64_t>(h.first[ox]) * pl.step;
        float acc = 0.0f;
        for (int t = 0; t < h.count[ox]; ++t) acc += w[t] * static_cast<float>(s[t * pl.step]);
        dst[ox] = acc;
      }
    }
  }
  std::vector<float> row[3];
  for (auto& r : row) r.resize(ow);
  for (int r = 0; r < rows; ++r) {
    for (int p = 0; p < 3; ++p) {
      float* acc = row[p].data();
      std::fill(acc, acc + ow, 0.0f);
      const AxisTable& v = vtab[p];
      const float* w = &v.weights[static_cast<size_t>(r) * v.max_taps];
      for (int t = 0; t < v.count[r]; ++t) {
        const float* src = &hbuf[p][static_cast<size_t>(v.first[r] + t - src_lo[p]) * ow];
        const float wt = w[t];
#pragma omp simd
        for (int ox = 0; ox < ow; ++ox) acc[ox] += wt * src[ox];
      }
    }
    T* dst_row = out + static_cast<int64_t>(row_begin + r) * spec.stride_y;
    for (int ox = 0; ox < ow; ++ox) {
      const float sample[3] = {row[0][ox], row[1][ox], row[2][ox]};
      float rgb[3];
      apply_color(pic.color, sample, rgb);
      T* px = dst_row + ox * spec.stride_x;
      for (int c = 0; c < 3; ++c) {
        px[c * spec.stride_c] = store_value<T>(rgb[c] * spec.norm.scale[c] + spec.norm.bias[c]);
      }
    }
  }
}

}  // namespace

void convert_rows_cpu(const PictureView& picture, const OutputSpec& spec, void* out, int row_begin, int row_end) {
  switch (spec.dtype) {
    case at::kByte:
      convert_rows(picture, spec, static_cast<uint8_t*>(out), row_begin, row_end);
      break;
    case at::kFloat:
      convert_rows(picture, spec, static_cast<float*>(out), row_begin, row_end);
      break;
    case at::kBFloat16:
      convert_rows(picture, spec, static_cast<c10::BFloat16*>(out), row_begin, row_end);
      break;
    default:
      TORCH_CHECK_TYPE(false, "dtype: expected uint8, float32 or bfloat16; got ", spec.dtype);
  }
}

}  // namespace vidfast::video_reader
