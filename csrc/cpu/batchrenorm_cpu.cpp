// batchrenorm_cpu.cpp: the CPU kernels of the `batchrenorm` ops (TORCH_LIBRARY_IMPL(CPU)).
//
// Layouts. Every input is seen as one of two canonical layouts, read in place:
//  - planes: (N, C, S) contiguous, S = prod(spatial) > 1; channel c is N runs of S values.
//  - rows:   (M, C) with the channels innermost: channels_last / channels_last_3d inputs
//            (M = N * spatial) and contiguous inputs without spatial extent (S == 1).
// Other strides are made contiguous first. Outputs keep the input's memory format, as
// batchrenorm_cuda._ops.memory_format_of says.
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
#include "cpu/batchrenorm_cpu_kernels.h"

namespace batchrenorm {
namespace cpu {
namespace {

using at::Tensor;

constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

// ---------------------------------------------------------------------------------------------
// Canonical layout of an input.

// The kernels' Geometry plus the memory format the outputs take.
struct Layout : Geometry {
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t count() const { return N * S; }  // values per channel
};

// `x` in a layout the kernels read in place (a copy only for other strides).
Tensor canonical(const Tensor& x, Layout* g) {
  g->format = memory_format_of(x);
  g->N = x.size(0);
  g->C = x.size(1);
  g->S = 1;
  for (int64_t i = 2; i < x.dim(); ++i) g->S *= x.size(i);
  g->rows = g->format != at::MemoryFormat::Contiguous || g->S == 1;
  return x.contiguous(g->format);
}

// grad_output in the same layout as the (canonical) input, whatever layout it arrived in.
Tensor match_layout(const Tensor& dy, const Layout& g) { return dy.contiguous(g.format); }

// ---------------------------------------------------------------------------------------------
// Per-channel values (argument checks: batchrenorm_checks.h, shared with the CUDA glue).

// A per-channel tensor as a contiguous vector of doubles (`fill` when absent).
template <typename acc_t>
std::vector<double> channel_values(const std::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (!present(t)) return out;
  const Tensor c = t->contiguous();
  const acc_t* p = c.data_ptr<acc_t>();
  for (int64_t i = 0; i < C; ++i) out[i] = static_cast<double>(p[i]);
  return out;
}

template <typename acc_t>
Tensor to_tensor(const std::vector<double>& v, const Tensor& like) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())},
                       like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* p = t.data_ptr<acc_t>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<acc_t>(v[i]);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Run-time choice of the kernels' instruction set.

bool use_avx2() {
#if defined(BRN_HAVE_AVX2_KERNELS)
  static const bool ok = [] {
    const char* env = std::getenv("BATCHRENORM_CPU_ISA");  // "base" forces the portable loops
    if (env != nullptr && std::string(env) == "base") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

#if defined(BRN_HAVE_AVX2_KERNELS)
#define BRN_CALL_KERNEL(...) \
  (use_avx2() ? avx2::__VA_ARGS__ : base::__VA_ARGS__)
#else
#define BRN_CALL_KERNEL(...) base::__VA_ARGS__
#endif

template <typename scalar_t>
std::vector<Moments> channel_moments(const Tensor& x, const Geometry& g) {
  std::vector<Moments> out(g.C);
  BRN_CALL_KERNEL(channel_moments<scalar_t>(x.data_ptr<scalar_t>(), g, out.data()));
  return out;
}

template <typename scalar_t, bool kCentre>
std::vector<GradSums> channel_grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g,
                                        const std::vector<double>& mean) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> m(mean.begin(), mean.end());
  std::vector<GradSums> out(g.C);
  const scalar_t* pg = dy.data_ptr<scalar_t>();
  const scalar_t* px = x.data_ptr<scalar_t>();
  BRN_CALL_KERNEL(channel_grad_sums<scalar_t, kCentre>(pg, px, g, m.data(), out.data()));
  return out;
}

template <typename acc_t>
struct CoeffArrays {  // per channel, in acc_t
  std::vector<acc_t> m, a, b, k;
  // kGrad: every channel has |m * invstd| <= 16, so the centre may be folded into k (set by
  // the caller, which knows invstd).
  bool fold_grad = false;
  explicit CoeffArrays(int64_t C) : m(C, 0), a(C, 0), b(C, 0), k(C, 0) {}
};

template <typename scalar_t, Form kForm>
void elementwise(Tensor& out, const Tensor& x, const Tensor& dy, const Geometry& g,
                 const CoeffArrays<acc_type<scalar_t>>& co) {
  using acc_t = acc_type<scalar_t>;
  Coeffs<acc_t> c{co.m.data(), co.a.data(), co.b.data(), co.k.data()};
  // rows layout, affine pass: when every channel is well conditioned (|m * a| <= 16, so x * a
  // stays within 16 of the output's own scale and the fold costs at most ~1e-6 absolute), fold
  // the centre into the shift, y = x * a + (b - m * a), and the loop loads two coefficient
  // vectors instead of three (m == nullptr tells it so). Otherwise keep the centred form.
  std::vector<acc_t> folded;
  if (kForm == Form::kAffine && g.rows) {
    bool ok = true;
    for (int64_t i = 0; i < g.C && ok; ++i)
      ok = std::abs(static_cast<double>(co.m[i]) * static_cast<double>(co.a[i])) <= 16.0;
    if (ok) {
      folded.resize(g.C);
      for (int64_t i = 0; i < g.C; ++i)
        folded[i] = static_cast<acc_t>(static_cast<double>(co.b[i]) -
                                       static_cast<double>(co.m[i]) * static_cast<double>(co.a[i]));
      c.m = nullptr;
      c.b = folded.data();
    }
  }
  // rows layout, gradient pass: dx = dy * a + x * b + (k - m * b). |x * b| stays within
  // |m * invstd| <= 16 times |k_dx * mean(dy * xhat)| <= |k_dx| * rms(dy), the output's scale,
  // so the fold costs at most ~16 ulp of it.
  if (kForm == Form::kGrad && g.rows && co.fold_grad) {
    folded.resize(g.C);
    for (int64_t i = 0; i < g.C; ++i)
      folded[i] = static_cast<acc_t>(static_cast<double>(co.k[i]) -
                                     static_cast<double>(co.m[i]) * static_cast<double>(co.b[i]));
    c.m = nullptr;
    c.k = folded.data();
  }
  const scalar_t* px = kForm == Form::kScale ? nullptr : x.data_ptr<scalar_t>();
  const scalar_t* pg = kForm == Form::kAffine ? nullptr : dy.data_ptr<scalar_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  BRN_CALL_KERNEL(elementwise<scalar_t, kForm>(po, px, pg, g, c));
}

Tensor empty_output(const Tensor& x, const Layout& g) {
  return at::empty(x.sizes(), x.options().memory_format(g.format));
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

  Layout g;
  const Tensor x = canonical(input, &g);
  const int64_t count = g.count();
  TORCH_CHECK(count > 1, op, ": expected more than 1 value per channel when training, got input size ",
              input.sizes());
  const int64_t C = g.C;
  Tensor output = empty_output(input, g);
  Tensor save_mean, save_invstd, save_r, save_d;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_forward_train_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<Moments> mom = channel_moments<scalar_t>(x, g);
    const std::vector<double> w = channel_values<acc_t>(weight, C, 1.0);
    const std::vector<double> b = channel_values<acc_t>(bias, C, 0.0);

    const int64_t step = has_step ? num_batches_tracked->item<int64_t>() : 0;
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
    CoeffArrays<acc_t> co(C);
    std::vector<double> vmean(C), vinvstd(C), vr(C), vd(C);
    for (int64_t c = 0; c < C; ++c) {
      const double mean = mom[c].mean;
      // M2 is merged in double here, but the policy (finite_stats) is that of a float M2, as
      // the CUDA kernels and the reference have it: a variance is usable only if M2 is finite
      // in acc_t.
      const bool m2_finite = mom[c].m2 <= static_cast<double>(std::numeric_limits<acc_t>::max());
      const double var = m2_finite ? mom[c].m2 / static_cast<double>(count) : INFINITY;
      const acc_t mean_a = static_cast<acc_t>(mean), var_a = static_cast<acc_t>(var);
      ChannelCoeffs<acc_t> k = renorm_coeffs<acc_t>(
          mean_a, var_a, static_cast<acc_t>(eps), has_running, has_running ? prm[c] : acc_t(0),
          has_running ? prv[c] : acc_t(1), rmax, dmax, static_cast<acc_t>(w[c]),
          static_cast<acc_t>(b[c]));
      if (has_running && finite_stats(mean_a, var_a)) {
        // d from the float64 mean: mean_a's rounding (1e-4 near 3000 in float) is a large part
        // of sigma when |mean| >> std, and d divides by sigma.
        const acc_t sigma = std::sqrt(prv[c] + static_cast<acc_t>(eps));
        k.d = clamp_to<acc_t>(static_cast<acc_t>(mean - static_cast<double>(prm[c])) / sigma,
                              -dmax, dmax);
      }
      // y = x * scale + shift, evaluated centred on mean_a (see the header comment): the shift
      // that goes with (x - mean_a) is shift + scale * mean_a
      //   = bias + weight * (d - r * invstd * (mean - mean_a)),
      // where mean - mean_a is the float64 mean's rounding residue.
      co.m[c] = mean_a;
      co.a[c] = k.scale;
      co.b[c] = static_cast<acc_t>(
          b[c] + w[c] * (static_cast<double>(k.d) -
                         static_cast<double>(k.r) * static_cast<double>(k.invstd) *
                             (mean - static_cast<double>(mean_a))));
      vmean[c] = mean_a;
      vinvstd[c] = k.invstd;
      vr[c] = k.r;
      vd[c] = k.d;
      if (has_running) update_running<acc_t>(mean_a, var_a, count, factor, prm + c, prv + c);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), g, co);
    if (has_running) {
      if (!running_mean->is_same(rm)) running_mean->copy_(rm);
      if (!running_var->is_same(rv)) running_var->copy_(rv);
    }
    save_mean = to_tensor<acc_t>(vmean, input);
    save_invstd = to_tensor<acc_t>(vinvstd, input);
    save_r = to_tensor<acc_t>(vr, input);
    save_d = to_tensor<acc_t>(vd, input);
  });
  // The counter advances with the running statistics (as nn.BatchNorm's exists only with them).
  if (has_step && has_running) num_batches_tracked->add_(1);
  return {output, save_mean, save_invstd, save_r, save_d};
}

