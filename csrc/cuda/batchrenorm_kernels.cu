// batchrenorm_kernels.cu: torch-free CUDA kernels of every batchrenorm op (see
// batchrenorm_cuda.h for the interface and the layouts).
//
// Single-launch reductions (forward_train, batch_stats, backward, backward_reduce) run in three
// phases inside one cooperative kernel:
//   1. "units" (a channel tile x a slice of the reduced axis) are spread over the grid; each CTA
//      reduces its unit to one partial per channel (Welford mean/M2, or sums of dy and
//      dy*(x-mean)) and stores it in the workspace. No atomics anywhere.
//   2. grid.sync(); one warp per channel merges that channel's partials in a fixed order (lane
//      l takes slices l, l+32, ..., then a fixed shuffle tree), so results are bit-identical
//      from run to run on a given GPU; lane 0 computes the channel's outputs (r, d, the buffer
//      updates, gradients) and the coefficients of the elementwise pass.
//   3. grid.sync(); every CTA revisits its units and writes y (dx) from those coefficients.
//      x is re-read, mostly from L2 (a 50 MB L2 holds the inputs of most BN layers).
// Accumulation is in float (double for double input). Statistics use Welford/Chan merges
// rather than sums of squares, so fp16 inputs near 6e4 keep finite, accurate variances; they
// are gathered on x - shift (shift = the channel's first value), so a channel with
// |mean| >> std keeps its mean beyond float precision for the normalised output, and backward
// recovers the saved mean's rounding residue from sum(x - mean).
// Indexing is int64 throughout: tensors over 2^31 elements are fine.
//
// Layouts: NCHW units are (channel, slice of the N*S values); threads read 16-byte vectors
// along S when S is a multiple of the vector width (else scalars). NHWC units are (tile of
// TX*V channels, slice of the N*S rows); threads read 16-byte vectors along C when C is a
// multiple of the vector width. Small C with large N*S gets many slices, hence many CTAs per
// channel.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "batchrenorm.h"
#include "cuda/batchrenorm_cuda.h"
#include "cuda/batchrenorm_global_memory.cuh"

// The dynamic shared memory of this file's kernels (elementwise_kernel's coefficient table),
// declared once at global scope: one untyped array that every template instantiation casts, so
// no two extern __shared__ declarations can disagree on type or alignment.
extern __shared__ __align__(16) unsigned char batchrenorm_dynamic_smem[];

