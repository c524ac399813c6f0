#pragma once
// Hot CPU loops are compiled twice, for x86-64-v3 (AVX2, FMA) and the baseline, and the loader picks one per
// machine (GCC/Clang target_clones), so wheels stay portable and still vectorize wide where they can.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VIDFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VIDFAST_CPU_CLONES
#endif
