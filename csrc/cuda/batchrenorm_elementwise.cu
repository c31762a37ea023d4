// batchrenorm_elementwise.cu: the elementwise ops (forward_eval, normalize, backward_input, and
// backward without reductions), one launch each: out = (x - m) * a + dy * k + b with
// per-channel coefficients (channel_coeffs), the letters of the CPU kernels and the streaming
// backward: a scales the centred x, k scales dy, b is the constant.
#include "cuda/batchrenorm_device.cuh"

namespace batchrenorm {
namespace cuda {
namespace {

// What the host derives for the kernel besides the params.
struct ElementwisePlan {
  int64_t nvec;  // number of V-vectors
  double inv_c;
  double inv_s;
  bool table;  // coefficients tabulated in shared memory (4 * C * sizeof(acc_t) bytes)
};

// Per-channel coefficients of out = (x - m) * a + dy * k + b.
template <typename acc_t>
__device__ __forceinline__ void channel_coeffs(const ElementwiseParams& p, int64_t c, acc_t& m,
                                               acc_t& a, acc_t& k, acc_t& b) {
  const auto at = [&](int i) { return load_global_ro(static_cast<const acc_t*>(p.p[i]) + c); };
  switch (p.mode) {
    case ElementwiseMode::kEval: {
      const acc_t invstd = acc_t(1) / sqrt(at(1) + static_cast<acc_t>(p.eps));
      m = at(0);
      a = load_or(p.p[2], c, acc_t(1)) * invstd;
      k = acc_t(0);
      b = load_or(p.p[3], c, acc_t(0));
      break;
    }
    case ElementwiseMode::kNormalize:
      m = acc_t(0);
      a = at(0);
      k = acc_t(0);
      b = at(1);
      break;
    case ElementwiseMode::kBackwardInput: {
      const acc_t scale = at(2);
      m = at(0);
      a = -scale * at(1) * at(4);
      k = scale;
      b = -scale * at(3);
      break;
    }
    default:  // kScaleGrad
      m = acc_t(0);
      a = acc_t(0);
      k = load_or(p.p[0], c, acc_t(1)) * load_or(p.p[1], c, acc_t(1)) * at(2);
      b = acc_t(0);
      break;
  }
}

// Channels whose coefficients a CTA tabulates in shared memory first (4 arrays of C values,
// 32 KiB at most), so the streaming loop does no sqrt and no gathers; wider layers compute
// them per vector.
constexpr int kTableBytes = 32 * 1024;

template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    elementwise_kernel(const ElementwiseParams p, const ElementwisePlan plan) {
  using acc_t = typename AccOf<T>::type;
  constexpr int R = NHWC ? V : 1;
  const int64_t C = p.layout.C;
  acc_t* tm = reinterpret_cast<acc_t*>(batchrenorm_dynamic_smem);
  acc_t* ta = tm + C;
  acc_t* tk = ta + C;
  acc_t* tb = tk + C;
  if (plan.table) {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) channel_coeffs(p, c, tm[c], ta[c], tk[c], tb[c]);
    __syncthreads();
  }
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* relu_output = static_cast<const T*>(p.relu_output);
  T* out = static_cast<T*>(p.out);
  const bool uses_x = p.mode != ElementwiseMode::kScaleGrad;
  const bool uses_dy =
      p.mode == ElementwiseMode::kBackwardInput || p.mode == ElementwiseMode::kScaleGrad;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < plan.nvec;
       i += stride) {
    const int64_t index = i * V;
    int64_t c0;
    if (NHWC) {
      c0 = index - div_floor(index, C, plan.inv_c) * C;
    } else {
      const int64_t row = div_floor(index, p.layout.S, plan.inv_s);
      c0 = row - div_floor(row, C, plan.inv_c) * C;
    }
    acc_t m[R], a[R], k[R], b[R];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int64_t c = c0 + j;
      if (plan.table) {
        m[j] = tm[c];
        a[j] = ta[c];
        k[j] = tk[c];
        b[j] = tb[c];
      } else {
        channel_coeffs(p, c, m[j], a[j], k[j], b[j]);
      }
    }
    Vec<T, V> xv, gv, o;
    if (uses_x) xv = load_vec<T, V>(x, index);
    if (uses_dy) gv = load_grad<T, V>(dy, relu_output, index);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int jj = NHWC ? j : 0;
      acc_t val = b[jj];
      if (uses_x) val += (to_acc(xv.v[j]) - m[jj]) * a[jj];
      if (uses_dy) val += k[jj] * to_acc(gv.v[j]);
      o.v[j] = from_acc<T>(val);
    }
    store_vec<T, V>(out, index, o);
  }
}

template <typename T, int V, bool NHWC>
cudaError_t launch_elementwise(const ElementwiseParams& p) {
  using acc_t = typename AccOf<T>::type;
  ElementwisePlan plan{};
  plan.nvec = p.layout.N * p.layout.C * p.layout.S / V;
  if (plan.nvec == 0) return cudaSuccess;
  plan.inv_c = 1.0 / static_cast<double>(p.layout.C);
  plan.inv_s = 1.0 / static_cast<double>(p.layout.S);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((plan.nvec + kThreads - 1) / kThreads, int64_t(sms) * 16));
  const size_t table_bytes = 4 * static_cast<size_t>(p.layout.C) * sizeof(acc_t);
  plan.table = table_bytes <= static_cast<size_t>(kTableBytes);
  ElementwiseParams params = p;
  void* args[] = {&params, &plan};
  return cudaLaunchKernel(elementwise_kernel<T, V, NHWC>, dim3(static_cast<unsigned>(blocks)),
                          dim3(kThreads), args, plan.table ? table_bytes : 0, p.stream);
}

}  // namespace

template <typename T>
cudaError_t launch_elementwise_typed(const ElementwiseParams& p, bool vectorize) {
  constexpr int V = vec_width<T>();
  if (p.layout.rows) {
    return vectorize ? launch_elementwise<T, V, true>(p) : launch_elementwise<T, 1, true>(p);
  }
  return vectorize ? launch_elementwise<T, V, false>(p) : launch_elementwise<T, 1, false>(p);
}

template cudaError_t launch_elementwise_typed<float>(const ElementwiseParams&, bool);
template cudaError_t launch_elementwise_typed<double>(const ElementwiseParams&, bool);
template cudaError_t launch_elementwise_typed<__half>(const ElementwiseParams&, bool);
template cudaError_t launch_elementwise_typed<__nv_bfloat16>(const ElementwiseParams&, bool);

}  // namespace cuda
}  // namespace batchrenorm
