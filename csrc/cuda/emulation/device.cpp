// device.cpp: the fake devices of the CUDA emulator (cuda_emulation.h): their properties as
// cudaDeviceGetAttribute answers them, per-kernel attributes (cudaFuncSetAttribute /
// cudaFuncGetAttributes), and the occupancy a kernel gets on them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulator_internal.h"

namespace cuda_emulation {
namespace {

std::mutex g_device_mutex;  // guards the globals below
std::vector<DeviceProperties> g_devices;
int g_device = -1;
// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel (as on a GPU, one value per function).
std::map<const void*, int> g_max_dynamic_shared;

bool same(const DeviceProperties& a, const DeviceProperties& b) {
  return a.name == b.name && a.sms == b.sms && a.max_ctas_per_sm == b.max_ctas_per_sm &&
         a.max_threads_per_sm == b.max_threads_per_sm &&
         a.registers_per_sm == b.registers_per_sm && a.shared_per_sm == b.shared_per_sm &&
         a.shared_per_block == b.shared_per_block &&
         a.shared_per_block_optin == b.shared_per_block_optin && a.l2_bytes == b.l2_bytes &&
         a.assumed_registers_per_thread == b.assumed_registers_per_thread &&
         a.assumed_static_shared == b.assumed_static_shared;
}

void check_properties(const DeviceProperties& p) {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("cuda emulation: device properties: " + what);
  };
  need(p.sms >= 1, "sms must be >= 1, got " + std::to_string(p.sms));
  need(p.max_ctas_per_sm >= 1, "max_ctas_per_sm must be >= 1, got " +
                                   std::to_string(p.max_ctas_per_sm));
  need(p.max_threads_per_sm >= 32, "max_threads_per_sm must be >= 32, got " +
                                       std::to_string(p.max_threads_per_sm));
  need(p.registers_per_sm >= 256, "registers_per_sm must be >= 256, got " +
                                      std::to_string(p.registers_per_sm));
  need(p.shared_per_block > 0 && p.shared_per_block <= p.shared_per_block_optin,
       "shared_per_block must be in (0, shared_per_block_optin], got " +
           std::to_string(p.shared_per_block));
  need(p.shared_per_block_optin <= static_cast<int>(detail::kMaxDynamicShared),
       "shared_per_block_optin must be <= " + std::to_string(detail::kMaxDynamicShared) +
           " (the emulator's dynamic shared array), got " +
           std::to_string(p.shared_per_block_optin));
  need(p.shared_per_sm >= p.shared_per_block_optin + 1024,
       "shared_per_sm must hold one CTA of shared_per_block_optin plus its 1 KiB reserve, got " +
           std::to_string(p.shared_per_sm));
  need(p.assumed_registers_per_thread >= 1 && p.assumed_registers_per_thread <= 255,
       "assumed_registers_per_thread must be in [1, 255], got " +
           std::to_string(p.assumed_registers_per_thread));
  need(p.assumed_static_shared >= 0 && p.assumed_static_shared <= p.shared_per_block,
       "assumed_static_shared must be in [0, shared_per_block], got " +
           std::to_string(p.assumed_static_shared));
}

int round_up(int v, int unit) { return (v + unit - 1) / unit * unit; }

}  // namespace

DeviceProperties h100_properties() {
  DeviceProperties p;
  // NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5) and the CUDA C++ Programming
  // Guide's table of compute capability 9.0: 132 SMs; 64K 32-bit registers per SM; 228 KiB of
  // shared memory per SM, at most 227 KiB per CTA (opt-in); 2048 threads and 32 CTAs per SM;
  // 50 MB of L2.
  p.name = "H100 SXM5 (emulated)";
  p.sms = 132;
  p.max_ctas_per_sm = 32;
  p.max_threads_per_sm = 2048;
  p.registers_per_sm = 65536;
  p.shared_per_sm = 228 * 1024;
  p.shared_per_block = 48 * 1024;
  p.shared_per_block_optin = 227 * 1024;
  p.l2_bytes = 50 * 1024 * 1024;
  p.assumed_registers_per_thread = 128;  // __launch_bounds__(256, 2)
  p.assumed_static_shared = 16 * 1024;
  return p;
}

int set_device_properties(const DeviceProperties& props) {
  check_properties(props);
  std::lock_guard<std::mutex> lk(g_device_mutex);
  for (size_t i = 0; i < g_devices.size(); ++i) {
    if (same(g_devices[i], props)) {
      g_device = static_cast<int>(i);
      return g_device;
    }
  }
  g_devices.push_back(props);
  g_device = static_cast<int>(g_devices.size()) - 1;
  return g_device;
}

int set_device(int sms, int ctas_per_sm) {
  if (sms < 1 || ctas_per_sm < 1) {
    throw std::invalid_argument("cuda emulation: set_device: sms and ctas_per_sm must be >= 1, got " +
                                std::to_string(sms) + ", " + std::to_string(ctas_per_sm));
  }
  DeviceProperties p = h100_properties();
  p.name = "fake " + std::to_string(sms) + " SMs x " + std::to_string(ctas_per_sm) + " CTAs";
  p.sms = sms;
  p.max_ctas_per_sm = ctas_per_sm;
  return set_device_properties(p);
}