namespace batchrenorm {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// At least 2 CTAs per SM: an explicit register budget (128 per thread). Without it ptxas picks
// tighter targets on sm_80 and spills a few registers.
constexpr int kMinBlocks = 2;
// Vectors loaded per thread before they are used: memory-level parallelism for the streaming
// loops (the reductions' dependency chains would otherwise serialise one load at a time).
constexpr int kUnrollStats = 4;  // one tensor (x)
constexpr int kUnrollGrad = 2;   // two tensors (dy, x)

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

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

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* base, int64_t index) {
  return load_global(reinterpret_cast<const Vec<T, V>*>(base + index));
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* base, int64_t index, const Vec<T, V>& v) {
  store_global(reinterpret_cast<Vec<T, V>*>(base + index), v);
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

enum Mode : int { kTrain = 0, kStats = 1, kBackward = 2, kReduce = 3 };

template <typename T, typename acc_t>
struct Params {
  const T* x;
  const T* dy;
  T* out;  // y (kTrain) or dx (kBackward); nullptr: no elementwise phase
  int64_t C;
  int64_t S;
  int64_t M;  // values per channel, N * S
  double inv_m;  // 1.0 / M
  int64_t splits;
  int64_t per;  // values (NCHW) or rows (NHWC) per slice
  int64_t units;
  int64_t sv;     // NCHW: vectors per (n, c) row, S / V
  double inv_sv;  // 1.0 / sv
  int tx;  // NHWC: threads across channel vectors (1 for NCHW); tx * ty == kThreads
  int ty;
  int mode;
  bool batch_stats;
  bool cumulative;
  double momentum;
  double eps;
  RenormSchedule schedule;
  const acc_t* weight;
  const acc_t* bias;
  acc_t* running_mean;
  acc_t* running_var;
  int64_t* num_batches_tracked;
  const acc_t* mean_in;
  const acc_t* invstd_in;
  const acc_t* r_in;
  const acc_t* d_in;
  acc_t* out0;  // kTrain: save_mean; kStats: mean; kBackward: grad_weight; kReduce: sum_dy
  acc_t* out1;  // kTrain: save_invstd; kStats: m2; kBackward: grad_bias; kReduce: sum_dy_xhat
  acc_t* out2;  // kTrain: r
  acc_t* out3;  // kTrain: d
  acc_t* ws;    // [3][splits][C] partials, then [4][C] coefficients
};

// units < 2^32 (C * splits, splits <= 4 * grid): a 32-bit division, inline.
template <typename T, typename acc_t>
__device__ __forceinline__ int64_t unit_group(const Params<T, acc_t>& p, int64_t unit) {
  return static_cast<uint32_t>(unit) / static_cast<uint32_t>(p.splits);
}

// The values of one unit that a thread visits, U vectors of V values at a time: first
// item = load(index) for all U (so U independent 16-byte loads are in flight per thread),
// then use(item, index) for each, in order. NCHW: all lanes are one channel; NHWC: lanes are
// channels c .. c+V-1.
template <int V, bool NHWC, int U, typename T, typename acc_t, typename Load, typename Use>
__device__ __forceinline__ void for_each_in_unit(const Params<T, acc_t>& p, int64_t unit, int tx,
                                                 int ty, Load&& load, Use&& use) {
  const int64_t group = unit_group(p, unit);
  const int64_t slice = unit - group * p.splits;
  const int64_t begin = slice * p.per;
  const int64_t end = min(begin + p.per, p.M);  // NCHW: begin, end are multiples of V
  const int64_t c = NHWC ? (group * p.tx + tx) * V : group;
  if (c >= p.C) return;
  // NHWC: j is a row; NCHW: j is a vector index within the channel's N * S values.
  const int64_t first = NHWC ? begin + ty : begin / V + ty;
  const int64_t stop = NHWC ? end : end / V;
  const int64_t step = p.ty;
  using Item = decltype(load(int64_t(0)));
  for (int64_t j0 = first; j0 < stop; j0 += U * step) {
    int64_t index[U];
    Item item[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + u * step;
      index[u] = -1;
      if (j < stop) {
        if (NHWC) {
          index[u] = j * p.C + c;
        } else {
          const int64_t n = div_floor(j, p.sv, p.inv_sv);
          index[u] = (n * p.C + c) * p.S + (j - n * p.sv) * V;
        }
        item[u] = load(index[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (index[u] >= 0) use(item[u], index[u]);
    }
  }
}

// The first value of channel c (n = 0, s = 0): every CTA can read it without a barrier, so
// the statistics are gathered on x - shift. For a channel with |mean| >> std that keeps the
// mean to far better than float precision (mean = shift + mean(x - shift), and x - shift is
// exact or nearly so), which the normalised output needs: an fp32 mean of values near 1e4 is
// off by ~5e-4, i.e. 5% of a 1e-2 standard deviation.
template <bool NHWC, typename T, typename acc_t>
__device__ __forceinline__ acc_t channel_shift(const Params<T, acc_t>& p, int64_t c) {
  return to_acc(load_global(p.x + (NHWC ? c : c * p.S)));
}

template <typename T, int V>
struct VecPair {
  Vec<T, V> dy;
  Vec<T, V> x;
};

// Number of values of one channel in slice `slice`.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t slice_count(const Params<T, acc_t>& p, int64_t slice) {
  const int64_t begin = min(slice * p.per, p.M);
  const int64_t end = min(begin + p.per, p.M);
  return static_cast<acc_t>(end - begin);
}

// ---------------------------------------------------------------------------------------------
// Statistics: forward_train (kTrain) and batch_stats (kStats).
template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    welford_kernel(const Params<T, typename AccOf<T>::type> p) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;  // per-thread results after the lane merge
  __shared__ acc_t sm_mean[kThreads * R];
  __shared__ acc_t sm_m2[kThreads * R];
  __shared__ acc_t sm_n[kThreads];

  const int tx = threadIdx.x % p.tx;
  const int ty = threadIdx.x / p.tx;
  // The step is read before the first grid barrier, and incremented only after it. The clip
  // bounds and the running-average factor (float64 divisions) are computed here, while few
  // registers are live, rather than in phase 2.
  const int64_t step = p.num_batches_tracked != nullptr ? load_global(p.num_batches_tracked) : 0;
  acc_t r_max = acc_t(1), d_max = acc_t(0), factor = acc_t(0);
  if (p.mode == kTrain) {
    double r_max_d = 1.0, d_max_d = 0.0;
    clip_bounds(p.schedule, p.num_batches_tracked != nullptr, step, &r_max_d, &d_max_d);
    r_max = static_cast<acc_t>(r_max_d);
    d_max = static_cast<acc_t>(d_max_d);
    factor = static_cast<acc_t>(running_average_factor(p.cumulative, p.momentum, step));
  }
  acc_t* part_mean = p.ws;
  acc_t* part_m2 = p.ws + p.splits * p.C;
  acc_t* coef = p.ws + 2 * p.splits * p.C;  // [shift | mean - shift | scale | bias'] x C

  // Phase 1: one Welford partial per (slice, channel).
  for (int64_t unit = blockIdx.x; unit < p.units; unit += gridDim.x) {
    acc_t mean[V], m2[V], shift[R];
    acc_t n = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) mean[k] = m2[k] = acc_t(0);
    {
      const int64_t group = unit_group(p, unit);
      const int64_t c0 = NHWC ? (group * p.tx + tx) * V : group;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        shift[k] = c0 + k < p.C ? channel_shift<NHWC>(p, c0 + k) : acc_t(0);
      }
    }
    for_each_in_unit<V, NHWC, kUnrollStats>(
        p, unit, tx, ty, [&](int64_t index) { return load_vec<T, V>(p.x, index); },
        [&](const Vec<T, V>& v, int64_t) {
      n += acc_t(1);
      const acc_t inv_n = welford_rcp(n);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xv = to_acc(v.v[k]) - shift[NHWC ? k : 0];
        const acc_t delta = xv - mean[k];
        mean[k] += delta * inv_n;
        m2[k] += delta * (xv - mean[k]);
      }
    });
    acc_t cnt = n;
    if (!NHWC) {
#pragma unroll
      for (int k = 1; k < V; ++k) chan_merge(mean[0], m2[0], cnt, mean[k], m2[k], n);
    }
    // Tree over ty (fixed order).
#pragma unroll
    for (int k = 0; k < R; ++k) {
      sm_mean[threadIdx.x * R + k] = mean[k];
      sm_m2[threadIdx.x * R + k] = m2[k];
    }
    sm_n[threadIdx.x] = cnt;
    __syncthreads();
    for (int stride = p.ty / 2; stride > 0; stride /= 2) {
      if (ty < stride) {
        const int other = threadIdx.x + stride * p.tx;
        const acc_t n_b = sm_n[other];
        acc_t n_a = cnt;
#pragma unroll
        for (int k = 0; k < R; ++k) {
          acc_t n_k = n_a;
          chan_merge(mean[k], m2[k], n_k, sm_mean[other * R + k], sm_m2[other * R + k], n_b);
          cnt = n_k;
          sm_mean[threadIdx.x * R + k] = mean[k];
          sm_m2[threadIdx.x * R + k] = m2[k];
        }
        sm_n[threadIdx.x] = cnt;
      }
      __syncthreads();
    }
    if (ty == 0) {
      const int64_t group = unit_group(p, unit);
      const int64_t slice = unit - group * p.splits;
      if (NHWC) {
        const int64_t c0 = (group * p.tx + tx) * V;
#pragma unroll
        for (int k = 0; k < R; ++k) {
          if (c0 + k < p.C) {
            store_global(part_mean + slice * p.C + c0 + k, mean[k]);
            store_global(part_m2 + slice * p.C + c0 + k, m2[k]);
          }
        }
      } else {
        store_global(part_mean + slice * p.C + group, mean[0]);
        store_global(part_m2 + slice * p.C + group, m2[0]);
      }
    }
    __syncthreads();
  }

  cg::grid_group grid = cg::this_grid();
  grid.sync();

  // Phase 2: one warp per channel.
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t c = warp; c < p.C; c += nwarps) {
    acc_t mean = 0, m2 = 0, n = 0;
    for (int64_t s = lane; s < p.splits; s += 32) {
      chan_merge(mean, m2, n, load_global_cg(part_mean + s * p.C + c),
                 load_global_cg(part_m2 + s * p.C + c), slice_count(p, s));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
      const acc_t m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
      const acc_t n_b = __shfl_down_sync(0xffffffffu, n, offset);
      chan_merge(mean, m2, n, mean_b, m2_b, n_b);
    }
    if (lane == 0) {
      // `mean` is the mean of x - shift.
      const acc_t shift = channel_shift<NHWC>(p, c);
      const acc_t mean_shifted = mean;
      mean = shift + mean_shifted;
      if (p.mode == kStats) {
        store_global(p.out0 + c, mean);
        store_global(p.out1 + c, m2);
      } else {
        const acc_t var = m2 * static_cast<acc_t>(p.inv_m);
        const bool has_running = p.running_mean != nullptr;
        const acc_t w = p.weight != nullptr ? load_global(p.weight + c) : acc_t(1);
        const acc_t b = p.bias != nullptr ? load_global(p.bias + c) : acc_t(0);
        const acc_t run_mean = has_running ? load_global(p.running_mean + c) : acc_t(0);
        const acc_t run_var = has_running ? load_global(p.running_var + c) : acc_t(1);
        ChannelCoeffs<acc_t> k = renorm_coeffs<acc_t>(
            mean, var, static_cast<acc_t>(p.eps), has_running, run_mean, run_var, r_max, d_max,
            w, b);
        if (has_running && finite_stats(mean, var)) {
          // d from the unrounded mean, (shift - running_mean) + mean(x - shift): the rounding of
          // `mean` to acc_t (1e-4 near 3000 in float) is a large part of sigma when |mean| >>
          // std, and d divides by sigma.
          const acc_t sigma = sqrt(run_var + static_cast<acc_t>(p.eps));
          k.d = clamp_to<acc_t>(((shift - run_mean) + mean_shifted) / sigma, -d_max, d_max);
        }
        store_global(p.out0 + c, mean);
        store_global(p.out1 + c, k.invstd);
        store_global(p.out2 + c, k.r);
        store_global(p.out3 + c, k.d);
        // y = ((x - shift) - mean_shifted) * scale + (b + w * d): centred on the unrounded
        // mean, so no cancellation when |mean| >> std.
        store_global(coef + c, shift);
        store_global(coef + p.C + c, mean_shifted);
        store_global(coef + 2 * p.C + c, k.scale);
        store_global(coef + 3 * p.C + c, b + w * k.d);
        if (has_running) {
          acc_t new_mean = run_mean, new_var = run_var;
          update_running<acc_t>(mean, var, p.M, factor, &new_mean, &new_var);
          store_global(p.running_mean + c, new_mean);
          store_global(p.running_var + c, new_var);
        }
      }
    }
  }
  if (p.mode == kTrain && p.running_mean != nullptr && p.num_batches_tracked != nullptr &&
      blockIdx.x == 0 && threadIdx.x == 0) {
    // Wraps at the int64 limit as the reference's add_(1) does (signed overflow is undefined).
    store_global(p.num_batches_tracked, static_cast<int64_t>(static_cast<uint64_t>(step) + 1u));
  }
  if (p.out == nullptr) return;  // uniform over the grid

  grid.sync();

  // Phase 3: y = (x - mean) * scale + shift over the same units.
  for (int64_t unit = blockIdx.x; unit < p.units; unit += gridDim.x) {
    const int64_t group = unit_group(p, unit);
    const int64_t c0 = NHWC ? (group * p.tx + tx) * V : group;
    if (c0 >= p.C) continue;
    acc_t ck[R], cm[R], cs[R], ch[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = c0 + k;
      ck[k] = load_global_cg(coef + c);
      cm[k] = load_global_cg(coef + p.C + c);
      cs[k] = load_global_cg(coef + 2 * p.C + c);
      ch[k] = load_global_cg(coef + 3 * p.C + c);
    }
    for_each_in_unit<V, NHWC, kUnrollStats>(
        p, unit, tx, ty, [&](int64_t index) { return load_vec<T, V>(p.x, index); },
        [&](const Vec<T, V>& v, int64_t index) {
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int kk = NHWC ? k : 0;
        o.v[k] = from_acc<T>(((to_acc(v.v[k]) - ck[kk]) - cm[kk]) * cs[kk] + ch[kk]);
      }
      store_vec<T, V>(p.out, index, o);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients: backward (kBackward) and backward_reduce (kReduce).
template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    grad_kernel(const Params<T, typename AccOf<T>::type> p) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;
  __shared__ acc_t sm_a[kThreads * R];
  __shared__ acc_t sm_b[kThreads * R];
  __shared__ acc_t sm_c[kThreads * R];

  const int tx = threadIdx.x % p.tx;
  const int ty = threadIdx.x / p.tx;
  acc_t* part_dy = p.ws;
  acc_t* part_dyxc = p.ws + p.splits * p.C;
  acc_t* part_xc = p.ws + 2 * p.splits * p.C;
  acc_t* coef = p.ws + 3 * p.splits * p.C;  // [mean | k | a | b] x C: dx = k*dy + (x-mean)*a + b

  // Phase 1: sum(dy), sum(dy * (x - mean)) and sum(x - mean) per (slice, channel). The last
  // recovers, with the batch's own statistics, what rounding the saved mean to float lost:
  // mean_true = mean + sum(x - mean) / M (x - mean is exact or nearly so).
  for (int64_t unit = blockIdx.x; unit < p.units; unit += gridDim.x) {
    const int64_t group = unit_group(p, unit);
    const int64_t c0 = NHWC ? (group * p.tx + tx) * V : group;
    acc_t mu[R];
#pragma unroll
    for (int k = 0; k < R; ++k) mu[k] = c0 + k < p.C ? load_global(p.mean_in + c0 + k) : acc_t(0);
    acc_t sdy[V], sdx[V], sxc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) sdy[k] = sdx[k] = sxc[k] = acc_t(0);
    for_each_in_unit<V, NHWC, kUnrollGrad>(
        p, unit, tx, ty,
        [&](int64_t index) {
          return VecPair<T, V>{load_vec<T, V>(p.dy, index), load_vec<T, V>(p.x, index)};
        },
        [&](const VecPair<T, V>& in, int64_t) {
      const Vec<T, V>& g = in.dy;
      const Vec<T, V>& v = in.x;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t gv = to_acc(g.v[k]);
        const acc_t xc = to_acc(v.v[k]) - mu[NHWC ? k : 0];
        sdy[k] += gv;
        sdx[k] += gv * xc;
        sxc[k] += xc;
      }
    });
    if (!NHWC) {
#pragma unroll
      for (int k = 1; k < V; ++k) {
        sdy[0] += sdy[k];
        sdx[0] += sdx[k];
        sxc[0] += sxc[k];
      }
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
      sm_a[threadIdx.x * R + k] = sdy[k];
      sm_b[threadIdx.x * R + k] = sdx[k];
      sm_c[threadIdx.x * R + k] = sxc[k];
    }
    __syncthreads();
    for (int stride = p.ty / 2; stride > 0; stride /= 2) {
      if (ty < stride) {
        const int other = threadIdx.x + stride * p.tx;
#pragma unroll
        for (int k = 0; k < R; ++k) {
          sdy[k] += sm_a[other * R + k];
          sdx[k] += sm_b[other * R + k];
          sxc[k] += sm_c[other * R + k];
          sm_a[threadIdx.x * R + k] = sdy[k];
          sm_b[threadIdx.x * R + k] = sdx[k];
          sm_c[threadIdx.x * R + k] = sxc[k];
        }
      }
      __syncthreads();
    }
    if (ty == 0) {
      const int64_t slice = unit - group * p.splits;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (c0 + k < p.C) {
          store_global(part_dy + slice * p.C + c0 + k, sdy[k]);
          store_global(part_dyxc + slice * p.C + c0 + k, sdx[k]);
          store_global(part_xc + slice * p.C + c0 + k, sxc[k]);
        }
      }
    }
    __syncthreads();
  }

  cg::grid_group grid = cg::this_grid();
  grid.sync();

  // Phase 2: one warp per channel, fixed summation order.
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t c = warp; c < p.C; c += nwarps) {
    acc_t sdy = 0, sdx = 0, sxc = 0;
    for (int64_t s = lane; s < p.splits; s += 32) {
      sdy += load_global_cg(part_dy + s * p.C + c);
      sdx += load_global_cg(part_dyxc + s * p.C + c);
      sxc += load_global_cg(part_xc + s * p.C + c);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sdy += __shfl_down_sync(0xffffffffu, sdy, offset);
      sdx += __shfl_down_sync(0xffffffffu, sdx, offset);
      sxc += __shfl_down_sync(0xffffffffu, sxc, offset);
    }
    if (lane == 0) {
      const acc_t invstd = load_global(p.invstd_in + c);
      const acc_t inv_m = static_cast<acc_t>(p.inv_m);
      // Only the batch's own mean has a residue to recover; backward_reduce and the eval
      // backward take the mean they are given at its word.
      const acc_t residue = p.mode == kBackward && p.batch_stats ? sxc * inv_m : acc_t(0);
      const acc_t sdxhat = (sdx - residue * sdy) * invstd;
      if (p.mode == kReduce) {
        store_global(p.out0 + c, sdy);
        store_global(p.out1 + c, sdxhat);
      } else {
        const acc_t r = p.r_in != nullptr ? load_global(p.r_in + c) : acc_t(1);
        const acc_t d = p.d_in != nullptr ? load_global(p.d_in + c) : acc_t(0);
        if (p.out0 != nullptr) store_global(p.out0 + c, r * sdxhat + d * sdy);
        if (p.out1 != nullptr) store_global(p.out1 + c, sdy);
        const acc_t w = p.weight != nullptr ? load_global(p.weight + c) : acc_t(1);
        const acc_t k = w * r * invstd;
        const acc_t mean_dy = p.batch_stats ? sdy * inv_m : acc_t(0);
        const acc_t mean_dyxhat = p.batch_stats ? sdxhat * inv_m : acc_t(0);
        // dx = k * (dy - mean_dy - xhat * mean_dyxhat), xhat = (x - mean - residue) * invstd.
        const acc_t a = -k * invstd * mean_dyxhat;
        store_global(coef + c, load_global(p.mean_in + c));
        store_global(coef + p.C + c, k);
        store_global(coef + 2 * p.C + c, a);
        store_global(coef + 3 * p.C + c, -k * mean_dy - a * residue);
      }
    }
  }
  if (p.out == nullptr) return;  // uniform over the grid

  grid.sync();

  // Phase 3: dx = k * dy + (x - mean) * a + b.
  for (int64_t unit = blockIdx.x; unit < p.units; unit += gridDim.x) {
    const int64_t group = unit_group(p, unit);
    const int64_t c0 = NHWC ? (group * p.tx + tx) * V : group;
    if (c0 >= p.C) continue;
    acc_t cm[R], ck[R], ca[R], cb[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = c0 + k;
      cm[k] = load_global_cg(coef + c);
      ck[k] = load_global_cg(coef + p.C + c);
      ca[k] = load_global_cg(coef + 2 * p.C + c);
      cb[k] = load_global_cg(coef + 3 * p.C + c);
    }
    for_each_in_unit<V, NHWC, kUnrollGrad>(
        p, unit, tx, ty,
        [&](int64_t index) {
          return VecPair<T, V>{load_vec<T, V>(p.dy, index), load_vec<T, V>(p.x, index)};
        },
        [&](const VecPair<T, V>& in, int64_t index) {
      const Vec<T, V>& g = in.dy;
      const Vec<T, V>& v = in.x;
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int kk = NHWC ? k : 0;
        o.v[k] = from_acc<T>(ck[kk] * to_acc(g.v[k]) + (to_acc(v.v[k]) - cm[kk]) * ca[kk] +
                             cb[kk]);
      }
      store_vec<T, V>(p.out, index, o);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops (forward_eval, normalize, backward_input, and backward without reductions).
template <typename T, typename acc_t>
struct ElementwiseParams {
  const T* x;
  const T* dy;
  T* out;
  int64_t C;
  int64_t S;
  int64_t nvec;  // number of V-vectors
  double inv_c;
  double inv_s;
  int mode;
  bool table;  // coefficients tabulated in shared memory (4 * C * sizeof(acc_t) bytes)
  acc_t eps;
  const acc_t* p0;
  const acc_t* p1;
  const acc_t* p2;
  const acc_t* p3;
  const acc_t* p4;
};

template <typename acc_t>
__device__ __forceinline__ acc_t ld_or(const acc_t* p, int64_t c, acc_t fallback) {
  return p != nullptr ? load_global_ro(p + c) : fallback;
}

// Per-channel coefficients of out = (x - m) * a + bb * dy + e.
template <typename T, typename acc_t>
__device__ __forceinline__ void channel_coeffs(const ElementwiseParams<T, acc_t>& p, int64_t c,
                                               acc_t& m, acc_t& a, acc_t& bb, acc_t& e) {
  switch (static_cast<ElementwiseMode>(p.mode)) {
    case ElementwiseMode::kEval: {
      const acc_t invstd = acc_t(1) / sqrt(load_global_ro(p.p1 + c) + p.eps);
      m = load_global_ro(p.p0 + c);
      a = ld_or(p.p2, c, acc_t(1)) * invstd;
      bb = acc_t(0);
      e = ld_or(p.p3, c, acc_t(0));
      break;
    }
    case ElementwiseMode::kNormalize:
      m = acc_t(0);
      a = load_global_ro(p.p0 + c);
      bb = acc_t(0);
      e = load_global_ro(p.p1 + c);
      break;
    case ElementwiseMode::kBackwardInput: {
      const acc_t scale = load_global_ro(p.p2 + c);
      m = load_global_ro(p.p0 + c);
      a = -scale * load_global_ro(p.p1 + c) * load_global_ro(p.p4 + c);
      bb = scale;
      e = -scale * load_global_ro(p.p3 + c);
      break;
    }
    default:  // kScaleGrad
      m = acc_t(0);
      a = acc_t(0);
      bb = ld_or(p.p0, c, acc_t(1)) * ld_or(p.p1, c, acc_t(1)) * load_global_ro(p.p2 + c);
      e = acc_t(0);
      break;
  }
}

// Channels whose coefficients a CTA tabulates in shared memory first (4 arrays of C values,
// 32 KiB at most), so the streaming loop does no sqrt and no gathers; wider layers compute
// them per vector.
constexpr int kTableBytes = 32 * 1024;

template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    elementwise_kernel(const ElementwiseParams<T, typename AccOf<T>::type> p) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;
  acc_t* tm = reinterpret_cast<acc_t*>(batchrenorm_dynamic_smem);
  acc_t* ta = tm + p.C;
  acc_t* tb = ta + p.C;
  acc_t* te = tb + p.C;
  if (p.table) {
    for (int64_t c = threadIdx.x; c < p.C; c += kThreads) {
      channel_coeffs(p, c, tm[c], ta[c], tb[c], te[c]);
    }
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.nvec;
       i += stride) {
    const int64_t index = i * V;
    int64_t c0;
    if (NHWC) {
      c0 = index - div_floor(index, p.C, p.inv_c) * p.C;
    } else {
      const int64_t row = div_floor(index, p.S, p.inv_s);
      c0 = row - div_floor(row, p.C, p.inv_c) * p.C;
    }
    acc_t m[R], a[R], bb[R], e[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = c0 + k;
      if (p.table) {
        m[k] = tm[c];
        a[k] = ta[c];
        bb[k] = tb[c];
        e[k] = te[c];
      } else {
        channel_coeffs(p, c, m[k], a[k], bb[k], e[k]);
      }
    }
    const bool uses_x = p.mode != static_cast<int>(ElementwiseMode::kScaleGrad);
    const bool uses_dy = p.mode == static_cast<int>(ElementwiseMode::kBackwardInput) ||
                         p.mode == static_cast<int>(ElementwiseMode::kScaleGrad);
    Vec<T, V> xv, gv, o;
    if (uses_x) xv = load_vec<T, V>(p.x, index);
    if (uses_dy) gv = load_vec<T, V>(p.dy, index);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int kk = NHWC ? k : 0;
      acc_t val = e[kk];
      if (uses_x) val += (to_acc(xv.v[k]) - m[kk]) * a[kk];
      if (uses_dy) val += bb[kk] * to_acc(gv.v[k]);
      o.v[k] = from_acc<T>(val);
    }
    store_vec<T, V>(p.out, index, o);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Whether the 16-byte vector path applies: the vectorised dimension is a multiple of V and
// every element pointer is 16-byte aligned (then so is every vector).
template <typename T>
bool can_vectorize(const Layout& L, const void* a, const void* b, const void* c) {
  constexpr int V = vec_width<T>();
  const int64_t inner = L.channels_last ? L.C : L.S;
  return inner % V == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < kThreads) p *= 2;
  return p;
}

struct Plan {
  int grid;
  int tx, ty;
  int64_t splits, per, units;
};

// Sizes the grid by occupancy (all CTAs co-resident, as a cooperative launch requires) and by
// the work (a few vectors per thread at least), then cuts the work into units.
constexpr int kMaxDevices = 64;

// Co-resident CTAs of `kernel` on the current device: SMs x occupancy. Queried once per
// (kernel, device) and cached, since every call of an op needs it (host overhead matters for
// the small layers). `cache` is one per kernel instantiation.
template <typename Kernel>
cudaError_t resident_ctas(Kernel kernel, std::atomic<int>* cache, int64_t* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return cudaSuccess;
    }
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1 || sms < 1) return cudaErrorCooperativeLaunchTooLarge;
  if (device >= 0 && device < kMaxDevices) {
    cache[device].store(per_sm * sms, std::memory_order_relaxed);
  }
  *out = static_cast<int64_t>(per_sm) * sms;
  return cudaSuccess;
}

