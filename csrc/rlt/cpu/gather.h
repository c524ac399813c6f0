#pragma once
// Portable token gathers of rlt_tokenize: one kept token's pixels into its [c][dt][ph][pw] patch vector.
#include <c10/util/BFloat16.h>

#include <cstring>
#include <type_traits>

#include "common/cpu_isa.h"
#include "rlt/rlt_math.h"

namespace vidfast::rlt::cpu {

// float -> out_t for finite values. bfloat16 rounds to nearest even with plain integer arithmetic, which
// vectorizes (c10's conversion branches on NaN, which cannot occur for normalized uint8 pixels).
template <typename out_t, typename acc_t>
inline out_t from_finite(acc_t v) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    uint32_t bits;
    const float f = float(v);
    std::memcpy(&bits, &f, sizeof(bits));
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return c10::BFloat16(uint16_t(bits >> 16), c10::BFloat16::from_bits());
  } else {
    return out_t(v);
  }
}

// Copies one kept token's normalized pixels into its [c][dt][ph][pw] patch vector (de-interleaving RGB).
// kPatch > 0 fixes the patch size at compile time (the common 14 and 16), so the row loops unroll into whole
// vectors; kPatch == 0 reads it from the grid.
template <int kPatch, typename out_t>
VIDFAST_CPU_CLONES void gather_token_uint8(const Grid& g, const uint8_t* __restrict video,
                                           const U8Normalizer<acc_type<out_t, uint8_t>>& norm, int64_t b, int64_t t,
                                           int64_t h, int64_t w, out_t* __restrict out) {
  const int64_t patch = kPatch > 0 ? kPatch : g.patch;
  const int64_t pp = patch * patch, channel_stride = g.tubelet * pp;
  const auto s0 = norm.scale[0], s1 = norm.scale[1], s2 = norm.scale[2];
  const auto b0 = norm.bias[0], b1 = norm.bias[1], b2 = norm.bias[2];
  for (int64_t dt = 0; dt < g.tubelet; ++dt) {
    for (int64_t ph = 0; ph < patch; ++ph) {
      const uint8_t* __restrict src = video + g.thwc(b, t * g.tubelet + dt, h * patch + ph, w * patch);
      out_t* __restrict r = out + dt * pp + ph * patch;
      out_t* __restrict gch = r + channel_stride;
      out_t* __restrict bch = r + 2 * channel_stride;
      for (int64_t pw = 0; pw < patch; ++pw) {
        r[pw] = from_finite<out_t>(src[3 * pw] * s0 + b0);
        gch[pw] = from_finite<out_t>(src[3 * pw + 1] * s1 + b1);
        bch[pw] = from_finite<out_t>(src[3 * pw + 2] * s2 + b2);
      }
    }
  }
}

template <int kPatch, typename in_t, typename out_t>
VIDFAST_CPU_CLONES void gather_token_float(const Grid& g, const in_t* __restrict video, int64_t b, int64_t t,
                                           int64_t h, int64_t w, out_t* __restrict out) {
  const int64_t patch = kPatch > 0 ? kPatch : g.patch;
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t dt = 0; dt < g.tubelet; ++dt) {
      for (int64_t ph = 0; ph < patch; ++ph) {
        const in_t* __restrict src = video + g.cthw(b, c, t * g.tubelet + dt, h * patch + ph, w * patch);
        out_t* __restrict dst = out + ((c * g.tubelet + dt) * patch + ph) * patch;
        for (int64_t pw = 0; pw < patch; ++pw) dst[pw] = cast_element<out_t>(src[pw]);
      }
    }
  }
}

// Calls fn with the patch size as a compile-time constant where it is a common one.
template <typename Fn>
void with_patch_size(int64_t patch, Fn&& fn) {
  if (patch == 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (patch == 14) {
    fn(std::integral_constant<int, 14>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
}

}  // namespace vidfast::rlt::cpu
