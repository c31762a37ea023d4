// batchrenorm_device.cuh: what every kernel file shares (torch-free): the dtype traits, 16-byte
// vectors, the exact index and Welford helpers, and the per-regime launchers that
// batchrenorm_plan.cu calls. Accumulation is in float (double for double input).
#pragma once

// cuda_runtime.h first: the emulator's (csrc/cuda/emulation/include) defines __global__ and
// __shared__ before the toolkit's headers would.
#include <cuda_runtime.h>
// clang-format off
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// clang-format on

#include <algorithm>
#include <cstdint>

#include "batchrenorm.h"
#include "cuda/batchrenorm_cuda.h"
#include "cuda/batchrenorm_global_memory.cuh"

// The dynamic shared memory of the kernels, declared once at global scope: one untyped array
// that every template instantiation casts, so no two extern __shared__ declarations can disagree
// on type or alignment.
extern __shared__ __align__(16) unsigned char batchrenorm_dynamic_smem[];

namespace batchrenorm {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// At least 2 CTAs per SM: an explicit register budget (128 per thread). Without it ptxas picks
// tighter targets on sm_80 and spills a few registers.
constexpr int kMinBlocks = 2;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Values per 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <typename T>
__device__ __forceinline__ T from_acc(double v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// The on-chip kernels' per-thread tile (batchrenorm_onchip.cu): the data a thread keeps in
// registers is 128 bytes (32 32-bit registers of the 128 the launch bounds allow; 256 bytes
// made ptxas spill), at most 32 items; items beyond that go to dynamic shared memory. An NHWC
// vector thread of 2- or 8-byte values also carries 8 (2 double) channels' statistics: 64 bytes
// there (ptxas, sm_90, spilled 24-56 bytes with 128). The planner sizes tiles with the same
// numbers.
constexpr int register_tile_bytes(int value_bytes, int vec, bool nhwc) {
  return nhwc && vec > 1 && value_bytes != 4 ? 64 : 128;
}
constexpr int register_items(int item_bytes, int tile_bytes) {
  return item_bytes * 32 <= tile_bytes ? 32 : tile_bytes / item_bytes;
}
// NHWC on-chip tiles hold at most this many channels, which sizes the static reduction buffers.
constexpr int kTileChannels = 64;

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* base, int64_t index) {
  return load_global(reinterpret_cast<const Vec<T, V>*>(base + index));
}

// dy from index, zeroed where relu_output <= 0 when relu_output is given (backward_relu), as
// aten::threshold_backward(dy, relu_output, 0) has it: a NaN in relu_output lets dy through.
// The branch is uniform across the grid.
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_grad(const T* dy, const T* relu_output, int64_t index) {
  Vec<T, V> g = load_vec<T, V>(dy, index);
  if (relu_output != nullptr) {
    using acc_t = typename AccOf<T>::type;
    const Vec<T, V> z = load_vec<T, V>(relu_output, index);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (to_acc(z.v[k]) <= acc_t(0)) g.v[k] = from_acc<T>(acc_t(0));
    }
  }
  return g;
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* base, int64_t index, const Vec<T, V>& v) {
  store_global(reinterpret_cast<Vec<T, V>*>(base + index), v);
}

// A per-channel value, or `fallback` when the tensor is absent.
template <typename acc_t>
__device__ __forceinline__ acc_t load_or(const void* p, int64_t c, acc_t fallback) {
  return p != nullptr ? load_global_ro(static_cast<const acc_t*>(p) + c) : fallback;
}

// floor(a / b) for 0 <= a < 2^50, b > 0, given inv_b = 1.0 / b from the host: an fp64 multiply
// and one correction. The 64-bit integer division is a ~70-instruction subroutine whose call
// also forces register spills; the estimate is within one of the quotient, so one fix-up is
// exact.
__device__ __forceinline__ int64_t div_floor(int64_t a, int64_t b, double inv_b) {
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * inv_b);
  const int64_t r = a - q * b;
  if (r < 0) {
    --q;
  } else if (r >= b) {
    ++q;
  }
  return q;
}

// 1 / n for the per-element Welford update. float: the fast-math reciprocal. double: a float
// estimate refined by two Newton steps (~1 ulp), because a double division carries a slow-path
// subroutine call whose register saves show up as spills inside the hot loop.
__device__ __forceinline__ float welford_rcp(float n) { return 1.0f / n; }
__device__ __forceinline__ double welford_rcp(double n) {
  double r = static_cast<double>(__frcp_rn(static_cast<float>(n)));
  r = r * (2.0 - n * r);
  r = r * (2.0 - n * r);
  return r;
}