template <int V, typename Kernel>
cudaError_t make_plan(const Layout& L, Kernel kernel, std::atomic<int>* cache, Plan* plan) {
  int64_t max_grid = 0;
  cudaError_t err = resident_ctas(kernel, cache, &max_grid);
  if (err != cudaSuccess) return err;
  const int64_t M = L.N * L.S;
  const int64_t total = M * L.C;
  const int64_t grid0 = std::max<int64_t>(1, std::min(max_grid, ceil_div(total, kThreads * V * 4)));
  if (L.channels_last) {
    const int64_t cv = L.C / V;
    plan->tx = std::min(pow2_ceil(cv), 32);
    plan->ty = kThreads / plan->tx;
    const int64_t tiles = ceil_div(cv, plan->tx);
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(M, plan->ty * 4));
    plan->splits = std::min(max_splits, std::max<int64_t>(1, grid0 / tiles));
    plan->per = ceil_div(M, plan->splits);
    plan->units = tiles * plan->splits;
  } else {
    plan->tx = 1;
    plan->ty = kThreads;
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(M, kThreads * V * 4));
    // Several units per CTA when C exceeds the grid keeps the CTAs' loads within ~25%.
    const int64_t want = L.C <= grid0 ? grid0 / L.C : ceil_div(4 * grid0, L.C);
    plan->splits = std::min(max_splits, std::max<int64_t>(1, want));
    plan->per = ceil_div(ceil_div(M, plan->splits), V) * V;
    plan->units = L.C * plan->splits;
  }
  plan->grid = static_cast<int>(std::min(grid0, plan->units));
  return cudaSuccess;
}

