// cuda_runtime.h of the CUDA emulation: what batchrenorm_kernels.cu uses of the CUDA C++ runtime
// and of the device built-ins, for the host compiler (g++ -x c++). Put this folder first on the
// include path; types and the C API come from the toolkit's own cuda_runtime_api.h, and half /
// bfloat16 arithmetic from its cuda_fp16.h / cuda_bf16.h (NVIDIA's own rounding).
//
// Each CUDA thread is a Boost.Fiber; each CTA runs on an OS thread of its own, so `__shared__`
// is `thread_local`: one copy per CTA, shared by the CTA's fibers. The emulator
// (emulator.cpp) poisons it at CTA start. Barriers, shuffles and grid.sync() are fiber
// synchronisation with the checks compute-sanitizer makes (see cuda_emulation.h).
#pragma once

#if defined(__CUDACC__)
#error "csrc/cuda/emulation is for the host compiler; nvcc uses the toolkit's cuda_runtime.h"
#endif

// Defined before the toolkit's host_defines.h, which then leaves them alone.
#define __global__
#define __shared__ thread_local
#define __launch_bounds__(...)
// Kernel sources test this to route their global accesses through count_global
// (csrc/cuda/batchrenorm_global_memory.cuh).
#define BRN_CUDA_EMULATION 1

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cuda_emulation {

// Where a synchronisation call sits in the kernel source, for the emulator's messages.
struct Site {
  const char* what;  // "__syncthreads", "grid.sync", "__shfl_down_sync", ...
  const char* function;
  const char* file;
  int line;
};

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void sync_threads(Site site);
void sync_grid(Site site);
enum class ShuffleMode : int { kDown, kUp, kXor, kIndex };
uint64_t shuffle(unsigned mask, uint64_t bits, ShuffleMode mode, int arg, int width, Site site);

// One CTA-thread's call of the kernel with its own copy of the arguments.
using KernelBody = void (*)(const void* kernel, void* const* args);
cudaError_t launch(const void* kernel, KernelBody body, void** args, const char* kernel_type,
                   dim3 grid, dim3 block, size_t shared_bytes, bool cooperative);
// Occupancy on the current fake device (device.cpp).
int max_active_ctas_per_sm(const void* kernel, int block_size, size_t shared_bytes);
// A global-memory access of `bytes` at `address` by the calling CUDA thread, counted per launch
// and per CTA (a CTA's repeated read since its last barrier once: cuda_emulation.h).
void count_global(const void* address, size_t bytes, bool is_write);

template <typename... P, size_t... I>
void call_kernel(void (*kernel)(P...), void* const* args, std::index_sequence<I...>) {
  // Each CUDA thread gets its own copy of every argument, as a kernel parameter is.
  kernel(std::decay_t<P>(*static_cast<const std::decay_t<P>*>(args[I]))...);
}

template <typename... P>
void kernel_body(const void* kernel, void* const* args) {
  call_kernel(reinterpret_cast<void (*)(P...)>(const_cast<void*>(kernel)), args,
              std::index_sequence_for<P...>{});
}

template <typename... P>
const char* kernel_type_name() {
  return __PRETTY_FUNCTION__;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "shuffles of values up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_idx())
#define blockIdx (::cuda_emulation::block_idx())
#define blockDim (::cuda_emulation::block_dim())
#define gridDim (::cuda_emulation::grid_dim())
#define warpSize 32
#define __syncthreads() \
  ::cuda_emulation::sync_threads({"__syncthreads", __builtin_FUNCTION(), __FILE__, __LINE__})

// The typed launches of the CUDA C++ API (cuda_runtime.h's templates): the parameter types come
// from the kernel pointer, so the emulator can copy the arguments into each thread.
template <typename... P>
cudaError_t cudaLaunchKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                             size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return ::cuda_emulation::launch(reinterpret_cast<const void*>(kernel),
                                  &::cuda_emulation::kernel_body<P...>, args,
                                  ::cuda_emulation::kernel_type_name<P...>(), grid, block,
                                  shared_bytes, false);
}

template <typename... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                                        size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return ::cuda_emulation::launch(reinterpret_cast<const void*>(kernel),
                                  &::cuda_emulation::kernel_body<P...>, args,
                                  ::cuda_emulation::kernel_type_name<P...>(), grid, block,
                                  shared_bytes, true);
}

template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, void (*kernel)(P...),
                                                          int block_size,
                                                          size_t shared_bytes) {
  *num_blocks = ::cuda_emulation::max_active_ctas_per_sm(reinterpret_cast<const void*>(kernel),
                                                         block_size, shared_bytes);
  return cudaSuccess;
}

// cuda_runtime.h's typed overloads of the per-kernel attribute calls (the C ones are in
// device.cpp): cudaFuncAttributeMaxDynamicSharedMemorySize up to the device's opt-in limit;
// the attributes report the fake device's per-kernel assumptions (registers, static shared).
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}

// Device built-ins. Loads are plain loads (cache hints mean nothing here).
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline float __frcp_rn(float x) { return 1.0f / x; }

// Atomics and fences. One CTA runs at a time and its fibers switch only at synchronisation
// calls, so a plain read-modify-write is atomic here; it is counted as a read and a write.
inline unsigned atomicInc(unsigned* address, unsigned val) {
  ::cuda_emulation::count_global(address, sizeof(unsigned), false);
  ::cuda_emulation::count_global(address, sizeof(unsigned), true);
  const unsigned old = *address;
  *address = old >= val ? 0u : old + 1u;
  return old;
}
inline void __threadfence() {}

#define BRN_EMU_SHUFFLE(name, mode)                                                          \
  template <typename T>                                                                       \
  T name(unsigned mask, T var, int arg, int width = warpSize,                                 \
         const char* function = __builtin_FUNCTION(), const char* file = __builtin_FILE(),   \
         int line = __builtin_LINE()) {                                                       \
    return ::cuda_emulation::from_bits<T>(::cuda_emulation::shuffle(                          \
        mask, ::cuda_emulation::to_bits(var), ::cuda_emulation::ShuffleMode::mode, arg, width, \
        {#name, function, file, line}));                                                      \
  }
BRN_EMU_SHUFFLE(__shfl_down_sync, kDown)
BRN_EMU_SHUFFLE(__shfl_up_sync, kUp)
BRN_EMU_SHUFFLE(__shfl_xor_sync, kXor)
BRN_EMU_SHUFFLE(__shfl_sync, kIndex)
#undef BRN_EMU_SHUFFLE

// CUDA's global min / max overloads (device code calls them unqualified, on 64-bit integers too).
#define BRN_EMU_MINMAX(T)                                 \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T max(T a, T b) { return a < b ? b : a; }
BRN_EMU_MINMAX(int)
BRN_EMU_MINMAX(unsigned int)
BRN_EMU_MINMAX(long)
BRN_EMU_MINMAX(unsigned long)
BRN_EMU_MINMAX(long long)
BRN_EMU_MINMAX(unsigned long long)
BRN_EMU_MINMAX(float)
BRN_EMU_MINMAX(double)
#undef BRN_EMU_MINMAX
