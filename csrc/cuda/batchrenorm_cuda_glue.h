// batchrenorm_cuda_glue.h: the CUDA glue of every `batchrenorm` op, torch-facing but free of the
// CUDA runtime: argument checks naming the argument (batchrenorm_checks.h), the input's layout
// and outputs allocated in it (batchrenorm_glue.h, shared with the CPU glue), the argument
// structs of batchrenorm_cuda.h filled, the workspace queried and allocated, and one launcher
// call per kernel.
//
// It is a template over a runtime RT, so that one copy of this logic serves two backends:
//   csrc/cuda/batchrenorm_cuda.cpp              CUDA tensors on a GPU (device guard, current
//                                              stream, C10_CUDA_CHECK)
//   csrc/cuda/emulation/batchrenorm_emulated.cpp CPU tensors, the same kernels executed by the
//                                              CUDA emulator (tests)
// RT provides: kDevice (the tensors' device type); Guard (constructed from the input's device);
// stream(); check(op, err) for host-side calls; note_plan(op, plan), told each reduction's
// plan (the emulator shows it to the tests); ticket(input), the zero-initialised counter of
// batchrenorm_cuda.h for the current device and stream; launch(op, mutated, written, f), which
// runs f() (one kernel launch returning its cudaError_t) given the tensors that f updates in
// place and those it writes.
//
// Each reduction is planned once per call (plan_stats / plan_grad); the plan's workspace for
// per-CTA partials comes from the caching allocator (free after warm-up, and capturable in a
// CUDA graph). The kernel writes every workspace byte before reading it, so it is never memset.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "batchrenorm.h"
#include "batchrenorm_checks.h"
#include "batchrenorm_glue.h"
#include "cuda/batchrenorm_cuda.h"

