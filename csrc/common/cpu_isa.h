#pragma once
// The one place CPU kernels learn which x86 vector instructions they may use.
//
// Two mechanisms, for two kinds of loops:
// - Explicit vector paths (intrinsics) are written per level as functions marked VIDFAST_TARGET_AVX2 /
//   VIDFAST_TARGET_AVX512, or as whole files compiled with that level's -m flags, and the caller branches on
//   cpu_isa(). cpu_isa() is the level ATen itself runs (at::get_cpu_capability()), so ATEN_CPU_CAPABILITY=default
//   or =avx2 forces ours down with ATen's, which is how tests compare the vector paths with the portable ones.
// - Plain loops the compiler vectorizes are marked VIDFAST_CPU_CLONES: compiled for x86-64-v3 (AVX2, FMA) and the
//   baseline, and the dynamic loader picks one per machine (GCC/Clang target_clones), so wheels stay portable.
#include <cstdint>

namespace vidfast {

enum class CpuIsa : uint8_t { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest level this CPU supports and ATen allows, decided once per process; kDefault off x86-64.
CpuIsa cpu_isa();

// Whether explicit paths of `level` may run (levels are ordered: AVX-512 machines run the AVX2 paths too).
inline bool cpu_has(CpuIsa level) { return static_cast<uint8_t>(cpu_isa()) >= static_cast<uint8_t>(level); }

// Whether this CPU has AVX-512 VBMI's byte permutes, for AVX-512 paths that need them (only where cpu_has(kAvx512)).
bool cpu_has_avx512_vbmi();

}  // namespace vidfast

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VIDFAST_X86 1
#define VIDFAST_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VIDFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,fma,f16c")))
#define VIDFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VIDFAST_CPU_CLONES
#endif