// Chan et al.'s merge of (mean_b, m2_b, n_b) into (mean_a, m2_a, n_a). Empty sides are exact.
template <typename acc_t>
__device__ __forceinline__ void chan_merge(acc_t& mean_a, acc_t& m2_a, acc_t& n_a, acc_t mean_b,
                                           acc_t m2_b, acc_t n_b) {
  if (n_b == acc_t(0)) return;
  if (n_a == acc_t(0)) {
    mean_a = mean_b;
    m2_a = m2_b;
    n_a = n_b;
    return;
  }
  const acc_t n = n_a + n_b;
  const acc_t wb = n_b / n;
  const acc_t delta = mean_b - mean_a;
  mean_a += delta * wb;
  // delta * (delta * n_a * wb), not delta^2 first: with two values far apart (|delta| beyond
  // 1.8e19 in float) the square overflows although M2 itself is finite.
  m2_a += m2_b + delta * (delta * (n_a * wb));
  n_a = n;
}

// The first value of channel c (n = 0, s = 0): the statistics are gathered on x - shift. For a
// channel with |mean| >> std that keeps the mean to far better than float precision
// (mean = shift + mean(x - shift), and x - shift is exact or nearly so), which the normalised
// output needs: an fp32 mean of values near 1e4 is off by ~5e-4, i.e. 5% of a 1e-2 standard
// deviation.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type channel_shift(const T* x, const Geometry& L,
                                                                 int64_t c) {
  return to_acc(load_global(x + (L.rows ? c : c * L.S)));
}

// The clip bounds and the running-average factor of this step, from the device-side counter.
template <typename acc_t>
struct StepBounds {
  acc_t r_max, d_max, factor;
};

template <typename acc_t>
__device__ __forceinline__ StepBounds<acc_t> step_bounds(const StatsParams& p, int64_t step) {
  double r_max = 1.0, d_max = 0.0;
  clip_bounds(p.schedule, p.num_batches_tracked != nullptr, step, &r_max, &d_max);
  return {static_cast<acc_t>(r_max), static_cast<acc_t>(d_max),
          static_cast<acc_t>(running_average_factor(p.cumulative, p.momentum, step))};
}

// Wraps at the int64 limit as the reference's add_(1) does (signed overflow is undefined).
__device__ __forceinline__ void advance_counter(int64_t* counter, int64_t step) {
  store_global(counter, static_cast<int64_t>(static_cast<uint64_t>(step) + 1u));
}

// The training coefficients of one channel from its statistics, gathered on x - shift:
// mean = shift + mean_shifted (mean_shifted unrounded by the shift), var the biased variance.
// Writes the saved statistics and, when `update`, the running buffers; returns what the
// output pass needs: y = ((x - shift) - mean_shifted) * scale + offset, centred on the
// unrounded mean, so no cancellation when |mean| >> std.
template <typename acc_t>
struct OutputCoeffs {
  acc_t shift, mean_shifted, scale, offset;
};

// The running buffers of channel c before this step's update (0 and 1 without them). A kernel
// in which several CTAs compute one channel's coefficients reads them before its grid barrier:
// the CTA that updates them may run ahead.
template <typename acc_t>
struct Running {
  acc_t mean, var;
};

template <typename acc_t>
__device__ __forceinline__ Running<acc_t> load_running(const StatsParams& p, int64_t c) {
  if (p.running_mean == nullptr) return {acc_t(0), acc_t(1)};
  return {load_global(static_cast<const acc_t*>(p.running_mean) + c),
          load_global(static_cast<const acc_t*>(p.running_var) + c)};
}

template <typename acc_t>
__device__ __forceinline__ OutputCoeffs<acc_t> train_channel(const StatsParams& p, int64_t c,
                                                             acc_t shift, acc_t mean_shifted,
                                                             acc_t var, int64_t count,
                                                             const StepBounds<acc_t>& b,
                                                             const Running<acc_t>& running,
                                                             bool write) {
  const acc_t mean = shift + mean_shifted;
  const bool has_running = p.running_mean != nullptr;
  const acc_t w = load_or(p.weight, c, acc_t(1));
  const acc_t bias = load_or(p.bias, c, acc_t(0));
  acc_t* run_mean = static_cast<acc_t*>(p.running_mean);
  acc_t* run_var = static_cast<acc_t*>(p.running_var);
  const acc_t rm = running.mean, rv = running.var;
  // d from the unrounded mean (renorm_coeffs says why).
  const ChannelCoeffs<acc_t> k =
      renorm_coeffs<acc_t>(mean, var, static_cast<acc_t>(p.eps), has_running,
                           (shift - rm) + mean_shifted, rv, b.r_max, b.d_max, w, bias);
  if (write) {
    store_global(static_cast<acc_t*>(p.mean) + c, mean);
    store_global(static_cast<acc_t*>(p.invstd) + c, k.invstd);
    store_global(static_cast<acc_t*>(p.r) + c, k.r);
    store_global(static_cast<acc_t*>(p.d) + c, k.d);
    if (has_running && finite_stats(mean, var)) {
      acc_t new_mean = rm, new_var = rv;
      update_running<acc_t>(mean, var, count, b.factor, &new_mean, &new_var);
      store_global(run_mean + c, new_mean);
      store_global(run_var + c, new_var);
    }
  }
  return {shift, mean_shifted, k.scale, bias + w * k.d};
}

