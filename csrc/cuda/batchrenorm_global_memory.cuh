// batchrenorm_global_memory.cuh: every global-memory access of the kernels goes through these
// helpers. Under nvcc they are the plain access (or the cache-hinted intrinsic); under the CUDA
// emulator (csrc/cuda/emulation, BRN_CUDA_EMULATION) they also report the access, so the
// emulator counts the bytes each launch and each CTA reads and writes (benchmarks/gpu_model.py,
// tests/test_cuda_traffic.py). Include after cuda_runtime.h.
#pragma once

#include <cstddef>

#if defined(BRN_CUDA_EMULATION) && !defined(__CUDACC__)
#define BRN_COUNT_GLOBAL(ptr, bytes, is_write) \
  ::cuda_emulation::count_global(static_cast<const void*>(ptr), (bytes), (is_write))
#else
#define BRN_COUNT_GLOBAL(ptr, bytes, is_write) ((void)0)
#endif

namespace batchrenorm {
namespace cuda {

// A read of data that no thread of this launch writes (inputs, parameters, buffers read before
// their update).
template <typename T>
__device__ __forceinline__ T load_global(const T* p) {
  BRN_COUNT_GLOBAL(p, sizeof(T), false);
  return *p;
}

// The same through the read-only (non-coherent) path, for per-channel parameters that many
// threads gather.
template <typename T>
__device__ __forceinline__ T load_global_ro(const T* p) {
  BRN_COUNT_GLOBAL(p, sizeof(T), false);
  return __ldg(p);
}

// A read of data another CTA wrote earlier in this launch (before a grid barrier): cached in L2
// only, so no stale L1 line is read.
template <typename T>
__device__ __forceinline__ T load_global_cg(const T* p) {
  BRN_COUNT_GLOBAL(p, sizeof(T), false);
  return __ldcg(p);
}

template <typename T>
__device__ __forceinline__ void store_global(T* p, const T& v) {
  BRN_COUNT_GLOBAL(p, sizeof(T), true);
  *p = v;
}

}  // namespace cuda
}  // namespace batchrenorm
