// cuda_emulation.h: control of the CUDA emulator (torch-free), for the emulated glue and tests.
//
// The emulator runs an unmodified CUDA kernel source compiled by the host compiler: every CUDA
// thread is a Boost.Fiber, every CTA an OS thread (so `__shared__` is per CTA), and one CTA runs
// at a time, handing a baton to the next at grid.sync() and at exit, so a run is a deterministic
// function of its schedule. It checks, as compute-sanitizer's synccheck / initcheck would:
//  - every barrier (__syncthreads, grid.sync) is reached by every thread of the CTA (grid), at
//    the same call site; a thread that exits first, or waits elsewhere, is an error, not a hang;
//  - every shuffle's mask names lanes that take part, with the same mask and site;
//  - static and dynamic __shared__ memory is poisoned (bytes 0xFF: NaN in every float type) at
//    CTA start, so a read before a write shows;
//  - a cooperative launch larger than the fake device can hold fails as on a GPU
//    (cudaErrorCooperativeLaunchTooLarge); grid.sync() outside a cooperative launch is an error.
// A watchdog aborts the process, with the emulator's state, if no thread makes progress for
// BRN_CUDA_EMULATION_WATCHDOG_S seconds (default 300): a kernel looping forever cannot be stopped
// any other way.
#pragma once

#include <cstdint>
#include <string>

namespace cuda_emulation {

// Selects a fake device with this many SMs and co-resident CTAs per SM (answered to
// cudaDeviceGetAttribute / cudaOccupancyMaxActiveBlocksPerMultiprocessor). Each distinct
// configuration gets its own device id, so a kernel's per-device caches stay right.
int set_device(int sms, int ctas_per_sm);

// 0: the in-order schedule (fibers round-robin, CTAs in index order). Other values seed a random
// schedule: the next fiber and the next CTA are drawn at random at every switch, and a CTA is
// preempted at random after its barriers.
void set_schedule(uint64_t seed);

// What made the last failed launch fail (empty when it did not).
std::string last_fault();

struct Counters {
  uint64_t launches;
  uint64_t ctas;
  uint64_t threads;
  uint64_t barriers;  // __syncthreads and grid.sync completions
  uint64_t shuffles;  // warp shuffles completed
  uint64_t bytes_read;     // global memory, through batchrenorm_global_memory.cuh
  uint64_t bytes_written;
};
Counters counters();

// The deliberately broken kernels of selftest_kernels.cu, for the tests of the checks.
std::string run_selftest(const std::string& name, float* out, int n);

}  // namespace cuda_emulation
