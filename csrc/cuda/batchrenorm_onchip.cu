// batchrenorm_onchip.cu: forward_train and backward with the tensor kept on chip (regimes
// kResident and kPersistent of batchrenorm_cuda.h): each thread loads its items once into
// registers (then dynamic shared memory), the statistics come from those copies, and the
// output is written from them. x (and dy) are read once, y (dx) written once.
//
//   kResident   a team owns whole channels (NCHW: team_warps warps per channel, 8 / team_warps
//               channels per CTA; NHWC: the CTA owns a tile of tx * vec channels over all rows).
//               One ordinary launch, no grid barrier. The step counter is advanced by the last
//               CTA to finish (a ticket), after every CTA has read it.
//   kPersistent the channel (tile) is split into `splits` slices along the reduced axis, one
//               per CTA, in a cooperative launch: each CTA writes its slice's partial statistics,
//               one grid.sync(), then every CTA of a channel merges that channel's partials in
//               the same fixed order (so all agree bit for bit) and writes its own slice's
//               output. One barrier, where the streaming kernels need two and a second read.
//
// Statistics are two passes over the on-chip copy (the mean of x - shift, then the sum of
// squared deviations from it), exact to the rounding of the sums; partials of several CTAs are
// merged with Chan's formula. Reductions inside a team: a butterfly of shuffles (every lane gets
// the same total, bit for bit) then the team's warps in a fixed order through shared memory.
// Global accesses are made once per datum: per-channel values by one leader thread, broadcast
// through shared memory.
#include <cooperative_groups.h>

#include <type_traits>

#include "cuda/batchrenorm_device.cuh"

namespace batchrenorm {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

template <typename T, int V>
struct Pair {
  Vec<T, V> dy;
  Vec<T, V> x;
};

// ThreadPlace: where this thread sits: its team, its place along the reduced axis (ty of TY) and across
// vector columns (tx of TX, NHWC), its unit (channel group x slice).
template <bool NHWC>
struct ThreadPlace {
  int team, slot0;  // slot0: the first shared-memory slot of this thread's channels
  int tx, ty, TY;
  bool leader;  // loads and stores this thread's channels' per-channel values
  int64_t group, slice, c0;
  bool active;  // c0 is a channel of the tensor
  int64_t begin, end;  // items of this slice along the reduced axis

  __device__ __forceinline__ ThreadPlace(const Geometry& L, const LaunchPlan& plan) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t unit;
    if (NHWC) {
      team = 0;
      tx = lane % plan.tx;
      ty = warp * (32 / plan.tx) + lane / plan.tx;
      TY = kThreads / plan.tx;
      unit = blockIdx.x;
    } else {
      team = warp / plan.team_warps;
      tx = 0;
      ty = threadIdx.x - team * plan.team_warps * 32;
      TY = plan.team_warps * 32;
      unit = static_cast<int64_t>(blockIdx.x) * (kWarps / plan.team_warps) + team;
    }
    group = unit / plan.splits;
    slice = unit - group * plan.splits;
    c0 = NHWC ? (group * plan.tx + tx) * plan.vec : group;
    active = unit < plan.units && c0 < L.C;
    slot0 = NHWC ? tx * plan.vec : team;
    leader = active && ty == 0;
    begin = min(slice * plan.per, plan.length);
    end = min(begin + plan.per, plan.length);
  }

  // Item i of this thread: its position along the reduced axis, or -1.
  __device__ __forceinline__ int64_t position(int i) const {
    const int64_t a = begin + ty + static_cast<int64_t>(i) * TY;
    return active && a < end ? a : -1;
  }
};

// Element index of the item at position a (a vector of V values along S, or a row's V channels).
template <int V, bool NHWC>
__device__ __forceinline__ int64_t item_index(const Geometry& L, int64_t a, int64_t c0, int64_t sv,
                                              double inv_sv) {
  if (NHWC) return a * L.C + c0;
  const int64_t n = div_floor(a, sv, inv_sv);
  return (n * L.C + c0) * L.S + (a - n * sv) * V;
}

