// batchrenorm_emulated.cpp: the CUDA glue (batchrenorm_cuda_glue.h) over the CUDA emulator, as the
// test-only op namespace `batchrenorm_emulated_cuda` on CPU tensors (same schemas as
// `batchrenorm`). It runs the real kernels' host code (planning, occupancy, workspace,
// vectorisation) and kernels, compiled by g++ into libbatchrenorm_cuda_emulation.so.
//
// Every launch runs under the in-order schedule and then again under each random schedule set
// with set_schedules(): the tensors the launch updates in place are restored first, and every
// tensor it writes (outputs, workspace) is poisoned (bytes 0xFF, NaN) before each run; all of them
// must come out bit-identical to the in-order run, else the op raises (a race, or a read of
// something no thread wrote). Every launch is logged with its op and schedule seed
// (launch_log(); seed 0 is the in-order run), with the global memory it moved.
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

// The integer properties of a fake device by name, for Python.
constexpr const char* kDeviceFields[] = {
    "sms", "max_ctas_per_sm", "max_threads_per_sm", "registers_per_sm", "shared_per_sm",
    "shared_per_block", "shared_per_block_optin", "l2_bytes", "assumed_registers_per_thread",
    "assumed_static_shared"};
constexpr const char* kDeviceFieldNames =
    "sms, max_ctas_per_sm, max_threads_per_sm, registers_per_sm, shared_per_sm, "
    "shared_per_block, shared_per_block_optin, l2_bytes, assumed_registers_per_thread, "
    "assumed_static_shared";

int* device_field(cuda_emulation::DeviceProperties& p, const std::string& key) {
  if (key == "sms") return &p.sms;
  if (key == "max_ctas_per_sm") return &p.max_ctas_per_sm;
  if (key == "max_threads_per_sm") return &p.max_threads_per_sm;
  if (key == "registers_per_sm") return &p.registers_per_sm;
  if (key == "shared_per_sm") return &p.shared_per_sm;
  if (key == "shared_per_block") return &p.shared_per_block;
  if (key == "shared_per_block_optin") return &p.shared_per_block_optin;
  if (key == "l2_bytes") return &p.l2_bytes;
  if (key == "assumed_registers_per_thread") return &p.assumed_registers_per_thread;
  if (key == "assumed_static_shared") return &p.assumed_static_shared;
  return nullptr;
}

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
      cuda_emulation::set_op(op);
      const cudaError_t err = f();
      cuda_emulation::set_op("");
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
        // Nothing to compare with when there are no random schedules (the traffic tests and
        // gpu_model run large tensors that way).
        if (schedules.size() > 1) {
          for (const auto& t : results) in_order.push_back(t.clone());
        }
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
  using batchrenorm::cuda::device_field;
  using batchrenorm::cuda::kDeviceFieldNames;
  using batchrenorm::cuda::kDeviceFields;
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
                    py::arg("shuffles") = c.shuffles, py::arg("bytes_read") = c.bytes_read,
                    py::arg("bytes_written") = c.bytes_written);
  });
  m.def(
      "launch_log",
      [] {
        py::list out;
        for (const auto& r : cuda_emulation::launch_log()) {
          out.append(py::dict(
              py::arg("kernel") = r.kernel, py::arg("op") = r.op,
              py::arg("grid") = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]),
              py::arg("block") = py::make_tuple(r.block[0], r.block[1], r.block[2]),
              py::arg("shared_bytes") = r.shared_bytes, py::arg("cooperative") = r.cooperative,
              py::arg("ok") = r.ok, py::arg("seed") = r.seed, py::arg("device") = r.device,
              py::arg("ctas") = r.ctas, py::arg("grid_syncs") = r.grid_syncs,
              py::arg("bytes_read") = r.bytes_read, py::arg("bytes_written") = r.bytes_written,
              py::arg("max_cta_bytes") = r.max_cta_bytes));
        }
        return out;
      },
      "One dict per launch since reset_launch_log() (the last 65536): kernel, op, grid, block, "
      "shared_bytes (dynamic), cooperative, ok, seed (0: the in-order schedule), device, ctas, "
      "grid_syncs, bytes_read, bytes_written (global memory), max_cta_bytes (the most bytes one "
      "CTA read and wrote).");
  m.def("reset_launch_log", &cuda_emulation::reset_launch_log);
  m.def("occupancy", &cuda_emulation::occupancy, py::arg("block_size"),
        py::arg("dynamic_shared") = 0,
        "CTAs per SM of a kernel of block_size threads and dynamic_shared bytes on the current "
        "fake device (with its assumed registers and static shared memory per kernel).");
  m.def(
      "set_device_h100", [] { return cuda_emulation::set_device_properties(cuda_emulation::h100_properties()); },
      "Select the fake H100 (cuda_emulation.h: h100_properties); returns its device id.");
  m.def(
      "set_device_properties",
      [](py::kwargs kw) {
        // Starts from the H100 and overrides what is given, by name.
        cuda_emulation::DeviceProperties p = cuda_emulation::h100_properties();
        for (const auto& item : kw) {
          const std::string key = py::str(item.first);
          if (key == "name") {
            p.name = py::cast<std::string>(item.second);
            continue;
          }
          int* field = device_field(p, key);
          TORCH_CHECK(field != nullptr, "set_device_properties: unknown property '", key,
                      "'; expected one of name, ", kDeviceFieldNames);
          *field = py::cast<int>(item.second);
        }
        try {
          return cuda_emulation::set_device_properties(p);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      "Select a fake device: the H100's properties with the given ones replaced (sms, "
      "max_ctas_per_sm, max_threads_per_sm, registers_per_sm, shared_per_sm, shared_per_block, "
      "shared_per_block_optin, l2_bytes, assumed_registers_per_thread, assumed_static_shared, "
      "name); returns its device id.");
  m.def(
      "device_properties",
      [] {
        auto p = cuda_emulation::device_properties();
        py::dict d;
        d["name"] = p.name;
        for (const char* key : kDeviceFields) d[key] = *device_field(p, key);
        return d;
      },
      "The current fake device's properties (a dict of set_device_properties' names).");
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
                        py::arg("register_items") = p.register_items,
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