Tensor forward_eval(const Tensor& input, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const Tensor& running_mean,
                    const Tensor& running_var, double eps) {
  constexpr const char* op = "batchrenorm::forward_eval";
  check_input(op, input, kDevice);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  Layout g;
  const Tensor x = canonical(input, &g);
  Tensor output = empty_output(input, g);
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_forward_eval_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> w = channel_values<acc_t>(weight, C, 1.0);
    const std::vector<double> b = channel_values<acc_t>(bias, C, 0.0);
    const std::vector<double> rm = channel_values<acc_t>(running_mean, C, 0.0);
    const std::vector<double> rv = channel_values<acc_t>(running_var, C, 1.0);
    CoeffArrays<acc_t> co(C);
    for (int64_t c = 0; c < C; ++c) {
      // As the reference: invstd in acc_t, then (x - mean) * invstd * weight + bias.
      const acc_t invstd = acc_t(1) / std::sqrt(static_cast<acc_t>(rv[c]) + static_cast<acc_t>(eps));
      co.m[c] = static_cast<acc_t>(rm[c]);
      co.a[c] = invstd * static_cast<acc_t>(w[c]);
      co.b[c] = static_cast<acc_t>(b[c]);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), g, co);
  });
  return output;
}

using OptTensor = std::optional<Tensor>;