// The backward coefficients of one channel from its sums over the batch: sdy = sum(dy),
// sdyxc = sum(dy * (x - mean)), sxc = sum(x - mean), mean the saved mean. The last recovers,
// with the batch's own statistics, what rounding the saved mean to float lost:
// mean_true = mean + sum(x - mean) / M (x - mean is exact or nearly so). Writes grad_weight /
// grad_bias (or sum_dy / sum_dy_xhat) when `write`; returns dx = k*dy + (x - mean)*a + b as
// {mean, k, a, b}.
template <typename acc_t>
struct GradCoeffs {
  acc_t mean, k, a, b;
};

template <typename acc_t>
__device__ __forceinline__ GradCoeffs<acc_t> grad_channel(const GradParams& p, int64_t c,
                                                          acc_t mean, acc_t sdy, acc_t sdyxc,
                                                          acc_t sxc, double inv_m, bool write) {
  const acc_t invstd = load_global_ro(static_cast<const acc_t*>(p.invstd) + c);
  const acc_t im = static_cast<acc_t>(inv_m);
  // Only the batch's own mean has a residue to recover, and only where the channel is not well
  // centred (batchrenorm.h); backward_reduce and the eval backward take the mean they are given
  // at its word.
  const bool recover = !p.reduce_only && p.through_stats &&
                       !well_centred(static_cast<double>(mean), static_cast<double>(invstd));
  const acc_t residue = recover ? sxc * im : acc_t(0);
  const acc_t sdxhat = (sdyxc - residue * sdy) * invstd;
  if (p.reduce_only) {
    if (write) {
      store_global(static_cast<acc_t*>(p.sum_dy) + c, sdy);
      store_global(static_cast<acc_t*>(p.sum_dy_xhat) + c, sdxhat);
    }
    return {mean, acc_t(0), acc_t(0), acc_t(0)};
  }
  const acc_t r = load_or(p.r, c, acc_t(1));
  const acc_t d = load_or(p.d, c, acc_t(0));
  if (write) {
    if (p.grad_weight != nullptr) store_global(static_cast<acc_t*>(p.grad_weight) + c, r * sdxhat + d * sdy);
    if (p.grad_bias != nullptr) store_global(static_cast<acc_t*>(p.grad_bias) + c, sdy);
  }
  const acc_t w = load_or(p.weight, c, acc_t(1));
  const acc_t k = w * r * invstd;
  const acc_t mean_dy = p.through_stats ? sdy * im : acc_t(0);
  const acc_t mean_dyxhat = p.through_stats ? sdxhat * im : acc_t(0);
  // dx = k * (dy - mean_dy - xhat * mean_dyxhat), xhat = (x - mean - residue) * invstd.
  const acc_t a = -k * invstd * mean_dyxhat;
  return {mean, k, a, -k * mean_dy - a * residue};
}

// The instantiation of a kernel family (a struct whose get<V, NHWC>() returns one) for a plan's
// vector width (16 bytes' worth, or 1) and layout.
template <typename T, typename Family>
auto pick_instance(int vec, bool nhwc) -> decltype(Family::template get<1, false>()) {
  constexpr int V = vec_width<T>();
  if (nhwc) return vec == V ? Family::template get<V, true>() : Family::template get<1, true>();
  return vec == V ? Family::template get<V, false>() : Family::template get<1, false>();
}

// The per-regime launchers (batchrenorm_onchip.cu, batchrenorm_streaming.cu), explicitly
// instantiated for float, double, __half and __nv_bfloat16, and the occupancy of their kernels
// (CTAs of kThreads per SM, with `shared_bytes` of dynamic shared memory) for the planner.
template <typename T>
cudaError_t launch_onchip_stats(const StatsParams& p, const LaunchPlan& plan, void* workspace);
template <typename T>
cudaError_t launch_onchip_grad(const GradParams& p, const LaunchPlan& plan, void* workspace);
template <typename T>
cudaError_t onchip_occupancy(bool grad, int vec, bool nhwc, size_t shared_bytes, int* per_sm);
template <typename T>
cudaError_t launch_streaming_stats(const StatsParams& p, const LaunchPlan& plan, void* workspace);
template <typename T>
cudaError_t launch_streaming_grad(const GradParams& p, const LaunchPlan& plan, void* workspace);
template <typename T>
cudaError_t streaming_occupancy(bool grad, int vec, bool nhwc, int* per_sm);
template <typename T>
cudaError_t launch_elementwise_typed(const ElementwiseParams& p, bool vectorize);

}  // namespace cuda
}  // namespace batchrenorm