// Sums v[] over the threads of a team that share tx, in a fixed order; every one of them gets
// the same total. NHWC: the team is the CTA and lanes with the same tx are TX apart; NCHW: tx is
// 0 and the team is team_warps warps. sm holds kWarps x kTileChannels x 3 values.
template <bool NHWC, int R, typename acc_t>
__device__ __forceinline__ void team_sum(acc_t (&v)[R], const LaunchPlan& plan,
                                         const ThreadPlace<NHWC>& g, acc_t* sm) {
  const int TX = NHWC ? plan.tx : 1;
#pragma unroll
  for (int offset = 16; offset >= 1; offset /= 2) {
    if (offset < TX) break;
#pragma unroll
    for (int k = 0; k < R; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  const int warps = NHWC ? kWarps : plan.team_warps;
  if (warps == 1) return;  // uniform over the CTA
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous sum's readers are done with sm
  if (lane < TX) {
#pragma unroll
    for (int k = 0; k < R; ++k) sm[(warp * TX + lane) * R + k] = v[k];
  }
  __syncthreads();
  const int first = NHWC ? 0 : g.team * plan.team_warps;
#pragma unroll
  for (int k = 0; k < R; ++k) {
    acc_t total = 0;
    for (int w = 0; w < warps; ++w) total += sm[((first + w) * TX + g.tx) * R + k];
    v[k] = total;
  }
}


// The thread's items: the first register_items() in registers, the rest in dynamic shared
// memory at [i - KR][threadIdx.x] (consecutive threads, consecutive 16-byte slots).
template <typename Item, int TileBytes>
struct Tile {
  static constexpr int KR = register_items(static_cast<int>(sizeof(Item)), TileBytes);
  Item reg[KR];
  Item* spill;  // dynamic shared memory
  int items;

  __device__ __forceinline__ Item& at(int i) {
    return spill[static_cast<int64_t>(i - KR) * kThreads + threadIdx.x];
  }

  // item = load(position) for every item; the loads are issued before they are used: all the
  // register items at once, then the shared-memory ones kSpillBatch at a time (a load then a
  // store per item would keep one load per thread in flight).
  static constexpr int kSpillBatch = 4;
  template <bool NHWC, typename Load>
  __device__ __forceinline__ void load_all(const ThreadPlace<NHWC>& g, Load&& load) {
#pragma unroll
    for (int i = 0; i < KR; ++i) {
      if (i < items) {
        const int64_t a = g.position(i);
        if (a >= 0) reg[i] = load(a);
      }
    }
    for (int i0 = KR; i0 < items; i0 += kSpillBatch) {
      Item batch[kSpillBatch];
#pragma unroll
      for (int j = 0; j < kSpillBatch; ++j) {
        const int64_t a = i0 + j < items ? g.position(i0 + j) : -1;
        if (a >= 0) batch[j] = load(a);
      }
#pragma unroll
      for (int j = 0; j < kSpillBatch; ++j) {
        if (i0 + j < items && g.position(i0 + j) >= 0) at(i0 + j) = batch[j];
      }
    }
  }

  // f(i, item&) for every item i < items this thread holds at a valid position. The register
  // part is unrolled (registers cannot be indexed at run time).
  template <bool NHWC, typename F>
  __device__ __forceinline__ void for_each(const ThreadPlace<NHWC>& g, F&& f) {
#pragma unroll
    for (int i = 0; i < KR; ++i) {
      if (i < items) {
        const int64_t a = g.position(i);
        if (a >= 0) f(a, reg[i]);
      }
    }
    for (int i = KR; i < items; ++i) {
      const int64_t a = g.position(i);
      if (a >= 0) f(a, at(i));
    }
  }
};

// The last CTA to finish advances the counter: every CTA read the step (its leaders did,
// before the CTA's barriers) before it takes its ticket, and atomicInc's wrap leaves the ticket
// at zero for the next launch.
__device__ __forceinline__ void advance_counter_last(const StatsParams& p, int64_t step) {
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    advance_counter(p.num_batches_tracked, step);
    return;
  }
  __threadfence();
  if (atomicInc(p.ticket, gridDim.x - 1) == gridDim.x - 1) {
    advance_counter(p.num_batches_tracked, step);
  }
}

template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    onchip_stats_kernel(const StatsParams p, const LaunchPlan plan, void* workspace) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;  // channels per thread
  __shared__ acc_t sm_red[kWarps * kTileChannels];
  __shared__ acc_t sm_shift[kTileChannels];
  __shared__ OutputCoeffs<acc_t> sm_coef[kTileChannels];
  __shared__ Running<acc_t> sm_running[kTileChannels];

  const Geometry& L = p.layout;
  const ThreadPlace<NHWC> g(L, plan);
  const T* x = static_cast<const T*>(p.x);
  const int64_t sv = L.S / V;
  const double inv_sv = sv > 0 ? 1.0 / static_cast<double>(sv) : 0.0;

  // 1. Every load of the launch, issued before any is used.
  Tile<Vec<T, V>, register_tile_bytes(sizeof(T), V, NHWC)> tile;
  tile.spill = reinterpret_cast<Vec<T, V>*>(batchrenorm_dynamic_smem);
  tile.items = plan.items;
  tile.template load_all<NHWC>(
      g, [&](int64_t a) { return load_vec<T, V>(x, item_index<V, NHWC>(L, a, g.c0, sv, inv_sv)); });

  // 2. The leaders read the step and the running buffers (before any CTA advances or updates
  // them), and the shifts.
  const bool counts = p.num_batches_tracked != nullptr && p.running_mean != nullptr;
  int64_t step = 0;
  if (g.leader || threadIdx.x == 0) {
    if (p.num_batches_tracked != nullptr) step = load_global(p.num_batches_tracked);
  }
  if (g.leader) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (g.c0 + k < L.C) {
        sm_shift[g.slot0 + k] = channel_shift(x, L, g.c0 + k);
        sm_running[g.slot0 + k] = load_running<acc_t>(p, g.c0 + k);
      }
    }
  }
  __syncthreads();
  acc_t shift[R];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    shift[k] = g.active && g.c0 + k < L.C ? sm_shift[g.slot0 + k] : acc_t(0);
  }

  // 3. This slice's mean of x - shift; each term is scaled by 1 / count, so the sum cannot
  // overflow unless the mean does.
  const int64_t count = (g.end - g.begin) * (NHWC ? 1 : V);
  const acc_t inv_count = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
  acc_t mean[R];