namespace batchrenorm {
namespace cuda {

using at::Tensor;

inline DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    default:
      break;
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
  }
  TORCH_CHECK(false, "batchrenorm: unsupported input dtype ", x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments (argument checks: batchrenorm_checks.h, shared with the CPU glue).

// A per-channel tensor as a contiguous one (kept alive by the caller), or nullptr when absent.
inline const void* ptr_or_null(const std::optional<Tensor>& t, Tensor* keep) {
  if (!present(t)) return nullptr;
  *keep = t->contiguous();
  return keep->data_ptr();
}

inline Tensor workspace(const Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------------------
// The ops.

template <class RT>
struct Glue {

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
      const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
      const std::optional<Tensor>& num_batches_tracked, std::optional<double> momentum,
      double eps, double r_max, double d_max, int64_t warmup_steps, int64_t r_max_ramp_steps,
      int64_t d_max_ramp_steps) {
    constexpr const char* op = "batchrenorm::forward_train";
    const TrainFlags flags = check_forward_train(op, input, RT::kDevice, weight, bias, running_mean,
                                               running_var, num_batches_tracked, momentum,
                                               eps, r_max, d_max);
    const bool has_running = flags.has_running, has_step = flags.has_step;

    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    check_training_count(op, g.count(), input);
    Tensor output = empty_output(input, g);
    Tensor save_mean = per_channel_empty(input), save_invstd = per_channel_empty(input);
    Tensor save_r = per_channel_empty(input), save_d = per_channel_empty(input);
    if (g.C == 0) return {output, save_mean, save_invstd, save_r, save_d};

    Tensor w, b, rm, rv;
    StatsParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.train = true;
    a.x = x.data_ptr();
    a.y = output.data_ptr();
    a.weight = ptr_or_null(weight, &w);
    a.bias = ptr_or_null(bias, &b);
    if (has_running) {
      // The kernel updates the buffers in place; a non-contiguous one goes through a copy.
      rm = running_mean->contiguous();
      rv = running_var->contiguous();
      a.running_mean = rm.data_ptr();
      a.running_var = rv.data_ptr();
    }
    a.num_batches_tracked = has_step ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
    a.ticket = has_step ? RT::ticket(input) : nullptr;
    a.cumulative = !momentum.has_value();
    a.momentum = momentum.value_or(0.0);
    a.eps = eps;
    a.schedule = RenormSchedule{r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps};
    a.mean = save_mean.data_ptr();
    a.invstd = save_invstd.data_ptr();
    a.r = save_r.data_ptr();
    a.d = save_d.data_ptr();
    a.stream = RT::stream();

    LaunchPlan plan;
    RT::check(op, plan_stats(a, &plan));
    RT::note_plan(op, plan);
    Tensor ws = workspace(input, plan.workspace_bytes);
    Tensor step = has_step ? *num_batches_tracked : Tensor();
    RT::launch(op, {rm, rv, step}, {output, save_mean, save_invstd, save_r, save_d, ws},
               [&] { return launch_stats(a, plan, ws.data_ptr()); });

    if (has_running) {
      if (!running_mean->is_same(rm)) running_mean->copy_(rm);
      if (!running_var->is_same(rv)) running_var->copy_(rv);
    }
    return {output, save_mean, save_invstd, save_r, save_d};
  }

  static Tensor forward_eval(const Tensor& input, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, const Tensor& running_mean,
                      const Tensor& running_var, double eps) {
    constexpr const char* op = "batchrenorm::forward_eval";
    check_forward_eval(op, input, RT::kDevice, weight, bias, running_mean, running_var, eps);

    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    Tensor output = empty_output(input, g);
    if (input.numel() == 0) return output;
    Tensor w, b;
    const Tensor rm = running_mean.contiguous(), rv = running_var.contiguous();
    ElementwiseParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.mode = ElementwiseMode::kEval;
    a.x = x.data_ptr();
    a.out = output.data_ptr();
    a.p[0] = rm.data_ptr();
    a.p[1] = rv.data_ptr();
    a.p[2] = ptr_or_null(weight, &w);
    a.p[3] = ptr_or_null(bias, &b);
    a.eps = eps;
    a.stream = RT::stream();
    RT::launch(op, {}, {output}, [&] { return elementwise(a); });
    return output;
  }

  using OptTensor = std::optional<Tensor>;

  static std::tuple<OptTensor, OptTensor, OptTensor> backward(
      const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
      const Tensor& invstd, const OptTensor& r, const OptTensor& d, bool train,
      std::array<bool, 3> output_mask) {
    constexpr const char* op = "batchrenorm::backward";
    check_backward(op, grad_output, input, RT::kDevice, weight, mean, invstd, r, d);
    return backward_impl(op, grad_output, Tensor(), input, weight, mean, invstd, r, d, train,
                         output_mask);
  }

  static std::tuple<OptTensor, OptTensor, OptTensor> backward_relu(
      const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
      const OptTensor& weight, const Tensor& mean, const Tensor& invstd, const OptTensor& r,
      const OptTensor& d, bool train, std::array<bool, 3> output_mask) {
    constexpr const char* op = "batchrenorm::backward_relu";
    check_backward_relu(op, grad_output, relu_output, input, RT::kDevice, weight, mean, invstd,
                        r, d);
    return backward_impl(op, grad_output, relu_output, input, weight, mean, invstd, r, d, train,
                         output_mask);
  }

  // The out= overloads: the checks, then backward_impl writing into the given tensors.
  static std::tuple<Tensor&, Tensor&, Tensor&> backward_out(
      const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
      const Tensor& invstd, const OptTensor& r, const OptTensor& d, bool train,
      std::array<bool, 3> output_mask, Tensor& grad_input, Tensor& grad_weight,
      Tensor& grad_bias) {
    constexpr const char* op = "batchrenorm::backward.out";
    check_backward(op, grad_output, input, RT::kDevice, weight, mean, invstd, r, d);
    return batchrenorm::backward_out(
        op, input, output_mask, {grad_output, input, weight.value_or(Tensor()), mean, invstd,
                                 r.value_or(Tensor()), d.value_or(Tensor())},
        grad_input, grad_weight, grad_bias, [&](const BackwardOutputs& into) {
          return backward_impl(op, grad_output, Tensor(), input, weight, mean, invstd, r, d,
                               train, output_mask, into);
        });
  }

  static std::tuple<Tensor&, Tensor&, Tensor&> backward_relu_out(
      const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
      const OptTensor& weight, const Tensor& mean, const Tensor& invstd, const OptTensor& r,
      const OptTensor& d, bool train, std::array<bool, 3> output_mask, Tensor& grad_input,
      Tensor& grad_weight, Tensor& grad_bias) {
    constexpr const char* op = "batchrenorm::backward_relu.out";
    check_backward_relu(op, grad_output, relu_output, input, RT::kDevice, weight, mean, invstd,
                        r, d);
    return batchrenorm::backward_out(
        op, input, output_mask, {grad_output, relu_output, input, weight.value_or(Tensor()),
                                 mean, invstd, r.value_or(Tensor()), d.value_or(Tensor())},
        grad_input, grad_weight, grad_bias, [&](const BackwardOutputs& into) {
          return backward_impl(op, grad_output, relu_output, input, weight, mean, invstd, r, d,
                               train, output_mask, into);
        });
  }

  // relu_output: undefined, or the ReLU output that masks grad_output (backward_relu); the
  // gradients go where `into` says (the out= overloads) or into new tensors.
  static std::tuple<OptTensor, OptTensor, OptTensor> backward_impl(
      const char* op, const Tensor& grad_output, const Tensor& relu_output, const Tensor& input,
      const OptTensor& weight, const Tensor& mean, const Tensor& invstd, const OptTensor& r,
      const OptTensor& d, bool train, std::array<bool, 3> output_mask,
      const BackwardOutputs& into = {}) {
    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    Tensor grad_input, grad_weight, grad_bias;
    if (output_mask[0]) grad_input = output_into(into.grad_input, input, g);
    if (output_mask[1]) grad_weight = per_channel_into(into.grad_weight, input);
    if (output_mask[2]) grad_bias = per_channel_into(into.grad_bias, input);
    if (input.numel() == 0) {
      // Sums over no values.
      if (output_mask[1]) grad_weight.zero_();
      if (output_mask[2]) grad_bias.zero_();
      return {optional(grad_input), optional(grad_weight), optional(grad_bias)};
    }
    const Tensor dy = match_layout(grad_output, g);
    const Tensor z = relu_output.defined() ? match_layout(relu_output, g) : Tensor();
    Tensor w, rk, dk;
    const Tensor mk = mean.contiguous(), ik = invstd.contiguous();
    const cudaStream_t stream = RT::stream();
    const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && train);

    if (!need_sums) {
      if (!output_mask[0]) return {optional(grad_input), optional(grad_weight), optional(grad_bias)};
      // Constant statistics and only dx: dx = dy * weight * r * invstd, one elementwise pass.
      ElementwiseParams a{};
      a.dtype = dtype_of(input);
      a.layout = g;
      a.mode = ElementwiseMode::kScaleGrad;
      a.dy = dy.data_ptr();
      a.relu_output = z.defined() ? z.data_ptr() : nullptr;
      a.out = grad_input.data_ptr();
      a.p[0] = ptr_or_null(weight, &w);
      a.p[1] = ptr_or_null(r, &rk);
      a.p[2] = ik.data_ptr();
      a.stream = stream;
      RT::launch(op, {}, {grad_input}, [&] { return elementwise(a); });
      return {optional(grad_input), optional(grad_weight), optional(grad_bias)};
    }

    GradParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.dy = dy.data_ptr();
    a.relu_output = z.defined() ? z.data_ptr() : nullptr;
    a.x = x.data_ptr();
    a.weight = ptr_or_null(weight, &w);
    a.mean = mk.data_ptr();
    a.invstd = ik.data_ptr();
    a.r = ptr_or_null(r, &rk);
    a.d = ptr_or_null(d, &dk);
    a.through_stats = train;
    a.dx = output_mask[0] ? grad_input.data_ptr() : nullptr;
    a.grad_weight = output_mask[1] ? grad_weight.data_ptr() : nullptr;
    a.grad_bias = output_mask[2] ? grad_bias.data_ptr() : nullptr;
    a.stream = stream;
    LaunchPlan plan;
    RT::check(op, plan_grad(a, &plan));
    RT::note_plan(op, plan);
    Tensor ws = workspace(input, plan.workspace_bytes);
    RT::launch(op, {}, {grad_input, grad_weight, grad_bias, ws},
               [&] { return launch_grad(a, plan, ws.data_ptr()); });
    return {optional(grad_input), optional(grad_weight), optional(grad_bias)};
  }

  static std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
    constexpr const char* op = "batchrenorm::batch_stats";
    check_input(op, input, RT::kDevice);
    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    check_stats_count(op, g.count(), input);
    Tensor mean = per_channel_empty(input), m2 = per_channel_empty(input);
    if (g.C == 0) return {mean, m2};
    StatsParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.train = false;
    a.x = x.data_ptr();
    a.mean = mean.data_ptr();
    a.m2 = m2.data_ptr();
    a.stream = RT::stream();
    LaunchPlan plan;
    RT::check(op, plan_stats(a, &plan));
    RT::note_plan(op, plan);
    Tensor ws = workspace(input, plan.workspace_bytes);
    RT::launch(op, {}, {mean, m2, ws}, [&] { return launch_stats(a, plan, ws.data_ptr()); });
    return {mean, m2};
  }

