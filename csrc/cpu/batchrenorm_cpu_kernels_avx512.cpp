// The CPU kernels for AVX-512 (F, BW, VL, DQ) + FMA + F16C, chosen at run time by
// batchrenorm_cpu.cpp when the CPU has them and ATen runs its own AVX-512 kernels. As in the
// AVX2 file, the target pragma and at::vec's CPU_CAPABILITY come before any header, so that
// at::vec::Vectorized is its 512-bit specialisation here.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "cpu/batchrenorm_cpu_avx2_macros.h"
// And those of -mavx512f -mavx512bw -mavx512vl -mavx512dq.
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define BRN_CPU_ISA avx512
#include "cpu/batchrenorm_cpu_kernels_impl.h"
#endif
