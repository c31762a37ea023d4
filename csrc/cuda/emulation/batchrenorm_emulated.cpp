// batchrenorm_emulated.cpp: the CUDA glue (batchrenorm_cuda_glue.h) over the CUDA emulator, as the
// test-only op namespace `batchrenorm_emulated_cuda` on CPU tensors (same schemas as
// `batchrenorm`). It runs the real kernels' host code (planning, occupancy, workspace,
// vectorisation) and kernels, compiled by g++ into libbatchrenorm_cuda_emulation.so.
//
// Every launch runs under the in-order schedule and then again under each random schedule set
// with set_schedules(): the tensors the launch updates in place are restored first, and every
// tensor it writes (outputs, workspace) is poisoned (bytes 0xFF, NaN) before each run; all of them
// must come out bit-identical to the in-order run, else the op raises (a race, or a read of
// something no thread wrote).
#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <vector>

#include "batchrenorm_autograd.h"
#include "batchrenorm_schemas.h"
#include "cuda/batchrenorm_cuda_glue.h"
#include "cuda_emulation.h"

namespace batchrenorm {
namespace cuda {
namespace {

std::vector<uint64_t> g_random_schedules = {1, 2, 3};

struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

void poison(const at::Tensor& t) {
  if (t.defined() && t.numel() > 0) {
    at::Tensor bytes = at::from_blob(t.data_ptr(), {static_cast<int64_t>(t.nbytes())},
                                     t.options().dtype(at::kByte));
    bytes.fill_(0xFF);
  }
}

bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.nbytes() != b.nbytes()) return false;
  return std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

struct EmulatedRuntime {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  using Guard = NoGuard;
  static cudaStream_t stream() { return nullptr; }
  static LaunchPlan& last_plan() {
    static LaunchPlan plan{};
    return plan;
  }
  static void note_plan(const char*, const LaunchPlan& plan) { last_plan() = plan; }
  // The emulator runs one launch at a time: one counter serves them all.
  static at::Tensor& ticket_tensor() {
    static auto* t = new at::Tensor(at::zeros({1}, at::TensorOptions().dtype(at::kInt)));
    return *t;
  }
  static unsigned* ticket(const at::Tensor&) {
    return reinterpret_cast<unsigned*>(ticket_tensor().data_ptr<int>());
  }
  static void check(const char* op, cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, op, ": emulated CUDA call failed with ", cudaGetErrorName(err),
                ": ", cuda_emulation::last_fault());
  }
  template <class Launch>
  static void launch(const char* op, std::initializer_list<at::Tensor> mutated_list,
                     std::initializer_list<at::Tensor> written_list, Launch&& f) {
    std::vector<at::Tensor> mutated, written, before, in_order;
    for (const auto& t : mutated_list) {
      if (t.defined()) mutated.push_back(t);
    }
    for (const auto& t : written_list) {
      if (t.defined()) written.push_back(t);
    }
    for (const auto& t : mutated) before.push_back(t.clone());
    std::vector<uint64_t> schedules = {0};
    schedules.insert(schedules.end(), g_random_schedules.begin(), g_random_schedules.end());
    for (size_t run = 0; run < schedules.size(); ++run) {
      if (run > 0) {
        for (size_t i = 0; i < mutated.size(); ++i) mutated[i].copy_(before[i]);
      }
      for (const auto& t : written) poison(t);
      cuda_emulation::set_schedule(schedules[run]);
      const cudaError_t err = f();
      cuda_emulation::set_schedule(0);
      // Every launch must leave the counter at zero for the next one (batchrenorm_cuda.h).
      const int ticket = ticket_tensor().item<int>();
      ticket_tensor().zero_();
      TORCH_CHECK(err != cudaSuccess || ticket == 0, op, ": the launch left the ticket counter at ",
                  ticket, " (schedule ", schedules[run], ")");
      TORCH_CHECK(err == cudaSuccess, op, ": emulated CUDA launch failed with ",
                  cudaGetErrorName(err), " (schedule ", schedules[run], "): ",
                  cuda_emulation::last_fault());
      std::vector<at::Tensor> results;
      for (const auto& t : mutated) results.push_back(t);
      for (const auto& t : written) results.push_back(t);
      if (run == 0) {
        for (const auto& t : results) in_order.push_back(t.clone());
        continue;
      }
      for (size_t i = 0; i < results.size(); ++i) {
        TORCH_CHECK(bit_equal(results[i], in_order[i]), op, ": ",
                    i < mutated.size() ? "in-place tensor " : "output ", i,
                    " differs between the in-order schedule and random schedule ",
                    schedules[run], ": a race between CUDA threads, or a read of memory no "
                    "thread wrote");
      }
    }
  }
};

}  // namespace
}  // namespace cuda
}  // namespace batchrenorm

