// batchrenorm_plan.cu: host side of the reductions. Chooses the regime and the grid of one call
// from the shape, the dtype and the device's properties (cached per device; nothing is read
// back from the GPU), and dispatches to the regime's launcher (batchrenorm_cuda.h lists the
// regimes). Host code only; a .cu so that every build of the kernels compiles it the same way.
//
// The choice, for the small per-GPU batches our users train with, where latency and passes over
// memory dominate:
//   1. kResident when a team's share of one channel (NCHW) or a tile's rows (NHWC) fit in a
//      CTA's register and shared-memory budget, unless that leaves so few CTAs for so many bytes
//      that one SM's bandwidth would bound the launch (then 2 when it fits);
//   2. kPersistent when the tensor fits on chip across the co-resident grid;
//   3. kStreaming otherwise.
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "cuda/batchrenorm_device.cuh"

namespace batchrenorm {
namespace cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_ceil(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

// NCHW teams aim for this many items per thread: enough loads in flight to cover DRAM latency,
// few enough that small channels get a small team (a warp for 7x7 at N = 1) and more CTAs.
constexpr int64_t kTargetItems = 4;
// A resident CTA's tile above this size, with fewer CTAs than half the SMs, is split
// (kPersistent): one SM streams ~100 GB/s, so 64 KB alone costs ~0.6 us, more than the grid
// barrier that splitting it over the SMs costs.
constexpr int64_t kResidentTileBytes = 64 * 1024;
// The persistent kernels' partial reads after the barrier, at most this share of the data.
constexpr double kMergeShare = 0.02;
// Static shared memory of the on-chip kernels, at most (reduction buffers and coefficients;
// ptxas reports 3-17 KB): the rest of a CTA's shared memory holds tile items.
constexpr size_t kOnchipStaticSmem = 20 * 1024;

struct DeviceInfo {
  int sms = 0;
  int smem_per_block = 0;  // with the opt-in attribute
  int smem_per_sm = 0;
};

cudaError_t device_info(DeviceInfo* out) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(device);
    if (it != cache.end()) {
      *out = it->second;
      return cudaSuccess;
    }
  }
  DeviceInfo info;
  err = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&info.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlock, device);
  if (err != cudaSuccess) return err;
  // Devices (and fake devices) that do not report the larger opt-in limits keep the default.
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
          cudaSuccess &&
      value > info.smem_per_block) {
    info.smem_per_block = value;
  }
  info.smem_per_sm = info.smem_per_block;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) ==
          cudaSuccess &&
      value > 0) {
    info.smem_per_sm = value;
  }
  cudaGetLastError();  // the failed queries above leave nothing behind
  std::lock_guard<std::mutex> lock(mutex);
  cache[device] = info;
  *out = info;
  return cudaSuccess;
}

// Which kernel instantiation an occupancy query is about: each has its own registers.
struct KernelKey {
  int dtype;  // DType
  bool streaming, grad, nhwc;
  int vec;
  bool operator<(const KernelKey& o) const {
    return std::tie(dtype, streaming, grad, nhwc, vec) <
           std::tie(o.dtype, o.streaming, o.grad, o.nhwc, o.vec);
  }
};

template <typename T>
constexpr DType dtype_of() {
  return std::is_same<T, float>::value    ? DType::kFloat32
         : std::is_same<T, double>::value ? DType::kFloat64
         : std::is_same<T, __half>::value ? DType::kFloat16
                                          : DType::kBFloat16;
}

template <typename T>
KernelKey kernel_key(bool streaming, bool grad, int vec, bool nhwc) {
  return {static_cast<int>(dtype_of<T>()), streaming, grad, nhwc, vec};
}

// Co-resident CTAs of a kernel instantiation with `shared_bytes` of dynamic shared memory on
// the current device, cached per device.
template <typename Query>
cudaError_t resident_ctas(const KernelKey& key, size_t shared_bytes, Query&& query,
                          int64_t* out) {
  static std::mutex mutex;
  static std::map<std::tuple<int, KernelKey, size_t>, int64_t> cache;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const auto k = std::make_tuple(device, key, shared_bytes);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(k);
    if (it != cache.end()) {
      *out = it->second;
      return cudaSuccess;
    }
  }
  DeviceInfo info;
  err = device_info(&info);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = query(&per_sm);
  if (err != cudaSuccess) return err;
  *out = static_cast<int64_t>(per_sm) * info.sms;
  std::lock_guard<std::mutex> lock(mutex);
  cache[k] = *out;
  return cudaSuccess;
}

bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// The 16-byte vector path applies when the vectorised dimension is a multiple of V and every
// element pointer is 16-byte aligned (then so is every vector).
template <typename T>
int vec_for(const Geometry& L, const void* a, const void* b, const void* c,
            const void* d = nullptr) {
  constexpr int V = vec_width<T>();
  const int64_t inner = L.rows ? L.C : L.S;
  return inner % V == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d) ? V : 1;
}

// The on-chip regimes; *fits false when the tensor does not fit on chip.
template <typename T>
cudaError_t plan_onchip(const Geometry& L, int vec, bool grad, const DeviceInfo& dev,
                        LaunchPlan* plan, bool* fits) {
  *fits = false;
  const int item_bytes = static_cast<int>(sizeof(T)) * vec * (grad ? 2 : 1);
  const int64_t KR = register_items(
      item_bytes, register_tile_bytes(static_cast<int>(sizeof(T)), vec, L.rows));
  const int64_t smem_items =
      dev.smem_per_block > static_cast<int>(kOnchipStaticSmem)
          ? (dev.smem_per_block - static_cast<int64_t>(kOnchipStaticSmem)) / (kThreads * item_bytes)
          : 0;
  const int64_t cap = KR + smem_items;  // items per thread
  const auto shared_for = [&](int64_t items) {
    return static_cast<size_t>(std::max<int64_t>(0, items - KR)) * kThreads * item_bytes;
  };
  const bool nhwc = L.rows;
  const int64_t M = L.N * L.S;
  LaunchPlan base{};
  base.vec = vec;
  base.register_items = static_cast<int>(KR);
  base.length = nhwc ? M : M / vec;
  int64_t groups;
  if (nhwc) {
    const int64_t columns = L.C / vec;
    // At least a whole 32-byte sector per row, at most kTileChannels channels and 32 columns.
    const int sector_columns = std::max(1, 32 / (static_cast<int>(sizeof(T)) * vec));
    base.tx = std::min({pow2_ceil(columns, sector_columns), std::max(1, kTileChannels / vec), 32});
    base.team_warps = kWarps;
    base.ty = kThreads / base.tx;
    groups = ceil_div(columns, base.tx);
  } else {
    base.tx = 1;
    int tw = 1;
    while (tw < kWarps && ceil_div(base.length, 32 * tw) > kTargetItems) tw *= 2;
    base.team_warps = tw;
    base.ty = 32 * tw;
    groups = L.C;
  }

  LaunchPlan resident = base;
  resident.regime = Regime::kResident;
  resident.splits = 1;
  resident.per = base.length;
  const int64_t resident_items = ceil_div(base.length, base.ty);
  resident.items = static_cast<int>(std::min<int64_t>(resident_items, 1 << 30));
  resident.units = groups;
  resident.grid = static_cast<int>(ceil_div(groups, kWarps / base.team_warps));
  resident.shared_bytes = shared_for(resident_items);
  const bool resident_fits = resident_items <= cap;
  const int64_t tile_bytes = base.length * base.tx * item_bytes;
  if (resident_fits && !(resident.grid < dev.sms / 2 && tile_bytes > kResidentTileBytes)) {
    *plan = resident;
    *fits = true;
    return cudaSuccess;
  }

  // Persistent: one CTA per (group, slice), all co-resident; enough slices for the capacity and
  // to give every SM a CTA.
  LaunchPlan persistent = base;
  persistent.regime = Regime::kPersistent;
  persistent.team_warps = kWarps;
  persistent.ty = kThreads / base.tx;
  const int64_t full_items = ceil_div(base.length, persistent.ty);
  // Every CTA of a channel group reads all its slices' partials after the barrier: s slices
  // cost s^2 partial reads per group against the group's data, so s stays below the count at
  // which those reads pass kMergeShare of the data (they come from L2, but they are traffic).
  const int64_t channels = nhwc ? base.tx * vec : 1;
  const double group_bytes = static_cast<double>(base.length) * channels * sizeof(T) * (grad ? 2 : 1);
  const double partial_bytes = static_cast<double>(channels) * (grad ? 3 : 2) *
                               sizeof(typename AccOf<T>::type);
  const int64_t merge_cap = std::max<int64_t>(
      1, static_cast<int64_t>(std::sqrt(kMergeShare * group_bytes / partial_bytes)));
  // Slices: enough for the capacity, one CTA per SM if the merge allows; when that grid is not
  // co-resident (a big tile's shared memory leaves 1 CTA per SM), more and smaller slices
  // (more CTAs per SM), then fewer and bigger ones.
  const int64_t fewest = ceil_div(full_items, cap);
  const int64_t preferred = std::max(fewest, std::min(ceil_div(dev.sms, groups), merge_cap));
  int64_t candidates[16];
  int count = 0;
  for (int64_t s = preferred; count < 8 && (s == preferred || s <= merge_cap); s *= 2) {
    candidates[count++] = s;
  }
  for (int64_t s = preferred - 1; count < 16 && s >= fewest; s = std::min(s - 1, s * 3 / 4)) {
    candidates[count++] = s;
  }
  for (int i = 0; i < count; ++i) {
    const int64_t splits = std::max<int64_t>(1, std::min(candidates[i], full_items));
    persistent.per = ceil_div(base.length, splits);
    persistent.splits = ceil_div(base.length, persistent.per);
    const int64_t items = ceil_div(persistent.per, persistent.ty);
    if (items > cap) continue;
    persistent.items = static_cast<int>(items);
    persistent.units = groups * persistent.splits;
    persistent.grid = static_cast<int>(std::min<int64_t>(persistent.units, 1 << 30));
    persistent.shared_bytes = shared_for(items);
    int64_t co_resident = 0;
    const size_t shared = persistent.shared_bytes;
    const cudaError_t err = resident_ctas(
        kernel_key<T>(false, grad, vec, nhwc), shared,
        [&](int* per_sm) { return onchip_occupancy<T>(grad, vec, nhwc, shared, per_sm); },
        &co_resident);
    if (err != cudaSuccess) return err;
    if (persistent.units <= co_resident) {
      *plan = persistent;
      *fits = true;
      return cudaSuccess;
    }
  }
  if (resident_fits) {  // few, heavy CTAs still beat a second pass over memory
    *plan = resident;
    *fits = true;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t plan_streaming(const Geometry& L, int vec, bool grad, LaunchPlan* plan) {
  const bool nhwc = L.rows;
  int64_t max_grid = 0;
  cudaError_t err = resident_ctas(
      kernel_key<T>(true, grad, vec, nhwc), 0,
      [&](int* per_sm) { return streaming_occupancy<T>(grad, vec, nhwc, per_sm); }, &max_grid);
  if (err != cudaSuccess) return err;
  if (max_grid < 1) return cudaErrorCooperativeLaunchTooLarge;
  const int64_t M = L.N * L.S;
  const int64_t total = M * L.C;
  // Every co-resident CTA when there is work for them: these tensors are large.
  const int64_t grid0 = std::max<int64_t>(1, std::min(max_grid, ceil_div(total, kThreads * vec)));
  plan->regime = Regime::kStreaming;
  plan->vec = vec;
  plan->team_warps = kWarps;
  plan->items = 0;
  plan->shared_bytes = 0;
  if (nhwc) {
    const int64_t cv = L.C / vec;
    plan->tx = pow2_ceil(cv, 32);
    plan->ty = kThreads / plan->tx;
    const int64_t tiles = ceil_div(cv, plan->tx);
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(M, plan->ty * 4));
    plan->splits = std::min(max_splits, std::max<int64_t>(1, grid0 / tiles));
    plan->per = ceil_div(M, plan->splits);
    plan->units = tiles * plan->splits;
    plan->length = M;
  } else {
    plan->tx = 1;
    plan->ty = kThreads;
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(M, kThreads * vec * 4));
    // Several units per CTA when C exceeds the grid keeps the CTAs' loads within ~25%.
    const int64_t want = L.C <= grid0 ? grid0 / L.C : ceil_div(4 * grid0, L.C);
    plan->splits = std::min(max_splits, std::max<int64_t>(1, want));
    plan->per = ceil_div(ceil_div(M, plan->splits), vec) * vec;
    plan->units = L.C * plan->splits;
    plan->length = M / vec;
  }
  plan->grid = static_cast<int>(std::min(grid0, plan->units));
  return cudaSuccess;
}

