#pragma once
// CUDA kernels of varlen attention. Tensor-core path (bf16/fp16, head dims 32/64/80/96/128, sm_80+): WMMA 16x16x16
// tiles with float32 accumulation; a block of 4 warps owns 64 query rows (forward) or 64 keys (backward). Simple
// path (float32, or any other head dim up to 256): one thread per query row on CUDA cores. Index arithmetic and the
// softmax bookkeeping come from attention_math.h, the same functions the CPU kernel uses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "varlen_attention/attention_math.h"

namespace vidfast::attention::cuda {

struct ForwardArgs {
  const void *q, *k, *v;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1;  // token and head strides (head dim stride is 1)
  const int32_t *cu_q, *cu_k;
  void* out;   // [Nq, H, D] contiguous
  float* lse;  // [H, Nq]
  int64_t total_q, heads, group, head_dim;
  float scale;
  bool causal;
};

struct BackwardArgs {
  ForwardArgs fwd;  // q, k, v, cu_seqlens and sizes; out/lse as saved by the forward pass
  const void* grad_out;
  int64_t do_s0, do_s1;
  const float* delta;   // [H, Nq]: rowsum(dO * O) - dlse
  float* grad_q_accum;  // [Nq, H, D] float32, zeroed, atomically accumulated
  float* grad_k_accum;  // [Nk, Hkv, D] float32 (simple path only; the tensor-core path writes grad_k directly)
  float* grad_v_accum;
  void *grad_k, *grad_v;  // [Nk, Hkv, D] in the input dtype (tensor-core path)
  int64_t kv_heads;
};

constexpr int kTileRows = 64;  // query rows (forward) or keys (backward) per block
constexpr int kTileKeys = 64;  // keys (forward) or query rows (backward) per inner step
constexpr int kThreads = 128;  // 4 warps of 16 rows each

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return float(x);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(x);
  } else {
    return T(x);
  }
}

// Copies `rows` rows of D values (row stride `stride`) into a dense [tile_rows, D] shared tile, zero-filling the
// rest, with all threads of the block.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int64_t rows, int tile_rows) {
  for (int e = threadIdx.x; e < tile_rows * D; e += blockDim.x) {
    const int r = e / D, c = e % D;
    tile[e] = r < rows ? src[r * stride + c] : from_float<T>(0.f);
  }
}

