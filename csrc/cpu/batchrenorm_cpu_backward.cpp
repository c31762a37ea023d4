// batchrenorm_cpu_backward.cpp: the CPU kernels of the `batchrenorm` backward ops (backward,
// backward_relu, and SyncBatchRenorm's backward_reduce and backward_input); the forwards, and how
// the layouts, the numerics and the determinism work, are in batchrenorm_cpu.cpp.
#include "cpu/batchrenorm_cpu_glue.h"

namespace batchrenorm {
namespace cpu {
namespace {

// Per channel, from its GradSums: the saved mean's residue (with the batch's own statistics,
// sum(x - mean) recovers the float64 mean's residue that the rounded mean lost:
// mean_true = mean + sum(x - mean) / count; only where the channel is not well centred, see
// batchrenorm.h) and sum(dy * xhat), in float64. inv_count is 1 / count, or 0 when there are
// no values or no batch statistics (then the residue is 0).
struct ChannelGrad {
  double residue;
  double sum_dy_xhat;
};
inline ChannelGrad channel_grad(const GradSums& s, double mean, double invstd,
                                double inv_count) {
  const double residue = well_centred(mean, invstd) ? 0.0 : s.xc * inv_count;
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
    const ChannelGrad cg = channel_grad(s, ctx.mean[c], ctx.invstd[c], ctx.inv_count);
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
    const ChannelGrad cg = channel_grad(s, ctx.mean[c], inv, ctx.inv_count);
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

// backward and backward_relu: relu_output undefined, or the ReLU output that masks grad_output;
// the gradients go where `into` says (their out= overloads) or into new tensors.
BackwardResult backward_impl(
    const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& r, const std::optional<Tensor>& d, bool train,
    std::array<bool, 3> output_mask, const BackwardOutputs& into = {}) {
  InputLayout g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  const Tensor z = relu_output.defined() ? match_layout(relu_output, g) : Tensor();
  const int64_t C = g.C;
  const double count = static_cast<double>(g.count());
  const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && train);
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = output_into(into.grad_input, input, g);
  if (output_mask[1]) grad_weight = per_channel_into(into.grad_weight, input);
  if (output_mask[2]) grad_bias = per_channel_into(into.grad_bias, input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ChannelView<acc_t> w(weight, 1.0), vm(mean, 0.0), vi(invstd, 1.0), vr(r, 1.0),
        vd(d, 0.0);
    const double inv_count = train && count > 0 ? 1.0 / count : 0.0;
    const GradContext<acc_t> ctx{w, vm, vi, vr, vd, inv_count,
                                 output_mask[1] ? grad_weight.data_ptr<acc_t>() : nullptr,
                                 output_mask[2] ? grad_bias.data_ptr<acc_t>() : nullptr};
    // Whether every channel is well centred (batchrenorm.h): then no residue is recovered, so
    // the sums need not compute sum(x - mean), and the rows gradient pass may fold the centre.
    bool all_well_centred = true;
    for (int64_t c = 0; c < C && all_well_centred; ++c)
      all_well_centred = well_centred(vm[c], vi[c]);
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
      with_relu_mask(pz, [&](auto masked) {
        constexpr bool kMasked = decltype(masked)::value;
        BRN_CALL_KERNEL(grad_planes_fused<scalar_t, kMasked>(po, pg, pz, px, g, vm.data(),
                                                             coeffs, sums.data()));
      });
    } else if (need_sums) {
      // sum(x - mean), for the residue (channel_grad), only when training on a channel that
      // is not well centred: it is the loop's third accumulator.
      sums = train && !all_well_centred
                 ? channel_grad_sums<scalar_t, true>(dy, z, x, g, vm.data())
                 : channel_grad_sums<scalar_t, false>(dy, z, x, g, vm.data());
      for (int64_t c = 0; c < C; ++c) param_grads(ctx, c, sums[c]);
    }
    if (output_mask[0] && !fused) {
      CoeffArrays<acc_t> co(C);
      co.fold_grad = all_well_centred;
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

BackwardResult backward(const Tensor& grad_output, const Tensor& input,
                        const std::optional<Tensor>& weight, const Tensor& mean,
                        const Tensor& invstd, const std::optional<Tensor>& r,
                        const std::optional<Tensor>& d, bool train,
                        std::array<bool, 3> output_mask) {
  check_backward("batchrenorm::backward", grad_output, input, kDevice, weight, mean, invstd, r,
                 d);
  return backward_impl(grad_output, Tensor(), input, weight, mean, invstd, r, d, train,
                       output_mask);
}

BackwardResult backward_relu(const Tensor& grad_output, const Tensor& relu_output,
                             const Tensor& input, const std::optional<Tensor>& weight,
                             const Tensor& mean, const Tensor& invstd,
                             const std::optional<Tensor>& r, const std::optional<Tensor>& d,
                             bool train, std::array<bool, 3> output_mask) {
  check_backward_relu("batchrenorm::backward_relu", grad_output, relu_output, input, kDevice,
                      weight, mean, invstd, r, d);
  return backward_impl(grad_output, relu_output, input, weight, mean, invstd, r, d, train,
                       output_mask);
}

std::tuple<Tensor&, Tensor&, Tensor&> backward_out(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
    const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& r,
    const std::optional<Tensor>& d, bool train, std::array<bool, 3> output_mask,
    Tensor& grad_input, Tensor& grad_weight, Tensor& grad_bias) {
  constexpr const char* op = "batchrenorm::backward.out";
  check_backward(op, grad_output, input, kDevice, weight, mean, invstd, r, d);
  return batchrenorm::backward_out(
      op, input, output_mask, {grad_output, input, weight.value_or(Tensor()), mean, invstd,
                               r.value_or(Tensor()), d.value_or(Tensor())},
      grad_input, grad_weight, grad_bias, [&](const BackwardOutputs& into) {
        return backward_impl(grad_output, Tensor(), input, weight, mean, invstd, r, d, train,
                             output_mask, into);
      });
}

std::tuple<Tensor&, Tensor&, Tensor&> backward_relu_out(
    const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& r, const std::optional<Tensor>& d, bool train,
    std::array<bool, 3> output_mask, Tensor& grad_input, Tensor& grad_weight, Tensor& grad_bias) {
  constexpr const char* op = "batchrenorm::backward_relu.out";
  check_backward_relu(op, grad_output, relu_output, input, kDevice, weight, mean, invstd, r, d);
  return batchrenorm::backward_out(
      op, input, output_mask, {grad_output, relu_output, input, weight.value_or(Tensor()), mean,
                               invstd, r.value_or(Tensor()), d.value_or(Tensor())},
      grad_input, grad_weight, grad_bias, [&](const BackwardOutputs& into) {
        return backward_impl(grad_output, relu_output, input, weight, mean, invstd, r, d, train,
                             output_mask, into);
      });
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
}  // namespace cpu
}  // namespace batchrenorm

TORCH_LIBRARY_IMPL(batchrenorm, CPU, m) {
  m.impl("backward", &batchrenorm::cpu::backward);
  m.impl("backward_relu", &batchrenorm::cpu::backward_relu);
  m.impl("backward.out", &batchrenorm::cpu::backward_out);
  m.impl("backward_relu.out", &batchrenorm::cpu::backward_relu_out);
  m.impl("backward_reduce", &batchrenorm::cpu::backward_reduce);
  m.impl("backward_input", &batchrenorm::cpu::backward_input);
}