std::tuple<OptTensor, OptTensor, OptTensor> backward(const Tensor& grad_output, const Tensor& input,
                                            const std::optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& invstd,
                                            const std::optional<Tensor>& r,
                                            const std::optional<Tensor>& d, bool batch_stats,
                                            std::array<bool, 3> output_mask) {
  constexpr const char* op = "batchrenorm::backward";
  check_input(op, input, kDevice);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_per_channel(op, "r", r, input);
  check_per_channel(op, "d", d, input);
  Layout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  const int64_t C = g.C;
  const double count = static_cast<double>(g.count());
  const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && batch_stats);
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = empty_output(input, g);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> w = channel_values<acc_t>(weight, C, 1.0);
    const std::vector<double> vm = channel_values<acc_t>(mean, C, 0.0);
    const std::vector<double> vi = channel_values<acc_t>(invstd, C, 1.0);
    const std::vector<double> vr = channel_values<acc_t>(r, C, 1.0);
    const std::vector<double> vd = channel_values<acc_t>(d, C, 0.0);
    std::vector<GradSums> sums;
    if (need_sums) {
      // With the batch's own statistics, sum(x - mean) recovers the float64 mean's residue
      // that the saved (rounded) mean lost: mean_true = mean + sum(x - mean) / count.
      sums = batch_stats ? channel_grad_sums<scalar_t, true>(dy, x, g, vm)
                         : channel_grad_sums<scalar_t, false>(dy, x, g, vm);
    }
    std::vector<double> sum_dy_xhat(C, 0.0), residue(C, 0.0);
    if (need_sums) {
      for (int64_t c = 0; c < C; ++c) {
        residue[c] = batch_stats && count > 0 ? sums[c].xc / count : 0.0;
        sum_dy_xhat[c] = vi[c] * (sums[c].dy_xc - residue[c] * sums[c].dy);
      }
    }
    if (output_mask[1]) {
      std::vector<double> gw(C);
      for (int64_t c = 0; c < C; ++c) gw[c] = vr[c] * sum_dy_xhat[c] + vd[c] * sums[c].dy;
      grad_weight = to_tensor<acc_t>(gw, mean);
    }
    if (output_mask[2]) {
      std::vector<double> gb(C);
      for (int64_t c = 0; c < C; ++c) gb[c] = sums[c].dy;
      grad_bias = to_tensor<acc_t>(gb, mean);
    }
    if (output_mask[0]) {
      CoeffArrays<acc_t> co(C);
      co.fold_grad = true;
      for (int64_t c = 0; c < C; ++c) co.fold_grad = co.fold_grad && std::abs(vm[c] * vi[c]) <= 16.0;
      for (int64_t c = 0; c < C; ++c) {
        const double k = w[c] * vr[c] * vi[c];
        co.a[c] = static_cast<acc_t>(k);
        if (batch_stats && count > 0) {
          // dx = k * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean - residue) * invstd
          const double mean_dy = sums[c].dy / count;
          const double mean_dy_xhat = sum_dy_xhat[c] / count;
          co.m[c] = static_cast<acc_t>(vm[c]);
          co.b[c] = static_cast<acc_t>(-k * vi[c] * mean_dy_xhat);
          co.k[c] = static_cast<acc_t>(-k * mean_dy + k * vi[c] * mean_dy_xhat * residue[c]);
        }
      }
      if (batch_stats)
        elementwise<scalar_t, Form::kGrad>(grad_input, x, dy, g, co);
      else
        elementwise<scalar_t, Form::kScale>(grad_input, x, dy, g, co);
    }
  });
  auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  return {opt(grad_input), opt(grad_weight), opt(grad_bias)};
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  constexpr const char* op = "batchrenorm::batch_stats";
  check_input(op, input, kDevice);
  Layout g;
  const Tensor x = canonical(input, &g);
  TORCH_CHECK(g.count() > 0, op, ": expected at least 1 value per channel, got input size ",
              input.sizes());
  Tensor mean, m2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_batch_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<Moments> mom = channel_moments<scalar_t>(x, g);
    std::vector<double> vm(g.C), v2(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      vm[c] = mom[c].mean;
      v2[c] = mom[c].m2;
    }
    mean = to_tensor<acc_t>(vm, input);
    m2 = to_tensor<acc_t>(v2, input);
  });
  return {mean, m2};
}

