// batchrenorm_cpu.cpp: the CPU kernels of the `batchrenorm` ops (TORCH_LIBRARY_IMPL(CPU)).
//
// Layouts. Every input is seen as one of the two layouts of batchrenorm.h's Geometry, planes
// (NCHW) or rows (channels innermost), read in place (batchrenorm_glue.h, shared with the CUDA
// glue); outputs keep the input's memory format.
//
// Numerics. Statistics are gathered chunk by chunk: a chunk (a few KiB, so it stays in L1) is
// summed once for a provisional mean, then summed again centred on it, and the chunk's exact
// (mean, M2) are merged into float64 accumulators with Chan's formula. So x is read from memory
// once for the statistics and once for the output (two passes), and a channel with mean 1e4
// and std 1e-2 keeps its precision: float32 only ever sums centred values. The elementwise
// passes are centred as well, y = (x - mean) * scale + shift, because x * scale + shift
// cancels catastrophically when |mean| >> std.
//
// Determinism. Reductions split into work items of a fixed size (independent of the thread
// count and of timing), each with its own partial result; the partials are merged per channel
// in item order. Same inputs => bit-identical outputs, whatever the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batchrenorm.h"
#include "batchrenorm_checks.h"
#include "batchrenorm_glue.h"
#include "cpu/batchrenorm_cpu_kernels.h"

namespace batchrenorm {
namespace cpu {
namespace {

using at::Tensor;

constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

// ---------------------------------------------------------------------------------------------
// Per-channel values (argument checks: batchrenorm_checks.h, shared with the CUDA glue).

// A per-channel tensor read in place (a strided one through a contiguous copy), or a constant
// when it is absent: no staging copy per call.
template <typename acc_t>
class ChannelView {
 public:
  ChannelView(const std::optional<Tensor>& t, double fill) : fill_(static_cast<acc_t>(fill)) {
    if (present(t)) {
      keep_ = t->contiguous();
      p_ = keep_.data_ptr<acc_t>();
    }
  }
  ChannelView(const Tensor& t, double fill) : ChannelView(std::optional<Tensor>(t), fill) {}
  acc_t operator[](int64_t c) const { return p_ != nullptr ? p_[c] : fill_; }
  const acc_t* data() const { return p_; }