template <typename acc_t>
size_t workspace_size(const Plan& plan, const Layout& L) {
  // [3][splits][C] partials (the Welford kernel uses 2 of them), then [4][C] coefficients.
  return static_cast<size_t>((3 * plan.splits + 4) * L.C) * sizeof(acc_t);
}

// Plans, reports the workspace size, or launches the kernel cooperatively.
template <typename T, int V, bool NHWC, bool Welford>
cudaError_t run_cooperative(Params<T, typename AccOf<T>::type> params, const Layout& layout,
                            void* workspace, size_t* workspace_bytes, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  // Typed, not const void*: the launch and the occupancy query see the parameter types.
  void (*const kernel)(Params<T, acc_t>) =
      Welford ? welford_kernel<T, V, NHWC> : grad_kernel<T, V, NHWC>;
  static std::atomic<int> resident_cache[kMaxDevices];  // one per kernel
  Plan plan;
  cudaError_t err = make_plan<V>(layout, kernel, resident_cache, &plan);
  if (err != cudaSuccess) return err;
  const size_t need = workspace_size<acc_t>(plan, layout);
  if (workspace == nullptr) {
    *workspace_bytes = need;
    return cudaSuccess;
  }
  if (*workspace_bytes < need) return cudaErrorInvalidValue;
  params.C = layout.C;
  params.S = layout.S;
  params.M = layout.N * layout.S;
  params.inv_m = 1.0 / static_cast<double>(params.M);
  params.splits = plan.splits;
  params.per = plan.per;
  params.units = plan.units;
  params.sv = layout.S / V;
  params.inv_sv = params.sv > 0 ? 1.0 / static_cast<double>(params.sv) : 0.0;
  params.tx = plan.tx;
  params.ty = plan.ty;
  params.ws = static_cast<acc_t*>(workspace);
  void* args[] = {&params};
  return cudaLaunchCooperativeKernel(kernel, dim3(plan.grid), dim3(kThreads), args, 0, stream);
}

