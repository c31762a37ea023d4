// batchrenorm.h: the torch-free core shared by every backend.
//
// Nothing here includes a torch, ATen or c10 header, so the CUDA kernels that include it
// compile with a plain `nvcc -c` on machines whose torch is a CPU build (CI).
//
// Dtype contract (as apex's welford.cu states it): x, y, dy, dx are float, double, half or
// bfloat16; weight, bias, running_mean, running_var and every per-channel statistic are
// float (double for double input). Accumulation is in the statistics type.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BRN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BRN_HOST_DEVICE inline
#endif

namespace batchrenorm {

// How every backend's kernels see an input of shape (N, C, *), S the product of the trailing
// dims, read in place in one of two dense layouts (strides in elements follow from the sizes):
//  planes (rows == false): element (n, c, s) at (n * C + c) * S + s: NCHW, contiguous; channel c
//                          is N runs of S values.
//  rows   (rows == true):  element (n, c, s) at (n * S + s) * C + c: (M, C) with M = N * S and
//                          the channels innermost: channels_last / channels_last_3d inputs, and
//                          contiguous inputs without spatial extent (S == 1), the same memory.
// The glue (batchrenorm_glue.h) makes any other strides contiguous first.
struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;
  bool rows;
};

// The paper's clip-bound schedule. `step` is num_batches_tracked before this training step.
// The first warmup_steps steps are plain BatchNorm (r_max = 1, d_max = 0); then each bound
// ramps linearly to its final value over its ramp length. A ramp of 0 jumps straight to the
// final value. Computed in double so that every backend (and batchrenorm_cuda.reference,
// which mirrors this formula op for op) gets bit-identical bounds.
struct RenormSchedule {
  double r_max;
  double d_max;
  int64_t warmup_steps;
  int64_t r_max_ramp_steps;
  int64_t d_max_ramp_steps;
};

// In double: step - warmup_steps can overflow int64 for a counter or warm-up near its limits
// (direct op callers pass any int), and the result is exact for everything below 2^53.
BRN_HOST_DEVICE double ramp_fraction(int64_t step, int64_t warmup_steps, int64_t ramp_steps) {
  const double t = static_cast<double>(step) - static_cast<double>(warmup_steps);
  if (t < 0) return 0.0;
  if (ramp_steps <= 0 || t >= static_cast<double>(ramp_steps)) return 1.0;
  return t / static_cast<double>(ramp_steps);
}

// has_step == false (the functional API, which has no step counter) means the final bounds.
BRN_HOST_DEVICE void clip_bounds(const RenormSchedule& s, bool has_step, int64_t step,
                                 double* r_max, double* d_max) {
  const double fr = has_step ? ramp_fraction(step, s.warmup_steps, s.r_max_ramp_steps) : 1.0;
  const double fd = has_step ? ramp_fraction(step, s.warmup_steps, s.d_max_ramp_steps) : 1.0;
  // Before a ramp starts the bounds are exactly (1, 0), also for r_max or d_max = inf
  // (unclipped), where inf * 0 would give NaN.
  *r_max = fr == 0.0 ? 1.0 : 1.0 + (s.r_max - 1.0) * fr;
  *d_max = fd == 0.0 ? 0.0 : s.d_max * fd;
}

// Weight of this batch in the running averages: `momentum`, or the cumulative average
// 1 / (step + 1) when momentum is None (nn.BatchNorm's momentum=None).
BRN_HOST_DEVICE double running_average_factor(bool cumulative, double momentum, int64_t step) {
  return cumulative ? 1.0 / (static_cast<double>(step) + 1.0) : momentum;
}

// A channel is well centred when |mean * invstd| <= 16: its mean is at most 16 sigma from 0.
// The backward relies on it twice. (a) The saved mean is rounded to float; with the batch's own
// statistics the backward can recover what rounding lost, the residue sum(x - mean) / count,
// which is at most |mean| * 2^-24, i.e. |mean * invstd| * 2^-24 of sigma. In a well-centred
// channel that is <= 1e-6 of sigma, below float32's own summation error over a batch, so the
// saved mean is taken at its word (as ATen's backward always does) and the CPU kernels skip the
// residue's sum; elsewhere (a mean of 1e4 with a std of 1e-2) it is recovered. (b) The CPU's
// elementwise gradient pass may fold the centre into its constant (batchrenorm_cpu_glue.h).
// Per channel, the same on every backend. NaN is not well centred.
constexpr double kWellCentredBound = 16.0;
BRN_HOST_DEVICE bool well_centred(double mean, double invstd) {
  const double z = mean * invstd;
  return z <= kWellCentredBound && z >= -kWellCentredBound;
}

