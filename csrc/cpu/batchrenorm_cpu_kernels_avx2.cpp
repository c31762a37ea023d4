// The CPU kernels for AVX2 + FMA + F16C, chosen at run time by batchrenorm_cpu.cpp when the CPU
// has them. The target pragma and at::vec's CPU_CAPABILITY must come before any header, so
// that at::vec::Vectorized is its 256-bit specialisation here (in its own inline namespace).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c")
#include "cpu/batchrenorm_cpu_avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define BRN_CPU_ISA avx2
#include "cpu/batchrenorm_cpu_kernels_impl.h"
#endif