template <typename T, bool Welford>
cudaError_t dispatch_reduction(Params<T, typename AccOf<T>::type> params, const Layout& layout,
                               bool vectorize, void* workspace, size_t* workspace_bytes,
                               cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  if (layout.channels_last) {
    return vectorize ? run_cooperative<T, V, true, Welford>(params, layout, workspace,
                                                            workspace_bytes, stream)
                     : run_cooperative<T, 1, true, Welford>(params, layout, workspace,
                                                            workspace_bytes, stream);
  }
  return vectorize ? run_cooperative<T, V, false, Welford>(params, layout, workspace,
                                                           workspace_bytes, stream)
                   : run_cooperative<T, 1, false, Welford>(params, layout, workspace,
                                                           workspace_bytes, stream);
}

template <typename T>
cudaError_t forward_train_impl(const ForwardTrainArgs& a, void* workspace,
                               size_t* workspace_bytes) {
  using acc_t = typename AccOf<T>::type;
  Params<T, acc_t> p{};
  p.x = static_cast<const T*>(a.x);
  p.out = static_cast<T*>(a.y);
  p.mode = kTrain;
  p.cumulative = a.cumulative;
  p.momentum = a.momentum;
  p.eps = a.eps;
  p.schedule = a.schedule;
  p.weight = static_cast<const acc_t*>(a.weight);
  p.bias = static_cast<const acc_t*>(a.bias);
  p.running_mean = static_cast<acc_t*>(a.running_mean);
  p.running_var = static_cast<acc_t*>(a.running_var);
  p.num_batches_tracked = a.num_batches_tracked;
  p.out0 = static_cast<acc_t*>(a.save_mean);
  p.out1 = static_cast<acc_t*>(a.save_invstd);
  p.out2 = static_cast<acc_t*>(a.save_r);
  p.out3 = static_cast<acc_t*>(a.save_d);
  return dispatch_reduction<T, true>(p, a.layout, can_vectorize<T>(a.layout, a.x, a.y, nullptr),
                                     workspace, workspace_bytes, a.stream);
}

