#include "common/cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace vidfast {

CpuIsa cpu_isa() {
#if defined(VIDFAST_X86)
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return CpuIsa::kAvx512;
    if (capability == "AVX2") return CpuIsa::kAvx2;
    return CpuIsa::kDefault;
  }();
  return isa;
#else
  return CpuIsa::kDefault;
#endif
}

bool cpu_has_avx512_vbmi() {
#if defined(VIDFAST_X86)
  static const bool has = __builtin_cpu_supports("avx512vbmi");
  return has;
#else
  return false;
#endif
}

}  // namespace vidfast