  static Tensor normalize(const Tensor& input, const Tensor& scale, const Tensor& shift) {
    constexpr const char* op = "batchrenorm::normalize";
    check_normalize(op, input, RT::kDevice, scale, shift);
    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    Tensor output = empty_output(input, g);
    if (input.numel() == 0) return output;
    const Tensor sk = scale.contiguous(), hk = shift.contiguous();
    ElementwiseParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.mode = ElementwiseMode::kNormalize;
    a.x = x.data_ptr();
    a.out = output.data_ptr();
    a.p[0] = sk.data_ptr();
    a.p[1] = hk.data_ptr();
    a.stream = RT::stream();
    RT::launch(op, {}, {output}, [&] { return elementwise(a); });
    return output;
  }

  static std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input,
                                             const Tensor& mean, const Tensor& invstd) {
    constexpr const char* op = "batchrenorm::backward_reduce";
    check_backward_reduce(op, grad_output, input, RT::kDevice, mean, invstd);
    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    if (input.numel() == 0) {
      return {at::zeros({input.size(1)}, mean.options()), at::zeros({input.size(1)}, mean.options())};
    }
    Tensor sum_dy = per_channel_empty(input), sum_dy_xhat = per_channel_empty(input);
    const Tensor dy = match_layout(grad_output, g);
    const Tensor mk = mean.contiguous(), ik = invstd.contiguous();
    GradParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.reduce_only = true;
    a.dy = dy.data_ptr();
    a.x = x.data_ptr();
    a.mean = mk.data_ptr();
    a.invstd = ik.data_ptr();
    a.sum_dy = sum_dy.data_ptr();
    a.sum_dy_xhat = sum_dy_xhat.data_ptr();
    a.stream = RT::stream();
    LaunchPlan plan;
    RT::check(op, plan_grad(a, &plan));
    RT::note_plan(op, plan);
    Tensor ws = workspace(input, plan.workspace_bytes);
    RT::launch(op, {}, {sum_dy, sum_dy_xhat, ws},
               [&] { return launch_grad(a, plan, ws.data_ptr()); });
    return {sum_dy, sum_dy_xhat};
  }

  static Tensor backward_input(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                        const Tensor& invstd, const Tensor& scale, const Tensor& mean_dy,
                        const Tensor& mean_dy_xhat) {
    constexpr const char* op = "batchrenorm::backward_input";
    check_backward_input(op, grad_output, input, RT::kDevice, mean, invstd, scale, mean_dy,
                         mean_dy_xhat);
    const typename RT::Guard guard(input.device());
    InputLayout g;
    const Tensor x = canonical(input, &g);
    Tensor grad_input = empty_output(input, g);
    if (input.numel() == 0) return grad_input;
    const Tensor dy = match_layout(grad_output, g);
    const Tensor p0 = mean.contiguous(), p1 = invstd.contiguous(), p2 = scale.contiguous();
    const Tensor p3 = mean_dy.contiguous(), p4 = mean_dy_xhat.contiguous();
    ElementwiseParams a{};
    a.dtype = dtype_of(input);
    a.layout = g;
    a.mode = ElementwiseMode::kBackwardInput;
    a.x = x.data_ptr();
    a.dy = dy.data_ptr();
    a.out = grad_input.data_ptr();
    a.p[0] = p0.data_ptr();
    a.p[1] = p1.data_ptr();
    a.p[2] = p2.data_ptr();
    a.p[3] = p3.data_ptr();
    a.p[4] = p4.data_ptr();
    a.stream = RT::stream();
    RT::launch(op, {}, {grad_input}, [&] { return elementwise(a); });
    return grad_input;
  }
};

template <class RT>
void register_kernels(torch::Library& m) {
  m.impl("forward_train", &Glue<RT>::forward_train);
  m.impl("forward_eval", &Glue<RT>::forward_eval);
  m.impl("backward", &Glue<RT>::backward);
  m.impl("backward_relu", &Glue<RT>::backward_relu);
  m.impl("backward.out", &Glue<RT>::backward_out);
  m.impl("backward_relu.out", &Glue<RT>::backward_relu_out);
  m.impl("batch_stats", &Glue<RT>::batch_stats);
  m.impl("normalize", &Glue<RT>::normalize);
  m.impl("backward_reduce", &Glue<RT>::backward_reduce);
  m.impl("backward_input", &Glue<RT>::backward_input);
}

}  // namespace cuda
}  // namespace batchrenorm
