// batchrenorm_autograd.h: the autograd of forward_train and forward_eval, as C++
// torch::autograd::Functions registered for the Autograd key (as PyTorch's own ops have it), so
// that a training call from Python is one dispatcher call: no Python autograd.Function, no
// Python argument walk. Shared by every library with these schemas: `batchrenorm`
// (csrc/batchrenorm.cpp) and the CUDA emulator's (csrc/cuda/emulation/batchrenorm_emulated.cpp),
// each registering it for its own namespace.
//
// r and d are constants for autograd, so the training backward is BatchNorm's with weight * r
// as the scale. It runs the fused `backward` op, except when the backward itself must be
// differentiable (grad mode on in backward: create_graph=True, and every torch.func grad
// transform): then it is written in ATen ops, with the batch statistics recomputed from the
// input so that a second derivative flows through them (the saved ones are constants).
// torch.func.vmap rules live in Python (batchrenorm_cuda/_autograd.py, torch.library.register_vmap).
// torch.func's grad transforms refuse C++ autograd::Functions, so under them the outputs are
// computed in ATen ops instead (composite_*_output), which the transforms differentiate.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "batchrenorm_checks.h"

namespace batchrenorm {
namespace autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using TrainSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, std::optional<double>, double, double, double, int64_t, int64_t, int64_t);
using EvalSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                       const Tensor&, double);
using BackwardSig = std::tuple<OptTensor, OptTensor, OptTensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, bool, std::array<bool, 3>);

// The ops of namespace NS, looked up once.
template <const char* NS>
struct Ops {
  template <typename Sig>
  static c10::TypedOperatorHandle<Sig> find(const char* name) {
    return c10::Dispatcher::singleton()
        .findSchemaOrThrow((std::string(NS) + "::" + name).c_str(), "")
        .template typed<Sig>();
  }
  static const c10::TypedOperatorHandle<TrainSig>& forward_train() {
    static const auto op = find<TrainSig>("forward_train");
    return op;
  }
  static const c10::TypedOperatorHandle<EvalSig>& forward_eval() {
    static const auto op = find<EvalSig>("forward_eval");
    return op;
  }
  static const c10::TypedOperatorHandle<BackwardSig>& backward() {
    static const auto op = find<BackwardSig>("backward");
    return op;
  }
};

inline std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t i = 2; i < x.dim(); ++i) dims.push_back(i);
  return dims;
}

inline std::vector<int64_t> channel_shape(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

// Which of input, weight, bias need a gradient. needs_input_grad counts only the tensor
// arguments that were present, so the index of bias depends on whether weight was given.
inline std::array<bool, 3> output_mask(AutogradContext* ctx, bool has_weight, bool has_bias) {
  return {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
          has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
}

inline std::array<Tensor, 3> composite_train_backward(const Tensor& dy, const Tensor& input,
                                                      const Tensor& weight, const Tensor& r,
                                                      const Tensor& d, double eps,
                                                      std::array<bool, 3> mask) {
  const auto sdt = stat_type(input);
  const Tensor x = input.to(sdt), gy = dy.to(sdt);
  const auto dims = reduce_dims(x);
  const auto shape = channel_shape(x);
  const Tensor centred = x - x.mean(dims, /*keepdim=*/true);
  const Tensor invstd = at::rsqrt(centred.square().mean(dims, /*keepdim=*/true) + eps);
  const Tensor xhat = centred * invstd;
  const Tensor sum_dy = gy.sum(dims);
  const Tensor sum_dy_xhat = (gy * xhat).sum(dims);
  std::array<Tensor, 3> out;
  if (mask[0]) {
    const Tensor scale = weight.defined() ? weight * r : r;
    const double count = static_cast<double>(x.numel() / x.size(1));
    out[0] = (scale.view(shape) * invstd *
              (gy - (sum_dy / count).view(shape) - xhat * (sum_dy_xhat / count).view(shape)))
                 .to(input.scalar_type());
  }
  if (mask[1]) out[1] = r * sum_dy_xhat + d * sum_dy;
  if (mask[2]) out[2] = sum_dy;
  return out;
}

inline std::array<Tensor, 3> composite_eval_backward(const Tensor& dy, const Tensor& input,
                                                     const Tensor& weight, const Tensor& mean,
                                                     const Tensor& invstd,
                                                     std::array<bool, 3> mask) {
  const Tensor gy = dy.to(stat_type(input));
  const auto dims = reduce_dims(gy);
  const auto shape = channel_shape(gy);
  std::array<Tensor, 3> out;
  if (mask[0]) {
    const Tensor scale = weight.defined() ? weight * invstd : invstd;
    out[0] = (gy * scale.view(shape)).to(input.scalar_type());
  }
  if (mask[1]) {
    const Tensor xhat = (input.to(gy.scalar_type()) - mean.view(shape)) * invstd.view(shape);
    out[1] = (gy * xhat).sum(dims);
  }
  if (mask[2]) out[2] = gy.sum(dims);
  return out;
}

// Whether a torch.func transform is active, so that autograd::Function::apply would refuse to
// run: the same test it makes (which throws). ATen/functorch/DynamicLayer.h, which says it
// directly, is not usable from an extension (it needs nlohmann/json). Throws only under a
// transform, the slow path anyway.
inline bool functorch_active() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

inline Tensor affine(Tensor y, const OptTensor& weight, const OptTensor& bias,
                     at::IntArrayRef shape) {
  if (present(weight)) y = y * weight->view(shape);
  if (present(bias)) y = y + bias->view(shape);
  return y;
}

// The training output with r and d as constants, from the input: as the reference computes it.
inline Tensor composite_train_output(const Tensor& input, const OptTensor& weight,
                                     const OptTensor& bias, const Tensor& r, const Tensor& d,
                                     double eps) {
  const Tensor x = input.to(stat_type(input));
  const auto dims = reduce_dims(x);
  const auto shape = channel_shape(x);
  const Tensor centred = x - x.mean(dims, /*keepdim=*/true);
  const Tensor invstd = at::rsqrt(centred.square().mean(dims, /*keepdim=*/true) + eps);
  const Tensor y = centred * invstd * r.view(shape) + d.view(shape);
  return affine(y, weight, bias, shape).to(input.scalar_type());
}

inline Tensor composite_eval_output(const Tensor& input, const OptTensor& weight,
                                    const OptTensor& bias, const Tensor& running_mean,
                                    const Tensor& running_var, double eps) {
  const Tensor x = input.to(stat_type(input));
  const auto shape = channel_shape(x);
  const Tensor y = (x - running_mean.view(shape)) * at::rsqrt(running_var + eps).view(shape);
  return affine(y, weight, bias, shape).to(input.scalar_type());
}

inline OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <const char* NS>
class TrainFunction : public torch::autograd::Function<TrainFunction<NS>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                               std::optional<double> momentum, double eps, double r_max,
                               double d_max, int64_t warmup_steps, int64_t r_max_ramp_steps,
                               int64_t d_max_ramp_steps) {
    at::AutoDispatchBelowAutograd guard;
    auto [output, mean, invstd, r, d] = Ops<NS>::forward_train().call(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
        r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd, r, d});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, invstd, r, d});
    return {output, mean, invstd, r, d};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(13);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3],
                 &r = saved[4], &d = saved[5];
    const auto mask = output_mask(ctx, weight.defined(), ctx->saved_data["has_bias"].toBool());
    if (at::GradMode::is_enabled()) {
      auto g = composite_train_backward(dy, input, weight, r, d,
                                        ctx->saved_data["eps"].toDouble(), mask);
      out[0] = g[0], out[1] = g[1], out[2] = g[2];
    } else {
      auto [gi, gw, gb] = Ops<NS>::backward().call(dy, input, optional_of(weight), mean, invstd,
                                                   r, d, true, mask);
      out[0] = gi.value_or(Tensor()), out[1] = gw.value_or(Tensor()),
      out[2] = gb.value_or(Tensor());
    }
    return out;
  }
};

