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

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cuda_emulation {

// A fake device: what cudaDeviceGetAttribute and the occupancy query answer, and what a launch
// may use. Registers per thread and static shared memory per kernel are not visible to the
// emulator (the host compiler sees no ptxas output), so occupancy assumes the values below for
// every kernel; .ci/check_cuda_kernels prints ptxas's real ones for sm_90 to compare with.
struct DeviceProperties {
  std::string name;
  int sms;
  int max_ctas_per_sm;          // hardware CTA slots per SM
  int max_threads_per_sm;
  int registers_per_sm;         // 32-bit registers
  int shared_per_sm;            // bytes, including the 1 KiB reserved per resident CTA
  int shared_per_block;         // bytes a CTA may use without the opt-in attribute
  int shared_per_block_optin;   // with cudaFuncAttributeMaxDynamicSharedMemorySize
  int l2_bytes;
  int assumed_registers_per_thread;
  int assumed_static_shared;    // bytes of static __shared__ per kernel
};

// H100 SXM5 (compute capability 9.0): 132 SMs, 64K registers, 228 KiB shared memory (227 KiB
// per CTA with the opt-in), 2048 threads and 32 CTAs per SM, 50 MB L2. Assumed per kernel: 128
// registers per thread (the cap __launch_bounds__(256, 2) gives) and 16 KiB of static shared
// memory.
DeviceProperties h100_properties();

// Selects a fake device (each distinct one gets its own device id, so a kernel's per-device
// caches stay right) and returns its id.
int set_device_properties(const DeviceProperties& props);
// The small fake devices of the tests: H100 SMs, but `sms` of them with at most `ctas_per_sm`
// CTAs each (so a kernel of 256 threads gets min(ctas_per_sm, 2) per SM).
int set_device(int sms, int ctas_per_sm);
DeviceProperties device_properties();
// cudaOccupancyMaxActiveBlocksPerMultiprocessor on the current device for a kernel of
// `block_size` threads and `dynamic_shared` bytes without per-kernel attributes.
int occupancy(int block_size, size_t dynamic_shared);

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

// One record per launch (kept for the last kLaunchLogSize launches). The emulated glue reruns
// each launch under random schedules: `seed` tells the runs apart (0: the in-order one).
struct LaunchRecord {
  std::string kernel;  // e.g. "welford_kernel<float, 4, false>"
  std::string op;      // the op that launched it (set_op), or ""
  unsigned grid[3];
  unsigned block[3];
  uint64_t shared_bytes;  // dynamic
  bool cooperative;
  bool ok;  // the launch succeeded
  uint64_t seed;
  int device;
  uint64_t ctas;
  uint64_t grid_syncs;  // grid.sync() completions
  // Global memory through batchrenorm_global_memory.cuh, summed over CTAs: every write, and
  // every read except a CTA's repeat of a read (same address and size) since its last barrier
  // (a warp's lanes reading one value are one request on a GPU, and a value the CTA just read
  // comes from L1).
  uint64_t bytes_read;
  uint64_t bytes_written;
  uint64_t max_cta_bytes;  // the most bytes (read + written) one CTA moved: its serial depth
};
constexpr size_t kLaunchLogSize = 1 << 16;
std::vector<LaunchRecord> launch_log();
void reset_launch_log();
// Tags the launches that follow with an op name (the emulated glue sets it around each launch).
void set_op(const std::string& op);

// The deliberately broken kernels of selftest_kernels.cu, for the tests of the checks.
std::string run_selftest(const std::string& name, float* out, int n);

}  // namespace cuda_emulation
