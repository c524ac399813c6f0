// CUDA entry points of the varlen attention ops: checks, allocation, the choice between the tensor-core kernels
// (bf16/fp16, head dims 32/64/80/96/128) and the simple CUDA-core kernels (float32 and other head dims up to 256),
// and the small kernels around them (delta = rowsum(dO * O) - dlse for the backward pass).
// cu_seqlens values are not read on the host (that would synchronize): they are trusted, see varlen_attention.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/nvtx.h"
#include "varlen_attention/cuda/kernels.cuh"
#include "varlen_attention/varlen_attention.h"

namespace vidfast::attention::cuda {
namespace {

constexpr int kSimpleMaxHeadDim = 256;
constexpr int kSimpleThreads = 128;

ForwardArgs forward_args(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out, const at::Tensor& lse) {
  ForwardArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_s0 = q.stride(0), a.q_s1 = q.stride(1);
  a.k_s0 = k.stride(0), a.k_s1 = k.stride(1);
  a.v_s0 = v.stride(0), a.v_s1 = v.stride(1);
  a.cu_q = cu_q.data_ptr<int32_t>();
  a.cu_k = cu_k.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.total_q = p.total_q, a.heads = p.heads, a.group = p.group(), a.head_dim = p.head_dim;
  a.scale = float(p.scale);
  a.causal = p.causal;
  return a;
}

// One thread per (query row, head): online softmax over the row's keys, in float32.
template <typename scalar_t>
__global__ void forward_simple_kernel(ForwardArgs a) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int64_t q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= lq) return;
  const int64_t d = a.head_dim, hk = h / a.group;
  const scalar_t* qi = static_cast<const scalar_t*>(a.q) + (q0 + i) * a.q_s0 + h * a.q_s1;
  float qf[kSimpleMaxHeadDim], o[kSimpleMaxHeadDim];
  for (int64_t c = 0; c < d; ++c) {
    qf[c] = float(qi[c]) * a.scale;
    o[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int64_t keys = key_end(i, lq, lk, a.causal);
  for (int64_t j = 0; j < keys; ++j) {
    const scalar_t* kj = static_cast<const scalar_t*>(a.k) + (k0 + j) * a.k_s0 + hk * a.k_s1;
    const scalar_t* vj = static_cast<const scalar_t*>(a.v) + (k0 + j) * a.v_s0 + hk * a.v_s1;
    float s = 0.f;
    for (int64_t c = 0; c < d; ++c) s += qf[c] * float(kj[c]);
    const float m_new = fmaxf(m, s);
    const float alpha = softmax_rescale(m, m_new), pj = expf(s - softmax_shift(m_new));
    l = l * alpha + pj;
    m = m_new;
    for (int64_t c = 0; c < d; ++c) o[c] = o[c] * alpha + pj * float(vj[c]);
  }
  const float inv = softmax_inverse_sum(l);
  scalar_t* dst = static_cast<scalar_t*>(a.out) + ((q0 + i) * a.heads + h) * d;
  for (int64_t c = 0; c < d; ++c) dst[c] = scalar_t(o[c] * inv);
  a.lse[h * a.total_q + q0 + i] = softmax_lse(m, l);
}

// One thread per (query row, head): the row's dQ in registers, dK and dV added atomically in float32.
template <typename scalar_t>
__global__ void backward_simple_kernel(BackwardArgs ba) {
  const ForwardArgs& a = ba.fwd;
  const int b = blockIdx.z, h = blockIdx.y;
  const int64_t q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= lq) return;
  const int64_t d = a.head_dim, hk = h / a.group;
  const scalar_t* qi = static_cast<const scalar_t*>(a.q) + (q0 + i) * a.q_s0 + h * a.q_s1;
  const scalar_t* doi = static_cast<const scalar_t*>(ba.grad_out) + (q0 + i) * ba.do_s0 + h * ba.do_s1;
  float qf[kSimpleMaxHeadDim], dof[kSimpleMaxHeadDim], dq[kSimpleMaxHeadDim];
  for (int64_t c = 0; c < d; ++c) {
    qf[c] = float(qi[c]);
    dof[c] = float(doi[c]);
    dq[c] = 0.f;
  }
  const float shift = backward_shift(a.lse[h * a.total_q + q0 + i]);
  const float delta = ba.delta[h * a.total_q + q0 + i];
  const int64_t keys = key_end(i, lq, lk, a.causal);
  for (int64_t j = 0; j < keys; ++j) {
    const scalar_t* kj = static_cast<const scalar_t*>(a.k) + (k0 + j) * a.k_s0 + hk * a.k_s1;
    const scalar_t* vj = static_cast<const scalar_t*>(a.v) + (k0 + j) * a.v_s0 + hk * a.v_s1;
    float s = 0.f, dp = 0.f;
    for (int64_t c = 0; c < d; ++c) {
      s += (qf[c] * a.scale) * float(kj[c]);  // rounded as in the forward kernel, which produced lse
      dp += dof[c] * float(vj[c]);
    }
    const float pj = expf(s - shift), ds = pj * (dp - delta) * a.scale;
    float* dk = ba.grad_k_accum + ((k0 + j) * ba.kv_heads + hk) * d;
    float* dv = ba.grad_v_accum + ((k0 + j) * ba.kv_heads + hk) * d;
    for (int64_t c = 0; c < d; ++c) {
      dq[c] += ds * float(kj[c]);
      atomicAdd(dk + c, ds * qf[c]);
      atomicAdd(dv + c, pj * dof[c]);
    }
  }
  float* dst = ba.grad_q_accum + ((q0 + i) * a.heads + h) * d;
  for (int64_t c = 0; c < d; ++c) dst[c] = dq[c];
}

// delta[h, t] = sum_c dO[t, h, c] O[t, h, c] - dlse[h, t]: one thread per (token, head).
template <typename scalar_t>
__global__ void delta_kernel(const scalar_t* grad_out, int64_t do_s0, int64_t do_s1, const scalar_t* out,
                             int64_t o_s0, int64_t o_s1, const float* grad_lse, int64_t total_q, int64_t heads,
                             int64_t d, float* delta) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total_q * heads) return;
  const int64_t t = e / heads, h = e % heads;
  float sum = 0.f;
  for (int64_t c = 0; c < d; ++c) sum += float(grad_out[t * do_s0 + h * do_s1 + c]) * float(out[t * o_s0 + h * o_s1 + c]);
  delta[h * total_q + t] = sum - (grad_lse ? grad_lse[h * total_q + t] : 0.f);
}