DeviceProperties device_properties() { return detail::current_device(); }

int occupancy(int block_size, size_t dynamic_shared) {
  const DeviceProperties d = detail::current_device();
  if (dynamic_shared > static_cast<size_t>(d.shared_per_block)) return 0;
  return detail::occupancy(d, block_size, dynamic_shared);
}

namespace detail {

DeviceProperties current_device(int* id) {
  std::lock_guard<std::mutex> lk(g_device_mutex);
  if (g_device < 0) {  // the default: 2 SMs x 2 CTAs
    DeviceProperties p = h100_properties();
    p.name = "fake 2 SMs x 2 CTAs";
    p.sms = 2;
    p.max_ctas_per_sm = 2;
    g_devices.push_back(p);
    g_device = 0;
  }
  if (id != nullptr) *id = g_device;
  return g_devices[g_device];
}

size_t max_dynamic_shared(const void* kernel) {
  const DeviceProperties dev = current_device();
  std::lock_guard<std::mutex> lk(g_device_mutex);
  const auto it = g_max_dynamic_shared.find(kernel);
  const int limit = it == g_max_dynamic_shared.end() ? dev.shared_per_block : it->second;
  // An attribute set on a larger device does not carry over to a smaller one.
  return static_cast<size_t>(std::min(limit, dev.shared_per_block_optin));
}

// The CUDA occupancy calculator's rules for compute capability 9.0: warps of 32 threads;
// registers allocated per warp in units of 256; shared memory per CTA in units of 128 bytes
// plus 1 KiB reserved by the driver per CTA.
int occupancy(const DeviceProperties& d, int block_size, size_t dynamic_shared) {
  if (block_size <= 0 || block_size > 1024) return 0;
  const int warps = (block_size + 31) / 32;
  int n = std::min(d.max_ctas_per_sm, d.max_threads_per_sm / (warps * 32));
  const int regs_per_warp = round_up(d.assumed_registers_per_thread * 32, 256);
  n = std::min(n, (d.registers_per_sm / regs_per_warp) / warps);
  // The assumed static shared memory cannot push a CTA past the opt-in limit: a kernel that
  // asks for (nearly) all of it has less static memory than assumed.
  const size_t smem = std::min<size_t>(dynamic_shared + d.assumed_static_shared,
                                       d.shared_per_block_optin);
  n = std::min<int>(n, d.shared_per_sm / (round_up(static_cast<int>(smem), 128) + 1024));
  return std::max(n, 0);
}

}  // namespace detail

int max_active_ctas_per_sm(const void* kernel, int block_size, size_t shared_bytes) {
  if (shared_bytes > detail::max_dynamic_shared(kernel)) return 0;
  return detail::occupancy(detail::current_device(), block_size, shared_bytes);
}

}  // namespace cuda_emulation

// The C runtime API the kernels' host code calls.
cudaError_t cudaGetDevice(int* device) {
  cuda_emulation::detail::current_device(device);
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  cuda_emulation::DeviceProperties d;
  {
    cuda_emulation::detail::current_device();  // creates the default device
    std::lock_guard<std::mutex> lk(cuda_emulation::g_device_mutex);
    if (device < 0 || device >= static_cast<int>(cuda_emulation::g_devices.size())) {
      return cudaErrorInvalidDevice;
    }
    d = cuda_emulation::g_devices[device];
  }
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.shared_per_block; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.shared_per_block_optin;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.shared_per_sm; return cudaSuccess;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxRegistersPerMultiprocessor:
    case cudaDevAttrMaxRegistersPerBlock:
      *value = d.registers_per_sm;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.max_threads_per_sm; return cudaSuccess;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = d.max_ctas_per_sm; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = d.l2_bytes; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  const cuda_emulation::DeviceProperties d = cuda_emulation::detail::current_device();
  // As on a GPU: static + dynamic must fit the opt-in limit. The static size is not visible
  // here, so only the opt-in limit itself is enforced.
  if (func == nullptr || value < 0 || value > d.shared_per_block_optin) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lk(cuda_emulation::g_device_mutex);
  cuda_emulation::g_max_dynamic_shared[func] = value;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  if (attr == nullptr || func == nullptr) return cudaErrorInvalidValue;
  const cuda_emulation::DeviceProperties d = cuda_emulation::detail::current_device();
  std::memset(attr, 0, sizeof(*attr));
  // The device's per-kernel assumptions (cuda_emulation.h): ptxas's figures are not visible.
  attr->sharedSizeBytes = static_cast<size_t>(d.assumed_static_shared);
  attr->numRegs = d.assumed_registers_per_thread;
  attr->maxThreadsPerBlock = 1024;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->maxDynamicSharedSizeBytes =
      static_cast<int>(cuda_emulation::detail::max_dynamic_shared(func));
  return cudaSuccess;
}