BRN_HOST_DEVICE bool is_finite_value(double v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

template <typename acc_t>
BRN_HOST_DEVICE acc_t clamp_to(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Everything one channel needs after its batch statistics are known.
template <typename acc_t>
struct ChannelCoeffs {
  acc_t invstd;  // 1 / sigma_B
  acc_t r;       // clip(sigma_B / sigma, 1/r_max, r_max)
  acc_t d;       // clip((mu_B - running_mean) / sigma, -d_max, d_max)
  acc_t scale;   // y = x * scale + shift
  acc_t shift;
};

// The non-finite policy (README, "Non-finite batches"): a channel's statistics are usable when
// its mean and its biased variance are finite in acc_t. The variance of a float, half or
// bfloat16 input is a float: it overflows once sum((x - mean)^2) passes FLT_MAX (|x - mean|
// around 1.8e19 / sqrt(m)), although every x is finite.
template <typename acc_t>
BRN_HOST_DEVICE bool finite_stats(acc_t mean, acc_t var_biased) {
  return is_finite_value(static_cast<double>(mean)) &&
         is_finite_value(static_cast<double>(var_biased));
}

// mean and var_biased are this batch's statistics of one channel; run_var the running variance
// *before* this step's update, and mean_minus_run_mean = mean - running_mean (before the update)
// as the caller computed it, more accurately than in acc_t: when |mean| >> std the rounding of
// `mean` to acc_t (1e-4 near 3000 in float) is a large part of sigma, and d divides by sigma, so
// each backend passes the difference from its wider statistics (float64 on the CPU; the shifted
// sums on CUDA). has_running == false (no running statistics) gives r = 1, d = 0: plain
// BatchNorm. weight / bias are 1 / 0 when the layer is not affine. Non-finite statistics give
// NaN coefficients, so the channel's output and gradients are NaN and the loss shows the problem
// (an infinite variance would otherwise give invstd = 0 and a finite, constant output).
template <typename acc_t>
BRN_HOST_DEVICE ChannelCoeffs<acc_t> renorm_coeffs(acc_t mean, acc_t var_biased, acc_t eps,
                                                   bool has_running, acc_t mean_minus_run_mean,
                                                   acc_t run_var, acc_t r_max, acc_t d_max,
                                                   acc_t weight, acc_t bias) {
  ChannelCoeffs<acc_t> c;
  if (!finite_stats(mean, var_biased)) {
    const acc_t nan = static_cast<acc_t>(NAN);
    c.invstd = c.r = c.d = c.scale = c.shift = nan;
    return c;
  }
  const acc_t sigma_b = sqrt(var_biased + eps);
  c.invstd = acc_t(1) / sigma_b;
  if (has_running) {
    const acc_t sigma = sqrt(run_var + eps);
    c.r = clamp_to<acc_t>(sigma_b / sigma, acc_t(1) / r_max, r_max);
    c.d = clamp_to<acc_t>(mean_minus_run_mean / sigma, -d_max, d_max);
  } else {
    c.r = acc_t(1);
    c.d = acc_t(0);
  }
  c.scale = weight * c.r * c.invstd;
  c.shift = bias + weight * (c.d - c.r * mean * c.invstd);
  return c;
}

// The running-buffer update of one channel, as nn.BatchNorm does it (running_var unbiased).
// A channel keeps its buffers when its batch statistics are not finite, or when the update
// itself is not (the unbiased variance of a variance near FLT_MAX): one bad batch must not
// poison the statistics used at inference. batchrenorm_cuda.reference mirrors this.
template <typename acc_t>
BRN_HOST_DEVICE void update_running(acc_t mean, acc_t var_biased, int64_t count, acc_t factor,
                                    acc_t* run_mean, acc_t* run_var) {
  if (!finite_stats(mean, var_biased)) return;
  // m / (m - 1) first: var * m would overflow before the division.
  const acc_t correction =
      static_cast<acc_t>(static_cast<double>(count) / static_cast<double>(count - 1));
  const acc_t unbiased = var_biased * correction;
  const acc_t new_mean = (acc_t(1) - factor) * *run_mean + factor * mean;
  const acc_t new_var = (acc_t(1) - factor) * *run_var + factor * unbiased;
  if (!finite_stats(new_mean, new_var)) return;
  *run_mean = new_mean;
  *run_var = new_var;
}

}  // namespace batchrenorm