// acc += A B for one warp, with A [16, K] and B [K, 16] in shared memory in the given WMMA layouts (row_major:
// element (r, c) at r * ld + c; col_major: at c * ld + r) and leading dimensions; K is a multiple of 16.
template <typename T, int K, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void warp_mma(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>& acc,
                                         const T* a, int lda, const T* b, int ldb) {
  using namespace nvcuda;
  constexpr bool a_rows = std::is_same_v<LayoutA, wmma::row_major>, b_rows = std::is_same_v<LayoutB, wmma::row_major>;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
    wmma::load_matrix_sync(fa, a + kk * 16 * (a_rows ? 1 : lda), lda);
    wmma::load_matrix_sync(fb, b + kk * 16 * (b_rows ? ldb : 1), ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

template <typename T, int D>
struct ForwardSmem {
  static constexpr int kSld = D > kTileKeys ? D : kTileKeys;  // floats per row of the score / product buffer
  static constexpr size_t q = 0;
  static constexpr size_t k = q + size_t(kTileRows) * D * sizeof(T);
  static constexpr size_t v = k + size_t(kTileKeys) * D * sizeof(T);
  static constexpr size_t s = v + size_t(kTileKeys) * D * sizeof(T);
  static constexpr size_t p = s + size_t(kTileRows) * kSld * sizeof(float);
  static constexpr size_t bytes = p + size_t(kTileRows) * kTileKeys * sizeof(T);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_tc_kernel(ForwardArgs a) {
  using namespace nvcuda;
  using L = ForwardSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem + L::q);
  T* sk = reinterpret_cast<T*>(smem + L::k);
  T* sv = reinterpret_cast<T*>(smem + L::v);
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  const int64_t i0 = int64_t(blockIdx.x) * kTileRows;
  if (i0 >= lq) return;
  const int64_t hk = h / a.group;
  float* sw = reinterpret_cast<float*>(smem + L::s) + warp * 16 * L::kSld;  // this warp's 16 rows
  T* pw = reinterpret_cast<T*>(smem + L::p) + warp * 16 * kTileKeys;
  load_tile<T, D>(sq, static_cast<const T*>(a.q) + (q0 + i0) * a.q_s0 + h * a.q_s1, a.q_s0,
                  lq - i0 < kTileRows ? lq - i0 : kTileRows, kTileRows);

  // Softmax layout: lanes 2r and 2r+1 share the warp's row r, each with half of the key columns and of D.
  const int r = lane >> 1, half = lane & 1;
  const int64_t i = i0 + warp * 16 + r;
  const int64_t row_keys = key_end(i, lq, lk, a.causal);
  float m = -INFINITY, l = 0.f, o[D / 2];
#pragma unroll
  for (int c = 0; c < D / 2; ++c) o[c] = 0.f;
  const int64_t last = (i0 + kTileRows < lq ? i0 + kTileRows : lq) - 1;
  const int64_t keys = key_end(last, lq, lk, a.causal);
  for (int64_t kb = 0; kb < keys; kb += kTileKeys) {
    const int64_t rows = keys - kb < kTileKeys ? keys - kb : kTileKeys;
    __syncthreads();  // every warp is done with the previous key/value tiles
    load_tile<T, D>(sk, static_cast<const T*>(a.k) + (k0 + kb) * a.k_s0 + hk * a.k_s1, a.k_s0, rows, kTileKeys);
    load_tile<T, D>(sv, static_cast<const T*>(a.v) + (k0 + kb) * a.v_s0 + hk * a.v_s1, a.v_s0, rows, kTileKeys);
    __syncthreads();
    // S = Q K^T for this warp's 16 rows.
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      warp_mma<T, D, wmma::row_major, wmma::col_major>(acc, sq + warp * 16 * D, D, sk + nt * 16 * D, D);
      wmma::store_matrix_sync(sw + nt * 16, acc, L::kSld, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax of the row's 64 new scores (32 per lane).
    float s[kTileKeys / 2], row_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTileKeys / 2; ++j) {
      const int col = half * (kTileKeys / 2) + j;
      s[j] = kb + col < row_keys ? sw[r * L::kSld + col] * a.scale : -INFINITY;
      row_max = fmaxf(row_max, s[j]);
    }
    row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
    const float m_new = fmaxf(m, row_max);
    const float alpha = softmax_rescale(m, m_new), shift = softmax_shift(m_new);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kTileKeys / 2; ++j) {
      const float pj = __expf(s[j] - shift);
      sum += pj;
      pw[r * kTileKeys + half * (kTileKeys / 2) + j] = from_float<T>(pj);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    __syncwarp();
    // P V for this warp's rows, through the score buffer.
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      warp_mma<T, kTileKeys, wmma::row_major, wmma::row_major>(acc, pw, kTileKeys, sv + nt * 16, D);
      wmma::store_matrix_sync(sw + nt * 16, acc, L::kSld, wmma::mem_row_major);
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < D / 2; ++c) o[c] = o[c] * alpha + sw[r * L::kSld + half * (D / 2) + c];
  }
  if (i < lq) {
    const float inv = softmax_inverse_sum(l);
    T* dst = static_cast<T*>(a.out) + ((q0 + i) * a.heads + h) * D + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; ++c) dst[c] = from_float<T>(o[c] * inv);
    if (half == 0) a.lse[h * a.total_q + q0 + i] = softmax_lse(m, l);
  }
}

template <typename T, int D>
struct BackwardSmem {
  static constexpr size_t k = 0;
  static constexpr size_t v = k + size_t(kTileRows) * D * sizeof(T);
  static constexpr size_t q = v + size_t(kTileRows) * D * sizeof(T);
  static constexpr size_t dout = q + size_t(kTileKeys) * D * sizeof(T);
  static constexpr size_t s = dout + size_t(kTileKeys) * D * sizeof(T);  // float [64][64], then dP [64][64]
  static constexpr size_t dp = s + size_t(kTileRows) * kTileKeys * sizeof(float);
  static constexpr size_t p = dp + size_t(kTileRows) * kTileKeys * sizeof(float);
  static constexpr size_t lse = p + size_t(kTileRows) * kTileKeys * sizeof(T);
  static constexpr size_t delta = lse + kTileKeys * sizeof(float);
  static constexpr size_t bytes = delta + kTileKeys * sizeof(float);
  // A float [64][D] product buffer reuses s and dp (2 * 64 * 64 floats >= 64 * D for D <= 128).
  static_assert(D <= 2 * kTileKeys, "head dim too large for the backward tile");
};