 private:
  Tensor keep_;
  const acc_t* p_ = nullptr;
  acc_t fill_;
};

// ---------------------------------------------------------------------------------------------
// Run-time choice of the kernels' instruction set.

enum class Isa { kBase, kAvx2, kAvx512 };

// The highest instruction set that (a) this build has, (b) the CPU has, (c) ATen's own CPU
// kernels run with (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers), so that ours
// and ATen's are compared like with like, and (d) BATCHRENORM_CPU_ISA ("base", "avx2") allows:
// it forces a lower one, for the tests of each build.
Isa cpu_isa() {
#if defined(BRN_HAVE_X86_KERNELS)
  static const Isa isa = [] {
    const auto level = [](const std::string& name) {
      if (name == "AVX512" || name == "avx512") return Isa::kAvx512;
      if (name == "AVX2" || name == "avx2") return Isa::kAvx2;
      return Isa::kBase;
    };
    __builtin_cpu_init();
    Isa best = Isa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = Isa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        best = Isa::kAvx512;
    }
    best = std::min(best, level(at::get_cpu_capability()));
    if (const char* env = std::getenv("BATCHRENORM_CPU_ISA")) best = std::min(best, level(env));
    return best;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

#if defined(BRN_HAVE_X86_KERNELS)
#define BRN_CALL_KERNEL(...)                                    \
  (cpu_isa() == Isa::kAvx512 ? avx512::__VA_ARGS__              \
   : cpu_isa() == Isa::kAvx2 ? avx2::__VA_ARGS__ : base::__VA_ARGS__)
#else
#define BRN_CALL_KERNEL(...) base::__VA_ARGS__
#endif

template <typename scalar_t>
std::vector<Moments> channel_moments(const Tensor& x, const Geometry& g) {
  std::vector<Moments> out(g.C);
  BRN_CALL_KERNEL(channel_moments<scalar_t>(x.data_ptr<scalar_t>(), g, out.data()));
  return out;
}

// relu_output: undefined, or the tensor that masks dy (Form's kMasked), in dy's layout.
template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t, bool kCentre>
std::vector<GradSums> channel_grad_sums(const Tensor& dy, const Tensor& relu_output,
                                        const Tensor& x, const Geometry& g,
                                        const acc_type<scalar_t>* mean) {
  std::vector<GradSums> out(g.C);
  const scalar_t* pg = dy.data_ptr<scalar_t>();
  const scalar_t* pz = data_or_null<scalar_t>(relu_output);
  const scalar_t* px = x.data_ptr<scalar_t>();
  if (pz != nullptr)
    BRN_CALL_KERNEL(channel_grad_sums<scalar_t, kCentre, true>(pg, pz, px, g, mean, out.data()));
  else
    BRN_CALL_KERNEL(channel_grad_sums<scalar_t, kCentre, false>(pg, pz, px, g, mean, out.data()));
  return out;
}

template <typename acc_t>
struct CoeffArrays {  // per channel, in acc_t: m, a, b, k of Form, in one allocation
  std::vector<acc_t> storage;
  acc_t *m, *a, *b, *k;
  // kGrad: every channel has |m * invstd| <= 16, so the centre may be folded into b (set by
  // the caller, which knows invstd).
  bool fold_grad = false;
  explicit CoeffArrays(int64_t C)
      : storage(4 * C, acc_t(0)), m(storage.data()), a(m + C), b(a + C), k(b + C) {}
};

template <typename scalar_t, Form kForm>
void elementwise(Tensor& out, const Tensor& x, const Tensor& dy, const Tensor& relu_output,
                 const Geometry& g, const CoeffArrays<acc_type<scalar_t>>& co) {
  using acc_t = acc_type<scalar_t>;
  Coeffs<acc_t> c{co.m, co.a, co.b, co.k};
  // rows layout: fold the centre into the constant, out = x * a + (b - m * a) (+ dy * k), so
  // that the loop loads one coefficient vector fewer (m == nullptr tells it so), when every
  // channel is well conditioned. Affine pass: |m * a| <= 16, so x * a stays within 16 of the
  // output's own scale and the fold costs at most ~1e-6 absolute. Gradient pass (fold_grad,
  // set by the caller): |m * invstd| <= 16, so |x * a| stays within 16 times
  // |k * mean(dy * xhat)| <= |k| * rms(dy), the output's scale: at most ~16 ulp of it.
  bool fold = false;
  if (kForm == Form::kAffine && g.rows) {
    fold = true;
    for (int64_t i = 0; i < g.C && fold; ++i)
      fold = std::abs(static_cast<double>(co.m[i]) * static_cast<double>(co.a[i])) <= 16.0;
  }
  if (kForm == Form::kGrad && g.rows) fold = co.fold_grad;
  std::vector<acc_t> folded;
  if (fold) {
    folded.resize(g.C);
    for (int64_t i = 0; i < g.C; ++i)
      folded[i] = static_cast<acc_t>(static_cast<double>(co.b[i]) -
                                     static_cast<double>(co.m[i]) * static_cast<double>(co.a[i]));
    c.m = nullptr;
    c.b = folded.data();
  }
  const scalar_t* px = kForm == Form::kScale ? nullptr : x.data_ptr<scalar_t>();
  const scalar_t* pg = kForm == Form::kAffine ? nullptr : dy.data_ptr<scalar_t>();
  const scalar_t* pz = data_or_null<scalar_t>(relu_output);
  scalar_t* po = out.data_ptr<scalar_t>();
  if constexpr (kForm == Form::kAffine) {
    BRN_CALL_KERNEL(elementwise<scalar_t, kForm, false>(po, px, pg, pz, g, c));
  } else {
    if (pz != nullptr)
      BRN_CALL_KERNEL(elementwise<scalar_t, kForm, true>(po, px, pg, pz, g, c));
    else
      BRN_CALL_KERNEL(elementwise<scalar_t, kForm, false>(po, px, pg, pz, g, c));
  }
}

// ---------------------------------------------------------------------------------------------
// The ops.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps, double r_max, double d_max, int64_t warmup_steps, int64_t r_max_ramp_steps,
    int64_t d_max_ramp_steps) {
  constexpr const char* op = "batchrenorm::forward_train";
  const TrainFlags flags = check_forward_train(op, input, kDevice, weight, bias, running_mean,
                                             running_var, num_batches_tracked, momentum,
                                             eps, r_max, d_max);
  const bool has_running = flags.has_running, has_step = flags.has_step;

  InputLayout g;
  const Tensor x = canonical(input, &g);
  const int64_t count = g.count();
  check_training_count(op, count, input);
  const int64_t C = g.C;
  Tensor output = empty_output(input, g);
  Tensor save_mean = per_channel_empty(input), save_invstd = per_channel_empty(input);
  Tensor save_r = per_channel_empty(input), save_d = per_channel_empty(input);
  // The counter is a CPU scalar: read and advanced through its pointer, not by item() and add_()
  // (two more dispatcher calls per step; the autograd kernel bumps the counter's version).
  int64_t* step_ptr = has_step ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  const int64_t step = has_step ? *step_ptr : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_forward_train_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<Moments> mom = channel_moments<scalar_t>(x, g);
    const ChannelView<acc_t> w(weight, 1.0), b(bias, 0.0);

    const RenormSchedule schedule{r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps};
    double rmax_d = 1.0, dmax_d = 0.0;
    clip_bounds(schedule, has_step, step, &rmax_d, &dmax_d);
    // The bounds are rounded to acc_t before clipping, as the reference does.
    const acc_t rmax = static_cast<acc_t>(rmax_d), dmax = static_cast<acc_t>(dmax_d);
    const acc_t factor = static_cast<acc_t>(
        running_average_factor(!momentum.has_value(), momentum.value_or(0.0), step));

    Tensor rm, rv;
    acc_t* prm = nullptr;
    acc_t* prv = nullptr;
    if (has_running) {
      rm = running_mean->contiguous();
      rv = running_var->contiguous();
      prm = rm.data_ptr<acc_t>();
      prv = rv.data_ptr<acc_t>();
    }
    acc_t* s_mean = save_mean.data_ptr<acc_t>();
    acc_t* s_invstd = save_invstd.data_ptr<acc_t>();
    acc_t* s_r = save_r.data_ptr<acc_t>();
    acc_t* s_d = save_d.data_ptr<acc_t>();
    CoeffArrays<acc_t> co(C);
    for (int64_t c = 0; c < C; ++c) {
      const double mean = mom[c].mean;
      const double wc = static_cast<double>(w[c]), bc = static_cast<double>(b[c]);
      // M2 is merged in double here, but the policy (finite_stats) is that of a float M2, as
      // the CUDA kernels and the reference have it: a variance is usable only if M2 is finite
      // in acc_t.
      const bool m2_finite = mom[c].m2 <= static_cast<double>(std::numeric_limits<acc_t>::max());
      const double var = m2_finite ? mom[c].m2 / static_cast<double>(count) : INFINITY;
      const acc_t mean_a = static_cast<acc_t>(mean), var_a = static_cast<acc_t>(var);
      // d from the float64 mean (renorm_coeffs says why).
      const acc_t mean_minus_run_mean =
          has_running ? static_cast<acc_t>(mean - static_cast<double>(prm[c])) : acc_t(0);
      const ChannelCoeffs<acc_t> k = renorm_coeffs<acc_t>(
          mean_a, var_a, static_cast<acc_t>(eps), has_running, mean_minus_run_mean,
          has_running ? prv[c] : acc_t(1), rmax, dmax, w[c], b[c]);
      // y = x * scale + shift, evaluated centred on mean_a (see the header comment): the shift
      // that goes with (x - mean_a) is shift + scale * mean_a
      //   = bias + weight * (d - r * invstd * (mean - mean_a)),
      // where mean - mean_a is the float64 mean's rounding residue.
      co.m[c] = mean_a;
      co.a[c] = k.scale;
      co.b[c] = static_cast<acc_t>(
          bc + wc * (static_cast<double>(k.d) -
                     static_cast<double>(k.r) * static_cast<double>(k.invstd) *
                         (mean - static_cast<double>(mean_a))));
      s_mean[c] = mean_a;
      s_invstd[c] = k.invstd;
      s_r[c] = k.r;
      s_d[c] = k.d;
      if (has_running) update_running<acc_t>(mean_a, var_a, count, factor, prm + c, prv + c);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), Tensor(), g, co);
    if (has_running) {
      if (!running_mean->is_same(rm)) running_mean->copy_(rm);
      if (!running_var->is_same(rv)) running_var->copy_(rv);
    }
  });
  // The counter advances with the running statistics (as nn.BatchNorm's exists only with them).
  if (has_step && has_running) ++*step_ptr;
  return {output, save_mean, save_invstd, save_r, save_d};
}