template <typename T>
cudaError_t batch_stats_impl(const BatchStatsArgs& a, void* workspace, size_t* workspace_bytes) {
  using acc_t = typename AccOf<T>::type;
  Params<T, acc_t> p{};
  p.x = static_cast<const T*>(a.x);
  p.out = nullptr;
  p.mode = kStats;
  p.out0 = static_cast<acc_t*>(a.mean);
  p.out1 = static_cast<acc_t*>(a.m2);
  return dispatch_reduction<T, true>(p, a.layout,
                                     can_vectorize<T>(a.layout, a.x, nullptr, nullptr), workspace,
                                     workspace_bytes, a.stream);
}

template <typename T>
cudaError_t backward_impl(const BackwardArgs& a, void* workspace, size_t* workspace_bytes) {
  using acc_t = typename AccOf<T>::type;
  Params<T, acc_t> p{};
  p.x = static_cast<const T*>(a.x);
  p.dy = static_cast<const T*>(a.dy);
  p.out = static_cast<T*>(a.dx);
  p.mode = kBackward;
  p.batch_stats = a.batch_stats;
  p.weight = static_cast<const acc_t*>(a.weight);
  p.mean_in = static_cast<const acc_t*>(a.mean);
  p.invstd_in = static_cast<const acc_t*>(a.invstd);
  p.r_in = static_cast<const acc_t*>(a.r);
  p.d_in = static_cast<const acc_t*>(a.d);
  p.out0 = static_cast<acc_t*>(a.grad_weight);
  p.out1 = static_cast<acc_t*>(a.grad_bias);
  return dispatch_reduction<T, false>(p, a.layout, can_vectorize<T>(a.layout, a.x, a.dy, a.dx),
                                      workspace, workspace_bytes, a.stream);
}

