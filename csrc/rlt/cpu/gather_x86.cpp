// x86 token gathers of rlt_tokenize for 16-pixel patches from uint8: AVX2 and AVX-512 (VBMI) shuffles that
// de-interleave RGB rows, written with streaming stores.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "rlt/cpu/rlt_cpu.h"

#if defined(VIDFAST_X86)
#include <immintrin.h>

namespace vidfast::rlt::cpu {
namespace {

// pshufb masks that take channel c of 16 interleaved RGB pixels (48 bytes in three 16-byte loads) from load k:
// byte i of channel c is byte 3i + c of the row; 0x80 zeroes the lanes another load provides.
struct DeinterleaveMasks {
  alignas(16) int8_t m[3][3][16];
  constexpr DeinterleaveMasks() : m() {
    for (int c = 0; c < 3; ++c)
      for (int k = 0; k < 3; ++k)
        for (int i = 0; i < 16; ++i) m[c][k][i] = (3 * i + c) / 16 == k ? int8_t((3 * i + c) % 16) : int8_t(-128);
  }
};
constexpr DeinterleaveMasks kDeinterleave;

// bfloat16 bits (in the low half of each 32-bit lane) of 8 finite floats, rounded to nearest even as
// from_finite does.
VIDFAST_TARGET_AVX2 inline __m256i bfloat16_bits(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
}

// 16 floats -> out_t at a 32-byte aligned dst, written around the caches: the output is far larger than the
// caches and this op does not read it again, so streaming stores save the read-for-ownership of every line.
template <typename out_t>
VIDFAST_TARGET_AVX2 inline void stream16(out_t* dst, __m256 lo, __m256 hi) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + 8, hi);
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    // packus interleaves 128-bit lanes; the permute puts the 16 halves back in order.
    const __m256i packed = _mm256_packus_epi32(bfloat16_bits(lo), bfloat16_bits(hi));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(packed, 0xD8));
  } else {
    static_assert(std::is_same_v<out_t, c10::Half>);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT),
                                                                         _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT)));
  }
}

// 16 floats -> out_t at a 64-byte (float32) or 32-byte aligned dst, streamed as stream16 does.
template <typename out_t>
VIDFAST_TARGET_AVX512 inline void stream16_avx512(out_t* dst, __m512 x) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm512_stream_ps(dst, x);
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
  } else {
    static_assert(std::is_same_v<out_t, c10::Half>);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
}

// Byte i of a permuted patch row is byte 3 (i % 16) + i / 16 of the interleaved one: R, G, B in 16-byte lanes.
struct PlanarOrder {
  alignas(64) uint8_t index[64];
  constexpr PlanarOrder() : index() {
    for (int i = 0; i < 48; ++i) index[i] = uint8_t(3 * (i % 16) + i / 16);
  }
};
constexpr PlanarOrder kPlanarOrder;

}  // namespace

// gather_token_uint8 for 16-pixel patches with explicit shuffles: the compiler's stride-3 loads cost twice the
// memory traffic's time. Each patch row is three 16-byte loads, three shuffles per channel, and 16 outputs per
// channel (a whole cache line in float32; every such row starts 64-byte aligned in a 64-byte aligned output).
template <typename out_t>
VIDFAST_TARGET_AVX2 void gather_token_uint8_p16_avx2(const Grid& g, const uint8_t* __restrict video,
                                              const U8Normalizer<float>& norm, int64_t b, int64_t t, int64_t h,
                                              int64_t w, out_t* __restrict out) {
  constexpr int64_t kPatch = 16, kPP = kPatch * kPatch;
  const int64_t channel_stride = g.tubelet * kPP;
  __m128i masks[3][3];
  __m256 scale[3], bias[3];
  for (int c = 0; c < 3; ++c) {
    for (int k = 0; k < 3; ++k) masks[c][k] = _mm_load_si128(reinterpret_cast<const __m128i*>(kDeinterleave.m[c][k]));
    scale[c] = _mm256_set1_ps(norm.scale[c]);
    bias[c] = _mm256_set1_ps(norm.bias[c]);
  }
  for (int64_t dt = 0; dt < g.tubelet; ++dt) {
    const uint8_t* src = video + g.thwc(b, t * g.tubelet + dt, h * kPatch, w * kPatch);
    const int64_t row_stride = g.width * 3;
    out_t* dst = out + dt * kPP;
    for (int64_t ph = 0; ph < kPatch; ++ph, src += row_stride, dst += kPatch) {
      const __m128i in[3] = {_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32))};
      for (int c = 0; c < 3; ++c) {
        const __m128i bytes = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(in[0], masks[c][0]),
                                                        _mm_shuffle_epi8(in[1], masks[c][1])),
                                           _mm_shuffle_epi8(in[2], masks[c][2]));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
        stream16<out_t>(dst + c * channel_stride, _mm256_fmadd_ps(lo, scale[c], bias[c]),
                               _mm256_fmadd_ps(hi, scale[c], bias[c]));
      }
    }
  }
}