#pragma unroll
  for (int k = 0; k < R; ++k) mean[k] = acc_t(0);
  tile.template for_each<NHWC>(g, [&](int64_t, const Vec<T, V>& item) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mean[NHWC ? k : 0] += (to_acc(item.v[k]) - shift[NHWC ? k : 0]) * inv_count;
    }
  });
  team_sum<NHWC>(mean, plan, g, sm_red);

  // 4. Its sum of squared deviations from that mean.
  acc_t m2[R];
#pragma unroll
  for (int k = 0; k < R; ++k) m2[k] = acc_t(0);
  tile.template for_each<NHWC>(g, [&](int64_t, const Vec<T, V>& item) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t dev = (to_acc(item.v[k]) - shift[NHWC ? k : 0]) - mean[NHWC ? k : 0];
      m2[NHWC ? k : 0] += dev * dev;
    }
  });
  team_sum<NHWC>(m2, plan, g, sm_red);

  // 5. Persistent: every slice's partials, one grid barrier, then each CTA merges its channels'
  // partials in slice order (all CTAs of a channel get the same bits).
  acc_t* part_mean = static_cast<acc_t*>(workspace);
  acc_t* part_m2 = part_mean + plan.splits * L.C;
  if (plan.splits > 1) {
    if (g.leader) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (g.c0 + k < L.C) {
          store_global(part_mean + g.slice * L.C + g.c0 + k, mean[k]);
          store_global(part_m2 + g.slice * L.C + g.c0 + k, m2[k]);
        }
      }
    }
    cg::this_grid().sync();
  }

  // 6. The leaders: the channel's statistics, coefficients, saved values and buffer update.
  if (g.leader) {
    const StepBounds<acc_t> bounds = step_bounds<acc_t>(p, step);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = g.c0 + k;
      if (c >= L.C) continue;
      acc_t mu = mean[k], sq = m2[k];
      if (plan.splits > 1) {
        acc_t n = 0;
        mu = sq = acc_t(0);
        for (int64_t s = 0; s < plan.splits; ++s) {
          const int64_t b = min(s * plan.per, plan.length);
          const int64_t e = min(b + plan.per, plan.length);
          chan_merge(mu, sq, n, load_global_cg(part_mean + s * L.C + c),
                     load_global_cg(part_m2 + s * L.C + c),
                     static_cast<acc_t>((e - b) * (NHWC ? 1 : V)));
        }
      }
      const int64_t total = L.N * L.S;
      sm_coef[g.slot0 + k] = train_channel<acc_t>(
          p, c, shift[k], mu, sq * static_cast<acc_t>(1.0 / static_cast<double>(total)), total,
          bounds, sm_running[g.slot0 + k], g.slice == 0);
    }
  }
  __syncthreads();

  // 7. The output, from the on-chip copy.
  if (g.active) {
    // The coefficients stay in shared memory (a broadcast read per item): in registers, the
    // eight channels of an NHWC half thread made ptxas spill.
    const OutputCoeffs<acc_t>* co = sm_coef + g.slot0;
    T* y = static_cast<T*>(p.y);
    tile.template for_each<NHWC>(g, [&](int64_t a, const Vec<T, V>& item) {
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const OutputCoeffs<acc_t> q = co[NHWC ? k : 0];
        o.v[k] = from_acc<T>(((to_acc(item.v[k]) - q.shift) - q.mean_shifted) * q.scale + q.offset);
      }
      store_vec<T, V>(y, item_index<V, NHWC>(L, a, g.c0, sv, inv_sv), o);
    });
  }
  if (counts) {
    if (plan.splits > 1) {
      // Every CTA read the step before the grid barrier.
      if (blockIdx.x == 0 && threadIdx.x == 0) advance_counter(p.num_batches_tracked, step);
    } else {
      advance_counter_last(p, step);
    }
  }
}

