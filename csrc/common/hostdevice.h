#pragma once
// Marks arithmetic shared by the CPU and CUDA kernels.
#if defined(__CUDACC__)
#define VIDFAST_HD __host__ __device__ __forceinline__
#else
#define VIDFAST_HD inline
#endif
