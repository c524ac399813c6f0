// Schemas and argument checks of the run-length tokenization ops.
#include "rlt/rlt.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace vidfast::rlt {

Params check_arguments(const at::Tensor& video, int64_t tubelet, int64_t patch, double threshold,
                       at::ArrayRef<double> mean, at::ArrayRef<double> std,
                       std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(video.dim() == 5,
                    "video: expected a 5-D tensor, uint8 [B, T, H, W, 3] or floating [B, 3, T, H, W]; got shape ",
                    video.sizes());
  Params p{};
  const auto dtype = video.scalar_type();
  p.is_uint8 = dtype == at::kByte;
  TORCH_CHECK_TYPE(p.is_uint8 || dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "video: expected dtype uint8, float32, float64, float16 or bfloat16; got ", dtype);
  if (p.is_uint8) {
    TORCH_CHECK_VALUE(video.size(4) == 3, "video: uint8 video must be [B, T, H, W, 3] (RGB last); got shape ",
                      video.sizes());
  } else {
    TORCH_CHECK_VALUE(video.size(1) == 3, "video: floating video must be [B, 3, T, H, W] (RGB second); got shape ",
                      video.sizes());
  }
  TORCH_CHECK_VALUE(tubelet >= 1, "tubelet: expected a positive integer; got ", tubelet);
  TORCH_CHECK_VALUE(patch >= 1 && patch <= 1024, "patch: expected an integer in [1, 1024]; got ", patch);
  TORCH_CHECK_VALUE(!std::isnan(threshold), "threshold: expected a number; got NaN");
  TORCH_CHECK_VALUE(mean.size() == 3, "mean: expected 3 values (one per RGB channel); got ", mean.size());
  TORCH_CHECK_VALUE(std.size() == 3, "std: expected 3 values (one per RGB channel); got ", std.size());
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK_VALUE(std::isfinite(mean[c]), "mean: expected finite values; got ", mean);
    TORCH_CHECK_VALUE(std::isfinite(std[c]) && std[c] > 0, "std: expected finite positive values; got ", std);
    p.mean[c] = mean[c];
    p.std[c] = std[c];
    p.inv_std[c] = 1.0 / std[c];
  }
  auto& g = p.grid;
  g.batch = video.size(0);
  g.frames = p.is_uint8 ? video.size(1) : video.size(2);
  g.height = p.is_uint8 ? video.size(2) : video.size(3);
  g.width = p.is_uint8 ? video.size(3) : video.size(4);
  g.tubelet = tubelet;
  g.patch = patch;
  TORCH_CHECK_VALUE(g.frames % tubelet == 0, "tubelet: must divide the frame count T=", g.frames,
                    "; got tubelet=", tubelet);
  TORCH_CHECK_VALUE(g.height % patch == 0 && g.width % patch == 0, "patch: must divide H and W (H=", g.height,
                    ", W=", g.width, "); got patch=", patch);
  g.tp = g.frames / tubelet;
  g.hp = g.height / patch;
  g.wp = g.width / patch;
  p.threshold = threshold;
  p.out_dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(at::isFloatingType(p.out_dtype) && p.out_dtype != at::kFloat8_e4m3fn &&
                       p.out_dtype != at::kFloat8_e5m2 && p.out_dtype != at::kFloat8_e4m3fnuz &&
                       p.out_dtype != at::kFloat8_e5m2fnuz,
                   "out_dtype: expected float32, float64, float16 or bfloat16; got ", p.out_dtype);
  return p;
}

void check_token_count(const Grid& g) {
  const int64_t tokens = g.batch * g.tokens_per_clip();
  TORCH_CHECK_VALUE(tokens <= std::numeric_limits<int32_t>::max(),
                    "video: at most 2^31 - 1 tokens (B * T' * H' * W', counted in int32); got ", g.batch, " * ", g.tp,
                    " * ", g.hp, " * ", g.wp, " = ", tokens);
}

at::Tensor cu_seqlens_from_keep(const at::Tensor& keep) {
  auto counts = keep.reshape({keep.size(0), -1}).sum(1, /*keepdim=*/false, at::kInt);
  auto cu = at::zeros({keep.size(0) + 1}, keep.options().dtype(at::kInt));
  if (keep.size(0) > 0) {
    cu.narrow(0, 1, keep.size(0)).copy_(counts.cumsum(0, at::kInt));
  }
  return cu;
}

TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  m.def(
      "rlt_mask(Tensor video, int tubelet=2, int patch=16, float threshold=0.1, "
      "float[] mean=[0.485, 0.456, 0.406], float[] std=[0.229, 0.224, 0.225]) -> (Tensor keep, Tensor lengths)");
  m.def(
      "rlt_tokenize(Tensor video, int tubelet=2, int patch=16, float threshold=0.1, "
      "float[] mean=[0.485, 0.456, 0.406], float[] std=[0.229, 0.224, 0.225], ScalarType? out_dtype=None) "
      "-> (Tensor patches, Tensor positions, Tensor lengths, Tensor cu_seqlens)");
}

}  // namespace vidfast::rlt