Tensor normalize(const Tensor& input, const Tensor& scale, const Tensor& shift) {
  constexpr const char* op = "batchrenorm::normalize";
  check_input(op, input, kDevice);
  check_per_channel(op, "scale", scale, input);
  check_per_channel(op, "shift", shift, input);
  Layout g;
  const Tensor x = canonical(input, &g);
  Tensor output = empty_output(input, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_normalize_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> a = channel_values<acc_t>(scale, g.C, 1.0);
    const std::vector<double> b = channel_values<acc_t>(shift, g.C, 0.0);
    CoeffArrays<acc_t> co(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      co.a[c] = static_cast<acc_t>(a[c]);
      co.b[c] = static_cast<acc_t>(b[c]);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), g, co);
  });
  return output;
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input,
                                           const Tensor& mean, const Tensor& invstd) {
  constexpr const char* op = "batchrenorm::backward_reduce";
  check_input(op, input, kDevice);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  Layout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  Tensor sum_dy, sum_dy_xhat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_reduce_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> vm = channel_values<acc_t>(mean, g.C, 0.0);
    const std::vector<double> vi = channel_values<acc_t>(invstd, g.C, 1.0);
    const std::vector<GradSums> sums = channel_grad_sums<scalar_t, false>(dy, x, g, vm);
    std::vector<double> s0(g.C), s1(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      s0[c] = sums[c].dy;
      s1[c] = vi[c] * sums[c].dy_xc;
    }
    sum_dy = to_tensor<acc_t>(s0, mean);
    sum_dy_xhat = to_tensor<acc_t>(s1, mean);
  });
  return {sum_dy, sum_dy_xhat};
}