bool use_tensor_cores(const at::Tensor& q, int64_t head_dim) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  return head_dim == 32 || head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128;
}

// Calls fn(T{}, std::integral_constant<int, D>{}) for the tensor-core instantiation matching q.
template <typename Fn>
void dispatch_tc(const at::Tensor& q, int64_t head_dim, const Fn& fn) {
  auto with_dim = [&](auto tag) {
    switch (head_dim) {
      case 32: return fn(tag, std::integral_constant<int, 32>{});
      case 64: return fn(tag, std::integral_constant<int, 64>{});
      case 80: return fn(tag, std::integral_constant<int, 80>{});
      case 96: return fn(tag, std::integral_constant<int, 96>{});
      default: return fn(tag, std::integral_constant<int, 128>{});
    }
  };
  if (q.scalar_type() == at::kBFloat16) {
    with_dim(__nv_bfloat16{});
  } else {
    with_dim(__half{});
  }
}

void check_cuda_limits(const Params& p, int64_t max_seqlen) {
  VIDFAST_CHECK_VALUE(p.batch <= 65535, "cu_seqlens_q: at most 65535 sequences are supported on CUDA; got ", p.batch);
  VIDFAST_CHECK_VALUE(p.heads <= 65535, "q: at most 65535 heads are supported on CUDA; got ", p.heads);
  VIDFAST_CHECK_VALUE(max_seqlen <= INT32_MAX, "max_seqlen: too large for the CUDA grid; got ", max_seqlen);
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const Params p =
      check_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal);
  check_cuda_limits(p, max_seqlen_q);
  const bool tensor_cores = use_tensor_cores(q, p.head_dim);
  VIDFAST_CHECK_VALUE(tensor_cores || p.head_dim <= kSimpleMaxHeadDim, "q: head dim at most ", kSimpleMaxHeadDim,
                      " is supported on CUDA; got ", p.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({p.total_q, p.heads, p.head_dim}, q.options());
  auto lse = at::empty({p.heads, p.total_q}, q.options().dtype(at::kFloat));
  if (p.total_q == 0 || p.batch == 0 || max_seqlen_q == 0) return {out, lse};
  VIDFAST_NVTX_RANGE("attn/varlen_fwd");
  const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const ForwardArgs a = forward_args(p, q, k, v, cu_q, cu_k, out, lse);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (tensor_cores) {
    dispatch_tc(q, p.head_dim, [&](auto tag, auto dim) {
      launch_forward_tc<decltype(tag), decltype(dim)::value>(a, p.batch, max_seqlen_q, stream);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd_cuda", [&] {
      const dim3 grid(unsigned(ceil_div(max_seqlen_q, kSimpleThreads)), unsigned(p.heads), unsigned(p.batch));
      forward_simple_kernel<scalar_t><<<grid, kSimpleThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const Params p = check_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, softmax_scale, causal);
  check_cuda_limits(p, std::max(max_seqlen_q, max_seqlen_k));
  const bool tensor_cores = use_tensor_cores(q, p.head_dim);
  VIDFAST_CHECK_VALUE(tensor_cores || p.head_dim <= kSimpleMaxHeadDim, "q: head dim at most ", kSimpleMaxHeadDim,
                      " is supported on CUDA; got ", p.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = q.options().dtype(at::kFloat);
  auto grad_q_accum = at::zeros({p.total_q, p.heads, p.head_dim}, f32);
  at::Tensor grad_k, grad_v, grad_k_accum, grad_v_accum;
  if (tensor_cores) {
    grad_k = at::zeros({p.total_k, p.kv_heads, p.head_dim}, q.options());
    grad_v = at::zeros({p.total_k, p.kv_heads, p.head_dim}, q.options());
  } else {
    grad_k_accum = at::zeros({p.total_k, p.kv_heads, p.head_dim}, f32);
    grad_v_accum = at::zeros({p.total_k, p.kv_heads, p.head_dim}, f32);
  }
  if (p.total_q > 0 && p.total_k > 0 && p.batch > 0) {
    VIDFAST_NVTX_RANGE("attn/varlen_bwd");
    const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
    const auto lse_c = lse.contiguous();
    auto delta = at::empty({p.heads, p.total_q}, f32);
    BackwardArgs ba{};
    ba.fwd = forward_args(p, q, k, v, cu_q, cu_k, out, lse_c);
    ba.grad_out = grad_out.data_ptr();
    ba.do_s0 = grad_out.stride(0), ba.do_s1 = grad_out.stride(1);
    ba.delta = delta.data_ptr<float>();
    ba.grad_q_accum = grad_q_accum.data_ptr<float>();
    ba.kv_heads = p.kv_heads;
    const at::Tensor grad_lse_c = grad_lse ? grad_lse->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_bwd_cuda", [&] {
      const int64_t rows = p.total_q * p.heads;
      delta_kernel<scalar_t><<<unsigned(ceil_div(rows, 256)), 256, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), out.data_ptr<scalar_t>(),
          out.stride(0), out.stride(1), grad_lse ? grad_lse_c.data_ptr<float>() : nullptr, p.total_q, p.heads,
          p.head_dim, delta.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (tensor_cores) {
        ba.grad_k = grad_k.data_ptr();
        ba.grad_v = grad_v.data_ptr();
        dispatch_tc(q, p.head_dim, [&](auto tag, auto dim) {
          launch_backward_tc<decltype(tag), decltype(dim)::value>(ba, p.batch, max_seqlen_k, stream);
        });
      } else if (max_seqlen_q > 0) {
        ba.grad_k_accum = grad_k_accum.data_ptr<float>();
        ba.grad_v_accum = grad_v_accum.data_ptr<float>();
        const dim3 grid(unsigned(ceil_div(max_seqlen_q, kSimpleThreads)), unsigned(p.heads), unsigned(p.batch));
        backward_simple_kernel<scalar_t><<<grid, kSimpleThreads, 0, stream>>>(ba);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (!tensor_cores) {
    grad_k = grad_k_accum.to(q.scalar_type());
    grad_v = grad_v_accum.to(q.scalar_type());
  }
  return {grad_q_accum.to(q.scalar_type()), grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidfast, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
}

}  // namespace vidfast::attention::cuda