Tensor forward_eval(const Tensor& input, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const Tensor& running_mean,
                    const Tensor& running_var, double eps) {
  constexpr const char* op = "batchrenorm::forward_eval";
  check_forward_eval(op, input, kDevice, weight, bias, running_mean, running_var, eps);
  InputLayout g;
  const Tensor x = canonical(input, &g);
  Tensor output = empty_output(input, g);
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_forward_eval_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ChannelView<acc_t> w(weight, 1.0), b(bias, 0.0), rm(running_mean, 0.0),
        rv(running_var, 1.0);
    CoeffArrays<acc_t> co(C);
    for (int64_t c = 0; c < C; ++c) {
      // As the reference: invstd in acc_t, then (x - mean) * invstd * weight + bias.
      const acc_t invstd = acc_t(1) / std::sqrt(rv[c] + static_cast<acc_t>(eps));
      co.m[c] = rm[c];
      co.a[c] = invstd * w[c];
      co.b[c] = b[c];
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), Tensor(), g, co);
  });
  return output;
}

// Per channel, from its GradSums: the saved mean's residue (with the batch's own statistics,
// sum(x - mean) recovers the float64 mean's residue that the rounded mean lost:
// mean_true = mean + sum(x - mean) / count) and sum(dy * xhat), in float64. inv_count is
// 1 / count, or 0 when there are no values or no batch statistics (then the residue is 0).
struct ChannelGrad {
  double residue;
  double sum_dy_xhat;
};
inline ChannelGrad channel_grad(const GradSums& s, double invstd, double inv_count) {
  const double residue = s.xc * inv_count;
  return {residue, invstd * (s.dy_xc - residue * s.dy)};
}