template <typename T>
cudaError_t backward_reduce_impl(const BackwardReduceArgs& a, void* workspace,
                                 size_t* workspace_bytes) {
  using acc_t = typename AccOf<T>::type;
  Params<T, acc_t> p{};
  p.x = static_cast<const T*>(a.x);
  p.dy = static_cast<const T*>(a.dy);
  p.out = nullptr;
  p.mode = kReduce;
  p.mean_in = static_cast<const acc_t*>(a.mean);
  p.invstd_in = static_cast<const acc_t*>(a.invstd);
  p.out0 = static_cast<acc_t*>(a.sum_dy);
  p.out1 = static_cast<acc_t*>(a.sum_dy_xhat);
  return dispatch_reduction<T, false>(p, a.layout, can_vectorize<T>(a.layout, a.x, a.dy, nullptr),
                                      workspace, workspace_bytes, a.stream);
}

template <typename T, int V, bool NHWC>
cudaError_t launch_elementwise(ElementwiseParams<T, typename AccOf<T>::type> p, int64_t total,
                               cudaStream_t stream) {
  p.nvec = total / V;
  if (p.nvec == 0) return cudaSuccess;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(p.nvec, kThreads), int64_t(sms) * 16));
  using acc_t = typename AccOf<T>::type;
  const size_t table_bytes = 4 * static_cast<size_t>(p.C) * sizeof(acc_t);
  p.table = table_bytes <= static_cast<size_t>(kTableBytes);
  void* args[] = {&p};
  return cudaLaunchKernel(elementwise_kernel<T, V, NHWC>, dim3(static_cast<unsigned>(blocks)),
                          dim3(kThreads), args, p.table ? table_bytes : 0, stream);
}