template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    onchip_grad_kernel(const GradParams p, const LaunchPlan plan, void* workspace) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;
  __shared__ acc_t sm_red[kWarps * kTileChannels * 3];
  __shared__ acc_t sm_mean[kTileChannels];
  __shared__ GradCoeffs<acc_t> sm_coef[kTileChannels];

  const Geometry& L = p.layout;
  const ThreadPlace<NHWC> g(L, plan);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* relu_output = static_cast<const T*>(p.relu_output);
  const int64_t sv = L.S / V;
  const double inv_sv = sv > 0 ? 1.0 / static_cast<double>(sv) : 0.0;

  Tile<Pair<T, V>, register_tile_bytes(sizeof(T), V, NHWC)> tile;
  tile.spill = reinterpret_cast<Pair<T, V>*>(batchrenorm_dynamic_smem);
  tile.items = plan.items;
  tile.template load_all<NHWC>(g, [&](int64_t a) {
    const int64_t index = item_index<V, NHWC>(L, a, g.c0, sv, inv_sv);
    return Pair<T, V>{load_grad<T, V>(dy, relu_output, index), load_vec<T, V>(x, index)};
  });
  if (g.leader) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (g.c0 + k < L.C) {
        sm_mean[g.slot0 + k] = load_global_ro(static_cast<const acc_t*>(p.mean) + g.c0 + k);
      }
    }
  }
  __syncthreads();
  acc_t mu[R];
#pragma unroll
  for (int k = 0; k < R; ++k) mu[k] = g.active && g.c0 + k < L.C ? sm_mean[g.slot0 + k] : acc_t(0);

  // sum(dy), sum(dy * (x - mean)), sum(x - mean): [0, R), [R, 2R), [2R, 3R).
  acc_t sums[3 * R];
