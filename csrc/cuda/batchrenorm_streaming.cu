// batchrenorm_streaming.cu: the reductions for tensors that do not fit on chip (regime
// kStreaming of batchrenorm_cuda.h), and batch_stats / backward_reduce, which write no tensor.
// Three phases inside one cooperative kernel:
//   1. "units" (a channel tile x a slice of the reduced axis) are spread over the grid; each CTA
//      reduces its unit to one partial per channel (Welford mean/M2, or sums of dy and
//      dy*(x-mean)) and stores it in the workspace. No atomics anywhere.
//   2. grid.sync(); one warp per channel, over all warps of the grid, merges that channel's
//      partials in a fixed order (lane l takes slices l, l+32, ..., then a fixed shuffle tree),
//      so results are bit-identical from run to run on a given GPU; lane 0 computes the
//      channel's outputs (r, d, the buffer updates, gradients) and the coefficients of the
//      elementwise pass.
//   3. grid.sync(); every CTA revisits its units and writes y (dx) from those coefficients.
//      x is re-read, from L2 where it fits (50 MB on an H100).
// Statistics use Welford/Chan merges rather than sums of squares, so fp16 inputs near 6e4 keep
// finite, accurate variances; they are gathered on x - shift (batchrenorm_device.cuh).
// Indexing is int64 throughout: tensors over 2^31 elements are fine.
//
// Layouts: NCHW units are (channel, slice of the N*S values); threads read 16-byte vectors
// along S when S is a multiple of the vector width (else scalars). NHWC units are (tile of
// tx*vec channels, slice of the N*S rows). Small C with large N*S gets many slices, hence many
// CTAs per channel.
#include <cooperative_groups.h>

#include <type_traits>

#include "cuda/batchrenorm_device.cuh"

namespace batchrenorm {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

// Bytes each thread loads before it uses them: memory-level parallelism for the streaming loops
// (the reductions' dependency chains would otherwise serialise one load at a time). The scalar
// path (vec == 1) unrolls deeper, so it keeps as many bytes in flight as the vector path.
constexpr int kBytesInFlight = 64;

// At most 16 items: each keeps a 64-bit index live until it is used.
template <typename Item>
constexpr int unroll_of() {
  return kBytesInFlight / sizeof(Item) > 16 ? 16 : static_cast<int>(kBytesInFlight / sizeof(Item));
}

// What every thread derives from the layout and the plan once.
struct Shape {
  int64_t C, S, M;
  double inv_m;
  int64_t sv;  // NCHW: vectors per (n, c) row, S / V
  double inv_sv;
  __device__ __forceinline__ Shape(const Geometry& L, int V) {
    C = L.C;
    S = L.S;
    M = L.N * L.S;
    inv_m = 1.0 / static_cast<double>(M);
    sv = L.S / V;
    inv_sv = sv > 0 ? 1.0 / static_cast<double>(sv) : 0.0;
  }
};

// units < 2^32 (C * splits, splits <= 4 * grid): a 32-bit division, inline.
__device__ __forceinline__ int64_t unit_group(const LaunchPlan& plan, int64_t unit) {
  return static_cast<uint32_t>(unit) / static_cast<uint32_t>(plan.splits);
}

// The values of one unit that a thread visits, U items at a time: first
// item = load(index) for all U (so U independent loads are in flight per thread), then
// use(item, index) for each, in order. NCHW: all lanes are one channel; NHWC: lanes are
// channels c .. c+V-1. plan.per is in values (NCHW, a multiple of V) or rows (NHWC).
template <int V, bool NHWC, int U, typename Load, typename Use>
__device__ __forceinline__ void for_each_in_unit(const Shape& sh, const LaunchPlan& plan,
                                                 int64_t unit, int tx, int ty, Load&& load,
                                                 Use&& use) {
  const int64_t group = unit_group(plan, unit);
  const int64_t slice = unit - group * plan.splits;
  const int64_t begin = slice * plan.per;
  const int64_t end = min(begin + plan.per, sh.M);
  const int64_t c = NHWC ? (group * plan.tx + tx) * V : group;
  if (c >= sh.C) return;
  // NHWC: j is a row; NCHW: j is a vector index within the channel's N * S values.
  const int64_t first = NHWC ? begin + ty : begin / V + ty;
  const int64_t stop = NHWC ? end : end / V;
  const int64_t step = plan.ty;
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
          index[u] = j * sh.C + c;
        } else {
          const int64_t n = div_floor(j, sh.sv, sh.inv_sv);
          index[u] = (n * sh.C + c) * sh.S + (j - n * sh.sv) * V;
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

template <typename T, int V>
struct VecPair {
  Vec<T, V> dy;
  Vec<T, V> x;
};

// Number of values of one channel in slice `slice`.
template <typename acc_t>
__device__ __forceinline__ acc_t slice_count(const Shape& sh, const LaunchPlan& plan,
                                              int64_t slice) {
  const int64_t begin = min(slice * plan.per, sh.M);
  const int64_t end = min(begin + plan.per, sh.M);
  return static_cast<acc_t>(end - begin);
}

// ---------------------------------------------------------------------------------------------
// Statistics: forward_train (p.train) and batch_stats.
template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    welford_kernel(const StatsParams p, const LaunchPlan plan, void* workspace) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;  // per-thread results after the lane merge
  __shared__ acc_t sm_mean[kThreads * R];
  __shared__ acc_t sm_m2[kThreads * R];
  __shared__ acc_t sm_n[kThreads];
  __shared__ acc_t sm_shift[kThreads];

  const Shape sh(p.layout, V);
  const T* x = static_cast<const T*>(p.x);
  const int tx = threadIdx.x % plan.tx;
  const int ty = threadIdx.x / plan.tx;
  // The step is read before the first grid barrier, and advanced only after it. The clip
  // bounds and the running-average factor (float64 divisions) are computed here, while few
  // registers are live, rather than in phase 2.
  const int64_t step =
      p.train && p.num_batches_tracked != nullptr ? load_global(p.num_batches_tracked) : 0;
  const StepBounds<acc_t> bounds =
      p.train ? step_bounds<acc_t>(p, step) : StepBounds<acc_t>{acc_t(1), acc_t(0), acc_t(0)};
  acc_t* part_mean = static_cast<acc_t*>(workspace);
  acc_t* part_m2 = part_mean + plan.splits * sh.C;
  // [shift | mean - shift | scale | offset] x C
  acc_t* coef = part_mean + 2 * plan.splits * sh.C;

  // Phase 1: one Welford partial per (slice, channel).
  for (int64_t unit = blockIdx.x; unit < plan.units; unit += gridDim.x) {
    const int64_t group = unit_group(plan, unit);
    const int64_t c0 = NHWC ? (group * plan.tx + tx) * V : group;
    // One thread per channel reads its shift; the others take it from shared memory.
    if (ty == 0) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (c0 + k < sh.C) sm_shift[tx * R + k] = channel_shift(x, p.layout, c0 + k);
      }
    }
    __syncthreads();
    acc_t mean[V], m2[V], shift[R];
    acc_t n = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) mean[k] = m2[k] = acc_t(0);
