// batchrenorm_cpu.cpp: the CPU kernels of the `batchrenorm` ops (TORCH_LIBRARY_IMPL(CPU)): the
// forwards and the statistics here, the backwards in batchrenorm_cpu_backward.cpp.
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
#include "cpu/batchrenorm_cpu_glue.h"

namespace batchrenorm {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// The ops.

constexpr int64_t kChannelLoopGrain = 512;

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
    // ~45 cycles a channel (square roots and divisions), so worth sharing out from 1,024
    // channels; each channel writes only its own entries.
    at::parallel_for(0, C, kChannelLoopGrain, [&](int64_t c_begin, int64_t c_end) {
      // Local copies: the stores below could alias what the lambda's references point to, and
      // the compiler would reload those at every channel.
      acc_t* const cm = co.m;
      acc_t* const ca = co.a;
      acc_t* const cb = co.b;
      acc_t* const o_mean = s_mean;
      acc_t* const o_invstd = s_invstd;
      acc_t* const o_r = s_r;
      acc_t* const o_d = s_d;
      acc_t* const run_mean = prm;
      acc_t* const run_var = prv;
      for (int64_t c = c_begin; c < c_end; ++c) {
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
            has_running ? static_cast<acc_t>(mean - static_cast<double>(run_mean[c])) : acc_t(0);
        const ChannelCoeffs<acc_t> k = renorm_coeffs<acc_t>(
            mean_a, var_a, static_cast<acc_t>(eps), has_running, mean_minus_run_mean,
            has_running ? run_var[c] : acc_t(1), rmax, dmax, w[c], b[c]);
        // y = x * scale + shift, evaluated centred on mean_a (see the header comment): the shift
        // that goes with (x - mean_a) is shift + scale * mean_a
        //   = bias + weight * (d - r * invstd * (mean - mean_a)),
        // where mean - mean_a is the float64 mean's rounding residue.
        cm[c] = mean_a;
        ca[c] = k.scale;
        cb[c] = static_cast<acc_t>(
            bc + wc * (static_cast<double>(k.d) -
                       static_cast<double>(k.r) * static_cast<double>(k.invstd) *
                           (mean - static_cast<double>(mean_a))));
        o_mean[c] = mean_a;
        o_invstd[c] = k.invstd;
        o_r[c] = k.r;
        o_d[c] = k.d;
        if (has_running)
          update_running<acc_t>(mean_a, var_a, count, factor, run_mean + c, run_var + c);
      }
    });
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
  m.impl("batch_stats", &batchrenorm::cpu::batch_stats);
  m.impl("normalize", &batchrenorm::cpu::normalize);
}