template <typename acc_t>
struct GradContext {
  const ChannelView<acc_t>& weight;
  const ChannelView<acc_t>& mean;
  const ChannelView<acc_t>& invstd;
  const ChannelView<acc_t>& r;
  const ChannelView<acc_t>& d;
  double inv_count;  // 1 / count when training on a non-empty batch, else 0
  acc_t* grad_weight;  // written by param_grads where not null
  acc_t* grad_bias;
};

// grad_weight = r * sum(dy * xhat) + d * sum(dy), grad_bias = sum(dy) of channel c, where asked.
template <typename acc_t>
void param_grads(const GradContext<acc_t>& ctx, int64_t c, const GradSums& s) {
  if (ctx.grad_weight != nullptr) {
    const ChannelGrad cg = channel_grad(s, ctx.invstd[c], ctx.inv_count);
    ctx.grad_weight[c] = static_cast<acc_t>(static_cast<double>(ctx.r[c]) * cg.sum_dy_xhat +
                                            static_cast<double>(ctx.d[c]) * s.dy);
  }
  if (ctx.grad_bias != nullptr) ctx.grad_bias[c] = static_cast<acc_t>(s.dy);
}

// backward's coefficients of channel c (Form): dx = dy * k + (x - m) * a + b, i.e.
// dx = k * (dy - mean_dy - xhat * mean_dy_xhat) with xhat = (x - mean - residue) * invstd and
// k = weight * r * invstd when training, dx = k * dy otherwise (a = b = 0). Called once per
// channel, in the fused kernel's loop too: multiplications by 1 / count, no divisions.
template <typename acc_t>
void grad_coeffs(const GradContext<acc_t>& ctx, int64_t c, const GradSums& s, acc_t* m, acc_t* a,
                 acc_t* b, acc_t* k) {
  const double inv = static_cast<double>(ctx.invstd[c]);
  const double scale = static_cast<double>(ctx.weight[c]) * static_cast<double>(ctx.r[c]) * inv;
  *k = static_cast<acc_t>(scale);
  *m = acc_t(0);
  *a = acc_t(0);
  *b = acc_t(0);
  if (ctx.inv_count > 0) {
    const ChannelGrad cg = channel_grad(s, inv, ctx.inv_count);
    const double mean_dy = s.dy * ctx.inv_count;
    const double mean_dy_xhat = cg.sum_dy_xhat * ctx.inv_count;
    *m = ctx.mean[c];
    *a = static_cast<acc_t>(-scale * inv * mean_dy_xhat);
    *b = static_cast<acc_t>(-scale * mean_dy + scale * inv * mean_dy_xhat * cg.residue);
  }
}

