// The CPU kernels compiled for one instruction set; CMakeLists.txt sets CPU_CAPABILITY and the compiler flags.
#include "varlen_attention/cpu/kernel_impl.h"
