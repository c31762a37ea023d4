// batchrenorm_cuda.cpp: the CUDA kernels of the `batchrenorm` ops (TORCH_LIBRARY_IMPL(CUDA)).
//
// The glue's logic (checks, layouts, argument structs, workspace) is batchrenorm_cuda_glue.h,
// shared with the CUDA emulator's test build; this file adds what only a GPU has: the device
// guard, the current stream, and C10_CUDA_CHECK of every launch. The launchers and kernels live
// in the torch-free batchrenorm_kernels.cu (interface: batchrenorm_cuda.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>

#include "cuda/batchrenorm_cuda_glue.h"

namespace batchrenorm {
namespace cuda {
namespace {

struct GpuRuntime {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check(const char*, cudaError_t err) { C10_CUDA_CHECK(err); }
  template <class Launch>
  static void launch(const char*, std::initializer_list<at::Tensor>,
                     std::initializer_list<at::Tensor>, Launch&& f) {
    C10_CUDA_CHECK(f());
  }
};

}  // namespace
}  // namespace cuda
}  // namespace batchrenorm

TORCH_LIBRARY_IMPL(batchrenorm, CUDA, m) {
  batchrenorm::cuda::register_kernels<batchrenorm::cuda::GpuRuntime>(m);
}