// The fused kernel's callback for a block of channels: the parameters' gradients as well, in
// the kernel's parallel loop rather than in a serial one after it (on a 7 x 7 map with 2,048
// channels that loop cost as much as a thread's share of the kernel).
template <typename acc_t>
void grad_coeffs_and_params(const void* context, int64_t c0, int64_t c1, const GradSums* sums,
                            acc_t* m, acc_t* a, acc_t* b, acc_t* k) {
  const auto& ctx = *static_cast<const GradContext<acc_t>*>(context);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = c - c0;
    param_grads(ctx, c, sums[c]);
    grad_coeffs(ctx, c, sums[c], &m[j], &a[j], &b[j], &k[j]);
  }
}

// The fused backward (grad_planes_fused) for NCHW training steps whose channels stay in cache:
// chosen by shape only, never by thread count, so that the results are the same for any number
// of threads. At least 8 channels, so that two threads or more share them out.
inline bool fused_grad_applies(const Geometry& g, bool train) {
  const int64_t count = g.N * g.S;
  return train && !g.rows && count > 0 && count <= kFusedGradMaxValues && g.C >= 8;
}

using OptTensor = std::optional<Tensor>;

// backward and backward_relu: relu_output undefined, or the ReLU output that masks grad_output.
std::tuple<OptTensor, OptTensor, OptTensor> backward_impl(
    const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& r, const std::optional<Tensor>& d, bool train,
    std::array<bool, 3> output_mask) {
  InputLayout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  const Tensor z = relu_output.defined() ? match_layout(relu_output, g) : Tensor();
  const int64_t C = g.C;
  const double count = static_cast<double>(g.count());
  const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && train);
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = empty_output(input, g);
  if (output_mask[1]) grad_weight = per_channel_empty(input);
  if (output_mask[2]) grad_bias = per_channel_empty(input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ChannelView<acc_t> w(weight, 1.0), vm(mean, 0.0), vi(invstd, 1.0), vr(r, 1.0),
        vd(d, 0.0);
    const double inv_count = train && count > 0 ? 1.0 / count : 0.0;
    const GradContext<acc_t> ctx{w, vm, vi, vr, vd, inv_count,
                                 output_mask[1] ? grad_weight.data_ptr<acc_t>() : nullptr,
                                 output_mask[2] ? grad_bias.data_ptr<acc_t>() : nullptr};
    std::vector<GradSums> sums;
    const bool fused = output_mask[0] && fused_grad_applies(g, train);
    if (fused) {
      // One pass per channel: sums, the parameters' gradients, then dx from cache
      // (grad_planes_fused).
      sums.resize(C);
      const GradCoeffFn<acc_t> coeffs{&grad_coeffs_and_params<acc_t>, &ctx};
      scalar_t* po = grad_input.data_ptr<scalar_t>();
      const scalar_t* pg = dy.data_ptr<scalar_t>();
      const scalar_t* pz = data_or_null<scalar_t>(z);
      const scalar_t* px = x.data_ptr<scalar_t>();
      if (pz != nullptr)
        BRN_CALL_KERNEL(grad_planes_fused<scalar_t, true>(po, pg, pz, px, g, vm.data(), coeffs,
                                                          sums.data()));
      else
        BRN_CALL_KERNEL(grad_planes_fused<scalar_t, false>(po, pg, pz, px, g, vm.data(), coeffs,
                                                           sums.data()));
    } else if (need_sums) {
      // With the batch's own statistics, sum(x - mean) recovers the float64 mean's residue
      // that the saved (rounded) mean lost: mean_true = mean + sum(x - mean) / count.
      sums = train ? channel_grad_sums<scalar_t, true>(dy, z, x, g, vm.data())
                   : channel_grad_sums<scalar_t, false>(dy, z, x, g, vm.data());
      for (int64_t c = 0; c < C; ++c) param_grads(ctx, c, sums[c]);
    }
    if (output_mask[0] && !fused) {
      CoeffArrays<acc_t> co(C);
      co.fold_grad = true;
      for (int64_t c = 0; c < C; ++c)
        co.fold_grad = co.fold_grad &&
                       std::abs(static_cast<double>(vm[c]) * static_cast<double>(vi[c])) <= 16.0;
      for (int64_t c = 0; c < C; ++c)
        grad_coeffs(ctx, c, train ? sums[c] : GradSums(), &co.m[c], &co.a[c], &co.b[c],
                    &co.k[c]);
      if (train)
        elementwise<scalar_t, Form::kGrad>(grad_input, x, dy, z, g, co);
      else
        elementwise<scalar_t, Form::kScale>(grad_input, x, dy, z, g, co);
    }
  });
  return {optional(grad_input), optional(grad_weight), optional(grad_bias)};
}