template <typename acc_t>
size_t workspace_of(const LaunchPlan& plan, const Geometry& L, bool grad) {
  if (plan.regime == Regime::kResident) return 0;
  if (plan.regime == Regime::kPersistent) {
    return static_cast<size_t>((grad ? 3 : 2) * plan.splits * L.C) * sizeof(acc_t);
  }
  // [3][splits][C] partials (statistics use 2 of them), then [4][C] coefficients.
  return static_cast<size_t>((3 * plan.splits + 4) * L.C) * sizeof(acc_t);
}

// Only forward_train and backward keep their tensors on chip: batch_stats and backward_reduce
// write no tensor, so one streaming pass already reads their input once.
template <typename T>
cudaError_t plan_typed(const Geometry& L, int vec, bool grad, bool writes_tensor, LaunchPlan* plan) {
  *plan = LaunchPlan{};
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  bool fits = false;
  if (writes_tensor) {
    err = plan_onchip<T>(L, vec, grad, dev, plan, &fits);
    if (err != cudaSuccess) return err;
  }
  if (!fits) {
    err = plan_streaming<T>(L, vec, grad, plan);
    if (err != cudaSuccess) return err;
  }
  plan->workspace_bytes = workspace_of<typename AccOf<T>::type>(*plan, L, grad);
  return cudaSuccess;
}

