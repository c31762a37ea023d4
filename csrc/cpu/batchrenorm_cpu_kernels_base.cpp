// The CPU kernels for the baseline instruction set (any CPU).
#define BRN_CPU_ISA base
#include "cpu/batchrenorm_cpu_kernels_impl.h"