std::tuple<OptTensor, OptTensor, OptTensor> backward(const Tensor& grad_output, const Tensor& input,
                                            const std::optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& invstd,
                                            const std::optional<Tensor>& r,
                                            const std::optional<Tensor>& d, bool train,
                                            std::array<bool, 3> output_mask) {
  check_backward("batchrenorm::backward", grad_output, input, kDevice, weight, mean, invstd, r,
                 d);
  return backward_impl(grad_output, Tensor(), input, weight, mean, invstd, r, d, train,
                       output_mask);
}

std::tuple<OptTensor, OptTensor, OptTensor> backward_relu(
    const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& r, const std::optional<Tensor>& d, bool train,
    std::array<bool, 3> output_mask) {
  check_backward_relu("batchrenorm::backward_relu", grad_output, relu_output, input, kDevice,
                      weight, mean, invstd, r, d);
  return backward_impl(grad_output, relu_output, input, weight, mean, invstd, r, d, train,
                       output_mask);
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  constexpr const char* op = "batchrenorm::batch_stats";
  check_input(op, input, kDevice);
  InputLayout g;
  const Tensor x = canonical(input, &g);
  check_stats_count(op, g.count(), input);
  Tensor mean = per_channel_empty(input), m2 = per_channel_empty(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_batch_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<Moments> mom = channel_moments<scalar_t>(x, g);
    acc_t* pm = mean.data_ptr<acc_t>();
    acc_t* p2 = m2.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      pm[c] = static_cast<acc_t>(mom[c].mean);
      p2[c] = static_cast<acc_t>(mom[c].m2);
    }
  });
  return {mean, m2};
}

