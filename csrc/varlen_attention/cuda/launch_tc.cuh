#pragma once
// Launchers of the tensor-core kernels; each including .cu file instantiates them for one dtype and direction.
#include <c10/cuda/CUDAException.h>

#include "varlen_attention/cuda/kernels.cuh"

namespace vidfast::attention::cuda {

template <typename T, int D>
void launch_forward_tc(const ForwardArgs& a, int64_t batch, int64_t max_seqlen_q, cudaStream_t stream) {
  if (max_seqlen_q == 0 || batch == 0) return;  // an empty grid is a launch error
  constexpr int bytes = int(ForwardSmem<T, D>::bytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(forward_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid(unsigned(ceil_div(max_seqlen_q, kTileRows)), unsigned(a.heads), unsigned(batch));
  forward_tc_kernel<T, D><<<grid, kThreads, bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_backward_tc(const BackwardArgs& a, int64_t batch, int64_t max_seqlen_k, cudaStream_t stream) {
  if (max_seqlen_k == 0 || batch == 0) return;
  constexpr int bytes = int(BackwardSmem<T, D>::bytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(backward_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid(unsigned(ceil_div(max_seqlen_k, kTileRows)), unsigned(a.kv_heads), unsigned(batch));
  backward_tc_kernel<T, D><<<grid, kThreads, bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define VIDFAST_ATTENTION_INSTANTIATE(launcher, T, ...)                                        \
  template void launcher<T, 32>(__VA_ARGS__);                                                  \
  template void launcher<T, 64>(__VA_ARGS__);                                                  \
  template void launcher<T, 80>(__VA_ARGS__);                                                  \
  template void launcher<T, 96>(__VA_ARGS__);                                                  \
  template void launcher<T, 128>(__VA_ARGS__);

}  // namespace vidfast::attention::cuda
