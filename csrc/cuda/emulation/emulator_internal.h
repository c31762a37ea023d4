// emulator_internal.h: what emulator.cpp, device.cpp and counters.cpp of the CUDA emulator share
// (not for kernels or the glue: they see include/cuda_runtime.h and cuda_emulation.h).
#pragma once

#include <cstddef>
#include <string>

#include "cuda_emulation.h"

namespace cuda_emulation {
namespace detail {

// The size of the TLS array behind every kernel's `extern __shared__` declaration: the largest
// opt-in dynamic shared memory of any fake device (H100: 227 KiB).
constexpr size_t kMaxDynamicShared = 227 * 1024;

// device.cpp
DeviceProperties current_device(int* id = nullptr);
// The most dynamic shared memory a launch of `kernel` may ask for on the current device: the
// device's default per-CTA limit, or what cudaFuncSetAttribute raised it to.
size_t max_dynamic_shared(const void* kernel);
// Co-resident CTAs per SM of a kernel of `block_size` threads and `dynamic_shared` bytes of
// dynamic shared memory, from the device's limits and its per-kernel assumptions.
int occupancy(const DeviceProperties& device, int block_size, size_t dynamic_shared);

// counters.cpp
// "welford_kernel<float, 4, false>" for a kernel's address (its symbol, demangled and without
// namespaces or parameters), or `fallback` when the symbol cannot be found.
std::string kernel_name(const void* kernel, const std::string& fallback);
std::string current_op();
void append_launch_record(LaunchRecord record);

}  // namespace detail
}  // namespace cuda_emulation