Tensor backward_input(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                      const Tensor& invstd, const Tensor& scale, const Tensor& mean_dy,
                      const Tensor& mean_dy_xhat) {
  constexpr const char* op = "batchrenorm::backward_input";
  check_input(op, input, kDevice);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_per_channel(op, "scale", scale, input);
  check_per_channel(op, "mean_dy", mean_dy, input);
  check_per_channel(op, "mean_dy_xhat", mean_dy_xhat, input);
  Layout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  Tensor grad_input = empty_output(input, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_input_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> vm = channel_values<acc_t>(mean, g.C, 0.0);
    const std::vector<double> vi = channel_values<acc_t>(invstd, g.C, 1.0);
    const std::vector<double> vs = channel_values<acc_t>(scale, g.C, 1.0);
    const std::vector<double> md = channel_values<acc_t>(mean_dy, g.C, 0.0);
    const std::vector<double> mdx = channel_values<acc_t>(mean_dy_xhat, g.C, 0.0);
    CoeffArrays<acc_t> co(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      co.m[c] = static_cast<acc_t>(vm[c]);
      co.a[c] = static_cast<acc_t>(vs[c]);
      co.b[c] = static_cast<acc_t>(-vs[c] * vi[c] * mdx[c]);
      co.k[c] = static_cast<acc_t>(-vs[c] * md[c]);
    }
    elementwise<scalar_t, Form::kGrad>(grad_input, x, dy, g, co);
  });
  return grad_input;
}

}  // namespace
}  // namespace cpu
}  // namespace batchrenorm

TORCH_LIBRARY_IMPL(batchrenorm, CPU, m) {
  m.impl("forward_train", &batchrenorm::cpu::forward_train);
  m.impl("forward_eval", &batchrenorm::cpu::forward_eval);
  m.impl("backward", &batchrenorm::cpu::backward);
  m.impl("batch_stats", &batchrenorm::cpu::batch_stats);
  m.impl("normalize", &batchrenorm::cpu::normalize);
  m.impl("backward_reduce", &batchrenorm::cpu::backward_reduce);
  m.impl("backward_input", &batchrenorm::cpu::backward_input);
}
