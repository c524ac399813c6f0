#pragma once
// NVTX ranges in the "pyvidfast" domain. With no profiler attached an NVTX3 range costs a branch; builds without
// the NVTX3 headers (CPU-only toolchains) compile them away.
#if defined(VIDFAST_WITH_NVTX)
#include <nvtx3/nvtx3.hpp>
namespace vidfast {
struct nvtx_domain {
  static constexpr char const* name{"pyvidfast"};
};
}  // namespace vidfast
#define VIDFAST_NVTX_CAT2(a, b) a##b
#define VIDFAST_NVTX_CAT(a, b) VIDFAST_NVTX_CAT2(a, b)
#define VIDFAST_NVTX_RANGE(literal)                                                                      \
  static const nvtx3::registered_string_in<::vidfast::nvtx_domain> VIDFAST_NVTX_CAT(_vf_msg_, __LINE__){ \
      literal};                                                                                          \
  const nvtx3::scoped_range_in<::vidfast::nvtx_domain> VIDFAST_NVTX_CAT(_vf_range_, __LINE__) {          \
    VIDFAST_NVTX_CAT(_vf_msg_, __LINE__)                                                                 \
  }
#else
#define VIDFAST_NVTX_RANGE(literal) ((void)0)
#endif