template <typename T>
cudaError_t plan_stats_typed(const StatsParams& p, LaunchPlan* plan) {
  const int vec = vec_for<T>(p.layout, p.x, p.y, nullptr);
  return plan_typed<T>(p.layout, vec, false, p.train && p.y != nullptr, plan);
}

template <typename T>
cudaError_t plan_grad_typed(const GradParams& p, LaunchPlan* plan) {
  const int vec = vec_for<T>(p.layout, p.x, p.dy, p.dx, p.relu_output);
  // The backward plans the same with or without dx, so the output mask never changes the bits
  // of grad_weight and grad_bias.
  return plan_typed<T>(p.layout, vec, true, !p.reduce_only, plan);
}

template <typename T>
cudaError_t launch_stats_typed(const StatsParams& p, const LaunchPlan& plan, void* workspace) {
  if (plan.regime == Regime::kStreaming) return launch_streaming_stats<T>(p, plan, workspace);
  const bool counts = p.num_batches_tracked != nullptr && p.running_mean != nullptr;
  if (plan.regime == Regime::kResident && plan.grid > 1 && counts && p.ticket == nullptr) {
    return cudaErrorInvalidValue;
  }
  return launch_onchip_stats<T>(p, plan, workspace);
}

template <typename T>
cudaError_t launch_grad_typed(const GradParams& p, const LaunchPlan& plan, void* workspace) {
  if (plan.regime == Regime::kStreaming) return launch_streaming_grad<T>(p, plan, workspace);
  return launch_onchip_grad<T>(p, plan, workspace);
}

// F<T>(args...) for the dtype's T.
#define BRN_BY_DTYPE(dtype, F, ...)                   \
  switch (dtype) {                                    \
    case DType::kFloat32:                             \
      return F<float>(__VA_ARGS__);                   \
    case DType::kFloat64:                             \
      return F<double>(__VA_ARGS__);                  \
    case DType::kFloat16:                             \
      return F<__half>(__VA_ARGS__);                  \
    case DType::kBFloat16:                            \
      return F<__nv_bfloat16>(__VA_ARGS__);           \
  }                                                   \
  return cudaErrorInvalidValue;

template <typename T>
cudaError_t elementwise_typed(const ElementwiseParams& p) {
  return launch_elementwise_typed<T>(p, vec_for<T>(p.layout, p.x, p.dy, p.out, p.relu_output) > 1);
}

}  // namespace

cudaError_t plan_stats(const StatsParams& p, LaunchPlan* plan) {
  BRN_BY_DTYPE(p.dtype, plan_stats_typed, p, plan)
}

cudaError_t launch_stats(const StatsParams& p, const LaunchPlan& plan, void* workspace) {
  BRN_BY_DTYPE(p.dtype, launch_stats_typed, p, plan, workspace)
}

cudaError_t plan_grad(const GradParams& p, LaunchPlan* plan) {
  BRN_BY_DTYPE(p.dtype, plan_grad_typed, p, plan)
}

cudaError_t launch_grad(const GradParams& p, const LaunchPlan& plan, void* workspace) {
  BRN_BY_DTYPE(p.dtype, launch_grad_typed, p, plan, workspace)
}

cudaError_t elementwise(const ElementwiseParams& p) {
  BRN_BY_DTYPE(p.dtype, elementwise_typed, p)
}

#undef BRN_BY_DTYPE

}  // namespace cuda
}  // namespace batchrenorm