TORCH_LIBRARY(batchrenorm_emulated_cuda, m) { batchrenorm::define_ops(m); }
// The same C++ autograd as `batchrenorm`'s, so the emulated ops are differentiable the same way.
namespace {
constexpr char kEmulatedNamespace[] = "batchrenorm_emulated_cuda";
}  // namespace
TORCH_LIBRARY_IMPL(batchrenorm_emulated_cuda, Autograd, m) {
  batchrenorm::autograd::register_kernels<kEmulatedNamespace>(m);
}

TORCH_LIBRARY_IMPL(batchrenorm_emulated_cuda, CPU, m) {
  batchrenorm::cuda::register_kernels<batchrenorm::cuda::EmulatedRuntime>(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The batchrenorm CUDA kernels executed on the CPU by the CUDA emulator (tests only).";
  m.def("set_device", &cuda_emulation::set_device, py::arg("sms"), py::arg("ctas_per_sm"),
        "Select a fake device (SM count, co-resident CTAs per SM); returns its device id.");
  m.def(
      "set_random_schedules",
      [](std::vector<uint64_t> seeds) {
        for (uint64_t s : seeds) TORCH_CHECK(s != 0, "random schedule seeds must be nonzero");
        batchrenorm::cuda::g_random_schedules = std::move(seeds);
      },
      "Seeds of the random schedules every launch is rerun under (after the in-order one).");
  m.def("random_schedules", [] { return batchrenorm::cuda::g_random_schedules; });
  m.def("counters", [] {
    const auto c = cuda_emulation::counters();
    return py::dict(py::arg("launches") = c.launches, py::arg("ctas") = c.ctas,
                    py::arg("threads") = c.threads, py::arg("barriers") = c.barriers,
                    py::arg("shuffles") = c.shuffles);
  });
  m.def("last_fault", &cuda_emulation::last_fault);
  m.def(
      "last_plan",
      [] {
        const auto& p = batchrenorm::cuda::EmulatedRuntime::last_plan();
        static const char* regimes[] = {"resident", "persistent", "streaming"};
        return py::dict(py::arg("regime") = regimes[static_cast<int>(p.regime)],
                        py::arg("vec") = p.vec, py::arg("grid") = p.grid,
                        py::arg("team_warps") = p.team_warps, py::arg("tx") = p.tx,
                        py::arg("ty") = p.ty, py::arg("items") = p.items,
                        py::arg("length") = p.length, py::arg("splits") = p.splits,
                        py::arg("per") = p.per, py::arg("units") = p.units,
                        py::arg("shared_bytes") = p.shared_bytes,
                        py::arg("workspace_bytes") = p.workspace_bytes);
      },
      "The plan of the last reduction launched (forward_train, backward, batch_stats, "
      "backward_reduce).");
  m.def(
      "run_selftest",
      [](const std::string& name, at::Tensor out) {
        TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "float32 out");
        return cuda_emulation::run_selftest(name, out.data_ptr<float>(),
                                            static_cast<int>(out.numel()));
      },
      "Runs a deliberately broken kernel into out; returns the emulator's fault, or \"\".");
  m.def("set_schedule", &cuda_emulation::set_schedule);
}
