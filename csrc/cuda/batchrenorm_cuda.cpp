// batchrenorm_cuda.cpp: the CUDA kernels of the `batchrenorm` ops (TORCH_LIBRARY_IMPL(CUDA)).
//
// The glue's logic (checks, layouts, argument structs, workspace) is batchrenorm_cuda_glue.h,
// shared with the CUDA emulator's test build; this file adds what only a GPU has: the device
// guard, the current stream, and C10_CUDA_CHECK of every launch. The launchers and kernels live
// in the torch-free csrc/cuda/*.cu (interface: batchrenorm_cuda.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/batchrenorm_cuda_glue.h"

namespace batchrenorm {
namespace cuda {
namespace {

struct GpuRuntime {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check(const char*, cudaError_t err) { C10_CUDA_CHECK(err); }
  static void note_plan(const char*, const LaunchPlan&) {}
  // One counter per device and stream, so concurrent launches on two streams never share one.
  // Zeroed once when first used; every launch leaves it at zero. Never freed (a static tensor
  // would be destroyed after the CUDA context at exit).
  static unsigned* ticket(const at::Tensor& like) {
    static std::mutex mutex;
    static auto* tickets = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
    const auto key = std::make_pair(static_cast<int>(like.get_device()), stream());
    std::lock_guard<std::mutex> lock(mutex);
    auto it = tickets->find(key);
    if (it == tickets->end()) {
      it = tickets->emplace(key, at::zeros({1}, like.options().dtype(at::kInt))).first;
    }
    return reinterpret_cast<unsigned*>(it->second.data_ptr<int>());
  }
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