// One block per (64 keys, key/value head, sequence): loops over every query head of the group and every query
// block that sees those keys; owns dK and dV of its keys (WMMA accumulators) and adds dQ atomically in float32.
// In this kernel "rows" are keys and "columns" are queries: S^T = K Q^T, dP^T = V dO^T.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) backward_tc_kernel(BackwardArgs ba) {
  using namespace nvcuda;
  using L = BackwardSmem<T, D>;
  const ForwardArgs& a = ba.fwd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem + L::k);
  T* sv = reinterpret_cast<T*>(smem + L::v);
  T* sq = reinterpret_cast<T*>(smem + L::q);
  T* sdo = reinterpret_cast<T*>(smem + L::dout);
  float* ss = reinterpret_cast<float*>(smem + L::s);
  float* sdp = reinterpret_cast<float*>(smem + L::dp);
  T* sp = reinterpret_cast<T*>(smem + L::p);
  float* slse = reinterpret_cast<float*>(smem + L::lse);
  float* sdelta = reinterpret_cast<float*>(smem + L::delta);
  float* sprod = ss;  // [64][D] products, after S and dP are consumed
  const int b = blockIdx.z, hk = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  const int64_t j0 = int64_t(blockIdx.x) * kTileRows;
  if (j0 >= lk) return;
  const int64_t key_rows = lk - j0 < kTileRows ? lk - j0 : kTileRows;
  load_tile<T, D>(sk, static_cast<const T*>(a.k) + (k0 + j0) * a.k_s0 + hk * a.k_s1, a.k_s0, key_rows, kTileRows);
  load_tile<T, D>(sv, static_cast<const T*>(a.v) + (k0 + j0) * a.v_s0 + hk * a.v_s1, a.v_s0, key_rows, kTileRows);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[D / 16], dv[D / 16];
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::fill_fragment(dk[nt], 0.f);
    wmma::fill_fragment(dv[nt], 0.f);
  }
  // Key j is visible to query i iff j < key_end(i), i.e. i >= j + lq - lk when causal.
  int64_t first_row = a.causal ? j0 + lq - lk : 0;
  first_row = first_row < 0 ? 0 : (first_row / kTileKeys) * kTileKeys;
  const int r = lane >> 1, half = lane & 1;  // elementwise layout: key row r of this warp, half of the queries
  const int64_t j = j0 + warp * 16 + r;
  float* sw = ss + warp * 16 * kTileKeys;
  float* dpw = sdp + warp * 16 * kTileKeys;
  T* pw = sp + warp * 16 * kTileKeys;
  for (int64_t h = hk * a.group; h < (hk + 1) * a.group; ++h) {
    for (int64_t ib = first_row; ib < lq; ib += kTileKeys) {
      const int64_t rows = lq - ib < kTileKeys ? lq - ib : kTileKeys;
      __syncthreads();
      load_tile<T, D>(sq, static_cast<const T*>(a.q) + (q0 + ib) * a.q_s0 + h * a.q_s1, a.q_s0, rows, kTileKeys);
      load_tile<T, D>(sdo, static_cast<const T*>(ba.grad_out) + (q0 + ib) * ba.do_s0 + h * ba.do_s1, ba.do_s0, rows,
                      kTileKeys);
      for (int e = threadIdx.x; e < kTileKeys; e += blockDim.x) {
        slse[e] = e < rows ? backward_shift(a.lse[h * a.total_q + q0 + ib + e]) : INFINITY;
        sdelta[e] = e < rows ? ba.delta[h * a.total_q + q0 + ib + e] : 0.f;
      }
      __syncthreads();
      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
#pragma unroll
      for (int nt = 0; nt < kTileKeys / 16; ++nt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_s, acc_dp;
        wmma::fill_fragment(acc_s, 0.f);
        wmma::fill_fragment(acc_dp, 0.f);
        warp_mma<T, D, wmma::row_major, wmma::col_major>(acc_s, sk + warp * 16 * D, D, sq + nt * 16 * D, D);
        warp_mma<T, D, wmma::row_major, wmma::col_major>(acc_dp, sv + warp * 16 * D, D, sdo + nt * 16 * D, D);
        wmma::store_matrix_sync(sw + nt * 16, acc_s, kTileKeys, wmma::mem_row_major);
        wmma::store_matrix_sync(dpw + nt * 16, acc_dp, kTileKeys, wmma::mem_row_major);
      }
      __syncwarp();
      // P^T = exp(scale S^T - lse) where visible, dS^T = P^T (dP^T - delta); P^T goes to pw, dS^T (float) to dpw.
#pragma unroll 8
      for (int c = 0; c < kTileKeys / 2; ++c) {
        const int col = half * (kTileKeys / 2) + c;
        const int64_t i = ib + col;
        const bool visible = i < lq && j < lk && j < key_end(i, lq, lk, a.causal);
        const float pij = visible ? __expf(sw[r * kTileKeys + col] * a.scale - slse[col]) : 0.f;
        pw[r * kTileKeys + col] = from_float<T>(pij);
        dpw[r * kTileKeys + col] = pij * (dpw[r * kTileKeys + col] - sdelta[col]);
      }
      __syncwarp();
      // dV += P^T dO
#pragma unroll
      for (int nt = 0; nt < D / 16; ++nt) {
        warp_mma<T, kTileKeys, wmma::row_major, wmma::row_major>(dv[nt], pw, kTileKeys, sdo + nt * 16, D);
      }
      __syncwarp();
#pragma unroll 8
      for (int c = 0; c < kTileKeys / 2; ++c) {
        const int col = half * (kTileKeys / 2) + c;
        pw[r * kTileKeys + col] = from_float<T>(dpw[r * kTileKeys + col]);
      }
      __syncwarp();
      // dK += dS^T Q (scaled at the end)
#pragma unroll
      for (int nt = 0; nt < D / 16; ++nt) {
        warp_mma<T, kTileKeys, wmma::row_major, wmma::row_major>(dk[nt], pw, kTileKeys, sq + nt * 16, D);
      }
      __syncthreads();  // dS^T of all 64 keys is in sp; S and dP are no longer read
      // dQ rows (warp's 16 queries) += scale dS K, with dS read as the transpose of dS^T.
#pragma unroll
      for (int nt = 0; nt < D / 16; ++nt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        warp_mma<T, kTileRows, wmma::col_major, wmma::row_major>(acc, sp + warp * 16, kTileKeys, sk + nt * 16, D);
        wmma::store_matrix_sync(sprod + warp * 16 * D + nt * 16, acc, D, wmma::mem_row_major);
      }
      __syncwarp();
      for (int e = lane; e < 16 * D; e += 32) {
        const int64_t i = ib + warp * 16 + e / D;
        if (i < lq) {
          atomicAdd(ba.grad_q_accum + ((q0 + i) * a.heads + h) * D + e % D, a.scale * sprod[warp * 16 * D + e]);
        }
      }
    }
  }
  // Write dK (scaled) and dV of this block's keys through shared memory.
  for (int which = 0; which < 2; ++which) {
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt) {
      if (which == 0) {
        for (int t = 0; t < dk[nt].num_elements; ++t) dk[nt].x[t] *= a.scale;
      }
      wmma::store_matrix_sync(sprod + warp * 16 * D + nt * 16, which == 0 ? dk[nt] : dv[nt], D, wmma::mem_row_major);
    }
    __syncthreads();
    T* dst = static_cast<T*>(which == 0 ? ba.grad_k : ba.grad_v);
    for (int e = threadIdx.x; e < kTileRows * D; e += blockDim.x) {
      const int64_t jj = j0 + e / D;
      if (jj < lk) dst[((k0 + jj) * ba.kv_heads + hk) * D + e % D] = from_float<T>(sprod[e]);
    }
  }
}

// Tensor-core launchers, instantiated for T in {__nv_bfloat16, __half} and D in {32, 64, 80, 96, 128} across
// several .cu files so they compile in parallel.
template <typename T, int D>
void launch_forward_tc(const ForwardArgs& a, int64_t batch, int64_t max_seqlen_q, cudaStream_t stream);
template <typename T, int D>
void launch_backward_tc(const BackwardArgs& a, int64_t batch, int64_t max_seqlen_k, cudaStream_t stream);

}  // namespace vidfast::attention::cuda