template <typename T>
cudaError_t elementwise_impl(const ElementwiseArgs& a) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = vec_width<T>();
  ElementwiseParams<T, acc_t> p{};
  p.x = static_cast<const T*>(a.x);
  p.dy = static_cast<const T*>(a.dy);
  p.out = static_cast<T*>(a.out);
  p.C = a.layout.C;
  p.S = a.layout.S;
  p.inv_c = 1.0 / static_cast<double>(a.layout.C);
  p.inv_s = 1.0 / static_cast<double>(a.layout.S);
  p.mode = static_cast<int>(a.mode);
  p.eps = static_cast<acc_t>(a.eps);
  p.p0 = static_cast<const acc_t*>(a.p[0]);
  p.p1 = static_cast<const acc_t*>(a.p[1]);
  p.p2 = static_cast<const acc_t*>(a.p[2]);
  p.p3 = static_cast<const acc_t*>(a.p[3]);
  p.p4 = static_cast<const acc_t*>(a.p[4]);
  const int64_t total = a.layout.N * a.layout.C * a.layout.S;
  const bool vec = can_vectorize<T>(a.layout, a.x, a.dy, a.out);
  if (a.layout.channels_last) {
    return vec ? launch_elementwise<T, V, true>(p, total, a.stream)
               : launch_elementwise<T, 1, true>(p, total, a.stream);
  }
  return vec ? launch_elementwise<T, V, false>(p, total, a.stream)
             : launch_elementwise<T, 1, false>(p, total, a.stream);
}

template <template <typename> class Impl, typename Args, typename... Rest>
cudaError_t by_dtype(const Args& a, Rest... rest) {
  switch (a.dtype) {
    case DType::kFloat32:
      return Impl<float>::run(a, rest...);
    case DType::kFloat64:
      return Impl<double>::run(a, rest...);
    case DType::kFloat16:
      return Impl<__half>::run(a, rest...);
    case DType::kBFloat16:
      return Impl<__nv_bfloat16>::run(a, rest...);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct ForwardTrainOp {
  static cudaError_t run(const ForwardTrainArgs& a, void* ws, size_t* bytes) {
    return forward_train_impl<T>(a, ws, bytes);
  }
};
template <typename T>
struct BatchStatsOp {
  static cudaError_t run(const BatchStatsArgs& a, void* ws, size_t* bytes) {
    return batch_stats_impl<T>(a, ws, bytes);
  }
};
template <typename T>
struct BackwardOp {
  static cudaError_t run(const BackwardArgs& a, void* ws, size_t* bytes) {
    return backward_impl<T>(a, ws, bytes);
  }
};
template <typename T>
struct BackwardReduceOp {
  static cudaError_t run(const BackwardReduceArgs& a, void* ws, size_t* bytes) {
    return backward_reduce_impl<T>(a, ws, bytes);
  }
};
template <typename T>
struct ElementwiseOp {
  static cudaError_t run(const ElementwiseArgs& a) { return elementwise_impl<T>(a); }
};

}  // namespace

cudaError_t forward_train(const ForwardTrainArgs& args, void* workspace, size_t* workspace_bytes) {
  return by_dtype<ForwardTrainOp>(args, workspace, workspace_bytes);
}

cudaError_t batch_stats(const BatchStatsArgs& args, void* workspace, size_t* workspace_bytes) {
  return by_dtype<BatchStatsOp>(args, workspace, workspace_bytes);
}

cudaError_t backward(const BackwardArgs& args, void* workspace, size_t* workspace_bytes) {
  return by_dtype<BackwardOp>(args, workspace, workspace_bytes);
}

cudaError_t backward_reduce(const BackwardReduceArgs& args, void* workspace,
                            size_t* workspace_bytes) {
  return by_dtype<BackwardReduceOp>(args, workspace, workspace_bytes);
}

cudaError_t elementwise(const ElementwiseArgs& args) { return by_dtype<ElementwiseOp>(args); }

}  // namespace cuda
}  // namespace batchrenorm
