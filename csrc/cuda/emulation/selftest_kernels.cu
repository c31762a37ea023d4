// selftest_kernels.cu: deliberately broken kernels, one per check the emulator makes, so the
// tests can see each check fire (tests/test_cuda_emulator.py). Compiled like the real kernels.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "cuda/batchrenorm_global_memory.cuh"
#include "cuda_emulation.h"

extern __shared__ __align__(16) unsigned char batchrenorm_dynamic_smem[];

namespace {

namespace cg = cooperative_groups;

__global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_barriers(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void shuffle_mask_mismatch(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, 1.0f, 1);
}

// Reads a shared slot another thread writes only after the barrier: NaN (poison) shows.
__global__ void read_before_write(float* out) {
  __shared__ float sm[64];
  const float early = sm[(threadIdx.x + 1) % 64];
  __syncthreads();
  sm[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = early + sm[threadIdx.x];
}

// A missing barrier between a write and another thread's read: the result depends on the order.
__global__ void shared_race(float* out) {
  __shared__ float sm[64];
  sm[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = sm[(threadIdx.x + 1) % 64];
}

__global__ void grid_sync_kernel(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
  cg::this_grid().sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] += 1.0f;
}

// CTA 0's thread 0 reads CTA 1's value, written before the grid barrier.
__global__ void cross_cta(float* out) {
  out[blockIdx.x] = static_cast<float>(blockIdx.x + 1);
  cg::this_grid().sync();
  if (threadIdx.x == 0 && blockIdx.x == 0) out[2] = out[1];
}

// Global traffic the emulator counts (tests/test_cuda_traffic.py; out must hold 2176 floats).
// Each of 32 threads per CTA reads in[t] and the broadcast in[0], then 64 values of its own and
// in[0] again (repeats since the last barrier count once, however many reads lie between), and
// after a barrier in[t] again; then it writes one float. Per CTA: 128 + 32 * 64 * 4 + 128 =
// 8448 bytes read, 128 written.
__global__ void count_traffic(float* out) {
  using batchrenorm::cuda::load_global;
  using batchrenorm::cuda::store_global;
  const float* in = out + 64;
  float v = load_global(in + threadIdx.x) + load_global(in);
  for (int i = 0; i < 64; ++i) v += load_global(in + 64 + threadIdx.x * 64 + i);
  v += load_global(in) + load_global(in + threadIdx.x);
  __syncthreads();
  v += load_global(in + threadIdx.x);
  store_global(out + blockIdx.x * 32 + threadIdx.x, v);
}

// Uses all the dynamic shared memory it is given.
__global__ void dynamic_shared_kernel(float* out) {
  float* sm = reinterpret_cast<float*>(batchrenorm_dynamic_smem);
  const int n = 100 * 1024 / sizeof(float);
  for (int i = threadIdx.x; i < n; i += blockDim.x) sm[i] = 1.0f;
  __syncthreads();
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += sm[i];
  out[threadIdx.x] = sum;
}

}  // namespace

namespace cuda_emulation {

// Runs the self-test `name` on a fresh output of `n` floats (poisoned with NaN); returns the
// fault ("" if the launch succeeded) and writes the output to out.
std::string run_selftest(const std::string& name, float* out, int n) {
  std::memset(out, 0xFF, sizeof(float) * n);
  void* args[] = {&out};
  cudaError_t err = cudaErrorInvalidValue;
  if (name == "exit_before_barrier") {
    err = cudaLaunchKernel(exit_before_barrier, dim3(1), dim3(64), args, 0, nullptr);
  } else if (name == "divergent_barriers") {
    err = cudaLaunchKernel(divergent_barriers, dim3(1), dim3(64), args, 0, nullptr);
  } else if (name == "shuffle_with_exited_lane") {
    err = cudaLaunchKernel(shuffle_with_exited_lane, dim3(1), dim3(32), args, 0, nullptr);
  } else if (name == "shuffle_mask_mismatch") {
    err = cudaLaunchKernel(shuffle_mask_mismatch, dim3(1), dim3(32), args, 0, nullptr);
  } else if (name == "read_before_write") {
    err = cudaLaunchKernel(read_before_write, dim3(1), dim3(64), args, 0, nullptr);
  } else if (name == "shared_race") {
    err = cudaLaunchKernel(shared_race, dim3(1), dim3(64), args, 0, nullptr);
  } else if (name == "grid_sync_not_cooperative") {
    err = cudaLaunchKernel(grid_sync_kernel, dim3(2), dim3(32), args, 0, nullptr);
  } else if (name == "grid_sync") {
    err = cudaLaunchCooperativeKernel(grid_sync_kernel, dim3(2), dim3(32), args, 0, nullptr);
  } else if (name == "cooperative_too_large") {
    err = cudaLaunchCooperativeKernel(grid_sync_kernel, dim3(1000), dim3(32), args, 0, nullptr);
  } else if (name == "cross_cta") {
    err = cudaLaunchCooperativeKernel(cross_cta, dim3(2), dim3(32), args, 0, nullptr);
  } else if (name == "count_traffic") {
    err = cudaLaunchKernel(count_traffic, dim3(2), dim3(32), args, 0, nullptr);
  } else if (name == "dynamic_shared_default") {  // 100 KiB without the opt-in attribute
    err = cudaLaunchKernel(dynamic_shared_kernel, dim3(1), dim3(32), args, 100 * 1024, nullptr);
  } else if (name == "dynamic_shared_optin") {
    err = cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               100 * 1024);
    if (err == cudaSuccess) {
      err = cudaLaunchKernel(dynamic_shared_kernel, dim3(1), dim3(32), args, 100 * 1024, nullptr);
    }
    cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         48 * 1024);
  } else {
    return "unknown self-test " + name;
  }
  return err == cudaSuccess ? "" : std::string(cudaGetErrorName(err)) + ": " + last_fault();
}

}  // namespace cuda_emulation