// gather_token_uint8_p16_avx2 with AVX-512: one masked 48-byte load and one byte permute split a patch row into
// its R, G and B bytes, and each channel's 16 values are one register.
template <typename out_t>
VIDFAST_TARGET_AVX512 void gather_token_uint8_p16_avx512(const Grid& g, const uint8_t* __restrict video,
                                                  const U8Normalizer<float>& norm, int64_t b, int64_t t, int64_t h,
                                                  int64_t w, out_t* __restrict out) {
  constexpr int64_t kPatch = 16, kPP = kPatch * kPatch;
  const int64_t channel_stride = g.tubelet * kPP, row_stride = g.width * 3;
  const __m512i order = _mm512_load_si512(kPlanarOrder.index);
  const __m512 s0 = _mm512_set1_ps(norm.scale[0]), s1 = _mm512_set1_ps(norm.scale[1]), s2 = _mm512_set1_ps(norm.scale[2]);
  const __m512 b0 = _mm512_set1_ps(norm.bias[0]), b1 = _mm512_set1_ps(norm.bias[1]), b2 = _mm512_set1_ps(norm.bias[2]);
  for (int64_t dt = 0; dt < g.tubelet; ++dt) {
    const uint8_t* src = video + g.thwc(b, t * g.tubelet + dt, h * kPatch, w * kPatch);
    out_t* dst = out + dt * kPP;
    for (int64_t ph = 0; ph < kPatch; ++ph, src += row_stride, dst += kPatch) {
      const __m512i planar = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8((1ull << 48) - 1, src));
      const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(planar)));
      const __m512 gr = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(planar, 1)));
      const __m512 bl = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(planar, 2)));
      stream16_avx512<out_t>(dst, _mm512_fmadd_ps(r, s0, b0));
      stream16_avx512<out_t>(dst + channel_stride, _mm512_fmadd_ps(gr, s1, b1));
      stream16_avx512<out_t>(dst + 2 * channel_stride, _mm512_fmadd_ps(bl, s2, b2));
    }
  }
}

#define VIDFAST_RLT_GATHER_X86(out_t)                                                                        \
  template VIDFAST_TARGET_AVX2 void gather_token_uint8_p16_avx2<out_t>(const Grid&, const uint8_t*, const U8Normalizer<float>&,     \
                                                   int64_t, int64_t, int64_t, int64_t, out_t*);               \
  template VIDFAST_TARGET_AVX512 void gather_token_uint8_p16_avx512<out_t>(const Grid&, const uint8_t*, const U8Normalizer<float>&, \
                                                     int64_t, int64_t, int64_t, int64_t, out_t*);
VIDFAST_RLT_GATHER_X86(float)
VIDFAST_RLT_GATHER_X86(c10::BFloat16)
VIDFAST_RLT_GATHER_X86(c10::Half)
#undef VIDFAST_RLT_GATHER_X86

}  // namespace vidfast::rlt::cpu
#endif