template <const char* NS>
class EvalFunction : public torch::autograd::Function<EvalFunction<NS>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const Tensor& running_mean,
                               const Tensor& running_var, double eps) {
    at::AutoDispatchBelowAutograd guard;
    Tensor output = Ops<NS>::forward_eval().call(input, weight, bias, running_mean, running_var,
                                                 eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), running_mean, running_var});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["eps"] = eps;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2];
    const Tensor invstd = at::rsqrt(saved[3] + ctx->saved_data["eps"].toDouble());
    const auto mask = output_mask(ctx, weight.defined(), ctx->saved_data["has_bias"].toBool());
    if (at::GradMode::is_enabled()) {
      auto g = composite_eval_backward(dy, input, weight, mean, invstd, mask);
      out[0] = g[0], out[1] = g[1], out[2] = g[2];
    } else {
      auto [gi, gw, gb] = Ops<NS>::backward().call(dy, input, optional_of(weight), mean, invstd,
                                                   std::nullopt, std::nullopt, false, mask);
      out[0] = gi.value_or(Tensor()), out[1] = gw.value_or(Tensor()),
      out[2] = gb.value_or(Tensor());
    }
    return out;
  }
};

template <const char* NS>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps, double r_max,
    double d_max, int64_t warmup_steps, int64_t r_max_ramp_steps, int64_t d_max_ramp_steps) {
  // A Python None for a `Tensor` argument arrives undefined; named here, before the autograd
  // wrapper asks it for its device ("tensor does not have a device").
  static const std::string op = std::string(NS) + "::forward_train";
  check_defined(op.c_str(), "input", input);
  if (functorch_active()) {
    // The fused op (below autograd) gives the statistics, r, d and the buffer update; the
    // output is recomputed differentiably.
    Tensor output, mean, invstd, r, d;
    {
      at::AutoDispatchBelowAutograd guard;
      std::tie(output, mean, invstd, r, d) = Ops<NS>::forward_train().call(
          input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
          r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps);
    }
    return {composite_train_output(input, weight, bias, r, d, eps), mean, invstd, r, d};
  }
  auto out = TrainFunction<NS>::apply(input, weight, bias, running_mean, running_var,
                                      num_batches_tracked, momentum, eps, r_max, d_max,
                                      warmup_steps, r_max_ramp_steps, d_max_ramp_steps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

template <const char* NS>
Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps) {
  static const std::string op = std::string(NS) + "::forward_eval";
  check_defined(op.c_str(), "input", input);
  check_defined(op.c_str(), "running_mean", running_mean);
  check_defined(op.c_str(), "running_var", running_var);
  if (functorch_active()) {
    return composite_eval_output(input, weight, bias, running_mean, running_var, eps);
  }
  return EvalFunction<NS>::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

// TORCH_LIBRARY_IMPL(<NS>, Autograd, m) { autograd::register_kernels<kNamespace>(m); }
template <const char* NS>
void register_kernels(torch::Library& m) {
  m.impl("forward_train", &forward_train<NS>);
  m.impl("forward_eval", &forward_eval<NS>);
}

}  // namespace autograd
}  // namespace batchrenorm