#pragma unroll
    for (int k = 0; k < R; ++k) shift[k] = c0 + k < sh.C ? sm_shift[tx * R + k] : acc_t(0);
    for_each_in_unit<V, NHWC, unroll_of<Vec<T, V>>()>(
        sh, plan, unit, tx, ty, [&](int64_t index) { return load_vec<T, V>(x, index); },
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
    for (int stride = plan.ty / 2; stride > 0; stride /= 2) {
      if (ty < stride) {
        const int other = threadIdx.x + stride * plan.tx;
        const acc_t n_b = sm_n[other];
        const acc_t n_a = cnt;
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
      const int64_t slice = unit - group * plan.splits;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (c0 + k < sh.C) {
          store_global(part_mean + slice * sh.C + c0 + k, mean[k]);
          store_global(part_m2 + slice * sh.C + c0 + k, m2[k]);
        }
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
  for (int64_t c = warp; c < sh.C; c += nwarps) {
    acc_t mean = 0, m2 = 0, n = 0;
    for (int64_t s = lane; s < plan.splits; s += 32) {
      chan_merge(mean, m2, n, load_global_cg(part_mean + s * sh.C + c),
                 load_global_cg(part_m2 + s * sh.C + c), slice_count<acc_t>(sh, plan, s));
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
      const acc_t shift = channel_shift(x, p.layout, c);
      if (!p.train) {
        store_global(static_cast<acc_t*>(p.mean) + c, shift + mean);
        store_global(static_cast<acc_t*>(p.m2) + c, m2);
      } else {
        const OutputCoeffs<acc_t> k = train_channel<acc_t>(
            p, c, shift, mean, m2 * static_cast<acc_t>(sh.inv_m), sh.M, bounds,
            load_running<acc_t>(p, c), true);
        store_global(coef + c, k.shift);
        store_global(coef + sh.C + c, k.mean_shifted);
        store_global(coef + 2 * sh.C + c, k.scale);
        store_global(coef + 3 * sh.C + c, k.offset);
      }
    }
  }
  if (p.train && p.running_mean != nullptr && p.num_batches_tracked != nullptr &&
      blockIdx.x == 0 && threadIdx.x == 0) {
    advance_counter(p.num_batches_tracked, step);
  }
  if (!p.train || p.y == nullptr) return;  // uniform over the grid

  grid.sync();

  // Phase 3: y = ((x - shift) - mean_shifted) * scale + offset over the same units.
  T* y = static_cast<T*>(p.y);
  for (int64_t unit = blockIdx.x; unit < plan.units; unit += gridDim.x) {
    const int64_t group = unit_group(plan, unit);
    const int64_t c0 = NHWC ? (group * plan.tx + tx) * V : group;
    if (c0 >= sh.C) continue;
    acc_t ck[R], cm[R], cs[R], ch[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = c0 + k;
      ck[k] = load_global_cg(coef + c);
      cm[k] = load_global_cg(coef + sh.C + c);
      cs[k] = load_global_cg(coef + 2 * sh.C + c);
      ch[k] = load_global_cg(coef + 3 * sh.C + c);
    }
    for_each_in_unit<V, NHWC, unroll_of<Vec<T, V>>()>(
        sh, plan, unit, tx, ty, [&](int64_t index) { return load_vec<T, V>(x, index); },
        [&](const Vec<T, V>& v, int64_t index) {
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int kk = NHWC ? k : 0;
        o.v[k] = from_acc<T>(((to_acc(v.v[k]) - ck[kk]) - cm[kk]) * cs[kk] + ch[kk]);
      }
      store_vec<T, V>(y, index, o);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients: backward and backward_reduce (p.reduce_only).
template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    grad_kernel(const GradParams p, const LaunchPlan plan, void* workspace) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;
  __shared__ acc_t sm_a[kThreads * R];
  __shared__ acc_t sm_b[kThreads * R];
  __shared__ acc_t sm_c[kThreads * R];
  __shared__ acc_t sm_mu[kThreads];

  const Shape sh(p.layout, V);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* relu_output = static_cast<const T*>(p.relu_output);
  const acc_t* mean_in = static_cast<const acc_t*>(p.mean);
  const int tx = threadIdx.x % plan.tx;
  const int ty = threadIdx.x / plan.tx;
  acc_t* part_dy = static_cast<acc_t*>(workspace);
  acc_t* part_dyxc = part_dy + plan.splits * sh.C;
  acc_t* part_xc = part_dy + 2 * plan.splits * sh.C;
  acc_t* coef = part_dy + 3 * plan.splits * sh.C;  // [mean | k | a | b] x C

  // Phase 1: sum(dy), sum(dy * (x - mean)) and sum(x - mean) per (slice, channel)
  // (grad_channel says why the last).
  for (int64_t unit = blockIdx.x; unit < plan.units; unit += gridDim.x) {
    const int64_t group = unit_group(plan, unit);
    const int64_t c0 = NHWC ? (group * plan.tx + tx) * V : group;
    if (ty == 0) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (c0 + k < sh.C) sm_mu[tx * R + k] = load_global_ro(mean_in + c0 + k);
      }
    }
    __syncthreads();
    acc_t mu[R];
#pragma unroll
    for (int k = 0; k < R; ++k) mu[k] = c0 + k < sh.C ? sm_mu[tx * R + k] : acc_t(0);
    acc_t sdy[V], sdx[V], sxc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) sdy[k] = sdx[k] = sxc[k] = acc_t(0);
    for_each_in_unit<V, NHWC, unroll_of<VecPair<T, V>>()>(
        sh, plan, unit, tx, ty,
        [&](int64_t index) {
          return VecPair<T, V>{load_grad<T, V>(dy, relu_output, index),
                               load_vec<T, V>(x, index)};
        },
        [&](const VecPair<T, V>& in, int64_t) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t gv = to_acc(in.dy.v[k]);
        const acc_t xc = to_acc(in.x.v[k]) - mu[NHWC ? k : 0];
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
    for (int stride = plan.ty / 2; stride > 0; stride /= 2) {
      if (ty < stride) {
        const int other = threadIdx.x + stride * plan.tx;
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
      const int64_t slice = unit - group * plan.splits;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (c0 + k < sh.C) {
          store_global(part_dy + slice * sh.C + c0 + k, sdy[k]);
          store_global(part_dyxc + slice * sh.C + c0 + k, sdx[k]);
          store_global(part_xc + slice * sh.C + c0 + k, sxc[k]);
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
  for (int64_t c = warp; c < sh.C; c += nwarps) {
    acc_t sdy = 0, sdx = 0, sxc = 0;
    for (int64_t s = lane; s < plan.splits; s += 32) {
      sdy += load_global_cg(part_dy + s * sh.C + c);
      sdx += load_global_cg(part_dyxc + s * sh.C + c);
      sxc += load_global_cg(part_xc + s * sh.C + c);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sdy += __shfl_down_sync(0xffffffffu, sdy, offset);
      sdx += __shfl_down_sync(0xffffffffu, sdx, offset);
      sxc += __shfl_down_sync(0xffffffffu, sxc, offset);
    }
    if (lane == 0) {
      const GradCoeffs<acc_t> k = grad_channel<acc_t>(p, c, load_global_ro(mean_in + c), sdy,
                                                      sdx, sxc, sh.inv_m, true);
      if (!p.reduce_only && p.dx != nullptr) {
        store_global(coef + c, k.mean);
        store_global(coef + sh.C + c, k.k);
        store_global(coef + 2 * sh.C + c, k.a);
        store_global(coef + 3 * sh.C + c, k.b);
      }
    }
  }
  if (p.reduce_only || p.dx == nullptr) return;  // uniform over the grid

  grid.sync();

  // Phase 3: dx = k * dy + (x - mean) * a + b.
  T* dx = static_cast<T*>(p.dx);
  for (int64_t unit = blockIdx.x; unit < plan.units; unit += gridDim.x) {
    const int64_t group = unit_group(plan, unit);
    const int64_t c0 = NHWC ? (group * plan.tx + tx) * V : group;
    if (c0 >= sh.C) continue;
    acc_t cm[R], ck[R], ca[R], cb[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = c0 + k;
      cm[k] = load_global_cg(coef + c);
      ck[k] = load_global_cg(coef + sh.C + c);
      ca[k] = load_global_cg(coef + 2 * sh.C + c);
      cb[k] = load_global_cg(coef + 3 * sh.C + c);
    }
    for_each_in_unit<V, NHWC, unroll_of<VecPair<T, V>>()>(
        sh, plan, unit, tx, ty,
        [&](int64_t index) {
          return VecPair<T, V>{load_grad<T, V>(dy, relu_output, index),
                               load_vec<T, V>(x, index)};
        },
        [&](const VecPair<T, V>& in, int64_t index) {
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int kk = NHWC ? k : 0;
        o.v[k] = from_acc<T>(ck[kk] * to_acc(in.dy.v[k]) + (to_acc(in.x.v[k]) - cm[kk]) * ca[kk] +
                             cb[kk]);
      }
      store_vec<T, V>(dx, index, o);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T, bool Grad>
struct Kernels {
  using Params = typename std::conditional<Grad, GradParams, StatsParams>::type;
  using Fn = void (*)(Params, LaunchPlan, void*);
  template <int V, bool NHWC>
  static Fn get() {
    if constexpr (Grad) {
      return grad_kernel<T, V, NHWC>;
    } else {
      return welford_kernel<T, V, NHWC>;
    }
  }
  static Fn pick(int vec, bool nhwc) { return pick_instance<T, Kernels>(vec, nhwc); }
};

template <typename T, bool Grad, typename Params>
cudaError_t launch(const Params& p, const LaunchPlan& plan, void* workspace) {
  Params params = p;
  LaunchPlan pl = plan;
  void* args[] = {&params, &pl, &workspace};
  return cudaLaunchCooperativeKernel(Kernels<T, Grad>::pick(plan.vec, p.layout.rows),
                                     dim3(plan.grid), dim3(kThreads), args, 0, p.stream);
}

}  // namespace

template <typename T>
cudaError_t launch_streaming_stats(const StatsParams& p, const LaunchPlan& plan, void* workspace) {
  return launch<T, false>(p, plan, workspace);
}

template <typename T>
cudaError_t launch_streaming_grad(const GradParams& p, const LaunchPlan& plan, void* workspace) {
  return launch<T, true>(p, plan, workspace);
}

template <typename T>
cudaError_t streaming_occupancy(bool grad, int vec, bool nhwc, int* per_sm) {
  return grad ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                    per_sm, Kernels<T, true>::pick(vec, nhwc), kThreads, 0)
              : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                    per_sm, Kernels<T, false>::pick(vec, nhwc), kThreads, 0);
}

#define BRN_INSTANTIATE_STREAMING(T)                                                            \
  template cudaError_t launch_streaming_stats<T>(const StatsParams&, const LaunchPlan&, void*); \
  template cudaError_t launch_streaming_grad<T>(const GradParams&, const LaunchPlan&, void*);   \
  template cudaError_t streaming_occupancy<T>(bool, int, bool, int*);
BRN_INSTANTIATE_STREAMING(float)
BRN_INSTANTIATE_STREAMING(double)
BRN_INSTANTIATE_STREAMING(__half)
BRN_INSTANTIATE_STREAMING(__nv_bfloat16)
#undef BRN_INSTANTIATE_STREAMING

}  // namespace cuda
}  // namespace batchrenorm
