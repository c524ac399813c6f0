// Tensor-core backward kernels for __nv_bfloat16, one of four files that split the instantiations so they compile in parallel.
#include "varlen_attention/cuda/launch_tc.cuh"

namespace vidfast::attention::cuda {
VIDFAST_ATTENTION_INSTANTIATE(launch_backward_tc, __nv_bfloat16, const BackwardArgs&, int64_t, int64_t, cudaStream_t)
}  // namespace vidfast::attention::cuda