Tensor normalize(const Tensor& input, const Tensor& scale, const Tensor& shift) {
  constexpr const char* op = "batchrenorm::normalize";
  check_normalize(op, input, kDevice, scale, shift);
  InputLayout g;
  const Tensor x = canonical(input, &g);
  Tensor output = empty_output(input, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_normalize_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ChannelView<acc_t> a(scale, 1.0), b(shift, 0.0);
    CoeffArrays<acc_t> co(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      co.a[c] = a[c];
      co.b[c] = b[c];
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), Tensor(), g, co);
  });
  return output;
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input,
                                           const Tensor& mean, const Tensor& invstd) {
  constexpr const char* op = "batchrenorm::backward_reduce";
  check_backward_reduce(op, grad_output, input, kDevice, mean, invstd);
  InputLayout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  Tensor sum_dy = per_channel_empty(input), sum_dy_xhat = per_channel_empty(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_reduce_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ChannelView<acc_t> vm(mean, 0.0), vi(invstd, 1.0);
    const std::vector<GradSums> sums =
        channel_grad_sums<scalar_t, false>(dy, Tensor(), x, g, vm.data());
    acc_t* s0 = sum_dy.data_ptr<acc_t>();
    acc_t* s1 = sum_dy_xhat.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      s0[c] = static_cast<acc_t>(sums[c].dy);
      s1[c] = static_cast<acc_t>(static_cast<double>(vi[c]) * sums[c].dy_xc);
    }
  });
  return {sum_dy, sum_dy_xhat};
}

Tensor backward_input(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                      const Tensor& invstd, const Tensor& scale, const Tensor& mean_dy,
                      const Tensor& mean_dy_xhat) {
  constexpr const char* op = "batchrenorm::backward_input";
  check_backward_input(op, grad_output, input, kDevice, mean, invstd, scale, mean_dy,
                       mean_dy_xhat);
  InputLayout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  Tensor grad_input = empty_output(input, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_input_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ChannelView<acc_t> vm(mean, 0.0), vi(invstd, 1.0), vs(scale, 1.0), md(mean_dy, 0.0),
        mdx(mean_dy_xhat, 0.0);
    CoeffArrays<acc_t> co(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      const double s = static_cast<double>(vs[c]);
      co.m[c] = vm[c];
      co.k[c] = vs[c];
      co.a[c] = static_cast<acc_t>(-s * static_cast<double>(vi[c]) * static_cast<double>(mdx[c]));
      co.b[c] = static_cast<acc_t>(-s * static_cast<double>(md[c]));
    }
    elementwise<scalar_t, Form::kGrad>(grad_input, x, dy, Tensor(), g, co);
  });
  return grad_input;
}

}  // namespace

// The instruction set the CPU kernels run with ("avx512", "avx2" or "base"), for tests and
// reports.
const char* kernels_isa() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

}  // namespace cpu
}  // namespace batchrenorm

TORCH_LIBRARY_IMPL(batchrenorm, CPU, m) {
  m.impl("forward_train", &batchrenorm::cpu::forward_train);
  m.impl("forward_eval", &batchrenorm::cpu::forward_eval);
  m.impl("backward", &batchrenorm::cpu::backward);
  m.impl("backward_relu", &batchrenorm::cpu::backward_relu);
  m.impl("batch_stats", &batchrenorm::cpu::batch_stats);
  m.impl("normalize", &batchrenorm::cpu::normalize);
  m.impl("backward_reduce", &batchrenorm::cpu::backward_reduce);
  m.impl("backward_input", &batchrenorm::cpu::backward_input);
}