#pragma unroll
  for (int k = 0; k < 3 * R; ++k) sums[k] = acc_t(0);
  tile.template for_each<NHWC>(g, [&](int64_t, const Pair<T, V>& item) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int kk = NHWC ? k : 0;
      const acc_t gv = to_acc(item.dy.v[k]);
      const acc_t xc = to_acc(item.x.v[k]) - mu[kk];
      sums[kk] += gv;
      sums[R + kk] += gv * xc;
      sums[2 * R + kk] += xc;
    }
  });
  team_sum<NHWC>(sums, plan, g, sm_red);

  acc_t* part = static_cast<acc_t*>(workspace);  // [3][splits][C]
  if (plan.splits > 1) {
    if (g.leader) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (g.c0 + k < L.C) {
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            store_global(part + (j * plan.splits + g.slice) * L.C + g.c0 + k, sums[j * R + k]);
          }
        }
      }
    }
    cg::this_grid().sync();
  }

  if (g.leader) {
    const double inv_m = 1.0 / static_cast<double>(L.N * L.S);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t c = g.c0 + k;
      if (c >= L.C) continue;
      acc_t total[3] = {sums[k], sums[R + k], sums[2 * R + k]};
      if (plan.splits > 1) {
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          total[j] = acc_t(0);
          for (int64_t s = 0; s < plan.splits; ++s) {
            total[j] += load_global_cg(part + (j * plan.splits + s) * L.C + c);
          }
        }
      }
      sm_coef[g.slot0 + k] =
          grad_channel<acc_t>(p, c, mu[k], total[0], total[1], total[2], inv_m, g.slice == 0);
    }
  }
  __syncthreads();

  if (g.active && p.dx != nullptr) {
    const GradCoeffs<acc_t>* co = sm_coef + g.slot0;  // in shared memory, as in the forward
    T* dx = static_cast<T*>(p.dx);
    tile.template for_each<NHWC>(g, [&](int64_t a, const Pair<T, V>& item) {
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const GradCoeffs<acc_t> q = co[NHWC ? k : 0];
        o.v[k] = from_acc<T>(q.k * to_acc(item.dy.v[k]) + (to_acc(item.x.v[k]) - q.mean) * q.a +
                             q.b);
      }
      store_vec<T, V>(dx, item_index<V, NHWC>(L, a, g.c0, sv, inv_sv), o);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename Kernel>
cudaError_t launch(Kernel kernel, const LaunchPlan& plan, void* args[], cudaStream_t stream) {
  if (plan.shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.shared_bytes));
    if (err != cudaSuccess) return err;
  }
  if (plan.regime == Regime::kPersistent) {
    return cudaLaunchCooperativeKernel(kernel, dim3(plan.grid), dim3(kThreads), args,
                                       plan.shared_bytes, stream);
  }
  return cudaLaunchKernel(kernel, dim3(plan.grid), dim3(kThreads), args, plan.shared_bytes,
                          stream);
}

template <typename T, bool Grad>
struct Kernels {
  using Params = typename std::conditional<Grad, GradParams, StatsParams>::type;
  using Fn = void (*)(Params, LaunchPlan, void*);
  template <int V, bool NHWC>
  static Fn get() {
    if constexpr (Grad) {
      return onchip_grad_kernel<T, V, NHWC>;
    } else {
      return onchip_stats_kernel<T, V, NHWC>;
    }
  }
  static Fn pick(int vec, bool nhwc) { return pick_instance<T, Kernels>(vec, nhwc); }
};

template <typename T, bool Grad, typename Params>
cudaError_t launch_params(const Params& p, const LaunchPlan& plan, void* workspace) {
  Params params = p;
  LaunchPlan pl = plan;
  void* args[] = {&params, &pl, &workspace};
  return launch(Kernels<T, Grad>::pick(plan.vec, p.layout.rows), plan, args, p.stream);
}

// Kernels above the default 48 KiB of dynamic shared memory must opt in first, also for the
// occupancy query.
template <typename Kernel>
cudaError_t occupancy_of(Kernel kernel, size_t shared_bytes, int* per_sm) {
  if (shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, kThreads, shared_bytes);
}

}  // namespace

template <typename T>
cudaError_t launch_onchip_stats(const StatsParams& p, const LaunchPlan& plan, void* workspace) {
  return launch_params<T, false>(p, plan, workspace);
}

template <typename T>
cudaError_t launch_onchip_grad(const GradParams& p, const LaunchPlan& plan, void* workspace) {
  return launch_params<T, true>(p, plan, workspace);
}

template <typename T>
cudaError_t onchip_occupancy(bool grad, int vec, bool nhwc, size_t shared_bytes, int* per_sm) {
  return grad ? occupancy_of(Kernels<T, true>::pick(vec, nhwc), shared_bytes, per_sm)
              : occupancy_of(Kernels<T, false>::pick(vec, nhwc), shared_bytes, per_sm);
}

#define BRN_INSTANTIATE_ONCHIP(T)                                                            \
  template cudaError_t launch_onchip_stats<T>(const StatsParams&, const LaunchPlan&, void*); \
  template cudaError_t launch_onchip_grad<T>(const GradParams&, const LaunchPlan&, void*);   \
  template cudaError_t onchip_occupancy<T>(bool, int, bool, size_t, int*);
BRN_INSTANTIATE_ONCHIP(float)
BRN_INSTANTIATE_ONCHIP(double)
BRN_INSTANTIATE_ONCHIP(__half)
BRN_INSTANTIATE_ONCHIP(__nv_bfloat16)
#undef BRN_INSTANTIATE_ONCHIP

}  // namespace cuda
}  // namespace batchrenorm
