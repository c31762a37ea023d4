// batchrenorm_autograd.h: the autograd of forward_train and forward_eval, registered for the
// Autograd key of each library with these schemas (as PyTorch's own ops have it), so that a
// training call from Python is one dispatcher call: no Python autograd.Function, no Python
// argument walk. Shared by `batchrenorm` (csrc/batchrenorm.cpp) and the CUDA emulator's library
// (csrc/cuda/emulation/batchrenorm_emulated.cpp), each registering it for its own namespace.
//
// The kernels are written as PyTorch's generated ones are (VariableType's native_batch_norm and
// its NativeBatchNormBackward0 node): when a graph is recorded, one backward Node with the saved
// tensors as SavedVariables and edges to input, weight and bias; otherwise (no grad mode, or no
// input requiring grad) a plain call below autograd. A torch::autograd::Function does the same
// with more work per call (input and output VariableInfo, a saved_data map, the
// non-differentiable set, zero-filled grads for the statistics outputs), which at RL layer sizes
// was a visible part of a step.
//
// r and d are constants for autograd, so the training backward is BatchNorm's with weight * r
// as the scale. It runs the fused `backward` op, except when the backward itself must be
// differentiable (grad mode on in backward: create_graph=True): then it is written in ATen ops,
// with the batch statistics recomputed from the input so that a second derivative flows through
// them (the saved ones are constants). Under a torch.func transform or with a forward-mode AD
// tangent the output is computed in ATen ops instead (composite_*_output), which those
// differentiate. torch.func.vmap rules live in Python (batchrenorm_cuda/_autograd.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batchrenorm_checks.h"

namespace batchrenorm {
namespace autograd {

namespace ag = torch::autograd;
using at::Tensor;
using ag::variable_list;
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

// The batch statistics in ATen ops with the kernels' numerics (batchrenorm.h, the CUDA kernels'
// shift): gathered on x - shift, shift each channel's first value (a constant for autograd), so
// a channel with |mean| >> std keeps its centred values exact and its mean beyond float
// precision; and the non-finite policy, an unusable channel (mean or variance not finite) gets
// a NaN invstd, so its output and gradients are NaN. Differentiable in x, for the composite
// paths below.
struct CompositeStats {
  Tensor centred;  // x - mean, in the statistics dtype
  Tensor invstd;   // keepdim, NaN where the statistics are unusable
};

inline CompositeStats composite_stats(const Tensor& x, double eps) {
  const auto dims = reduce_dims(x);
  Tensor first = x.detach().select(0, 0);
  while (first.dim() > 1) first = first.select(1, 0);
  const Tensor shifted = x - first.view(channel_shape(x));
  const Tensor centred = shifted - shifted.mean(dims, /*keepdim=*/true);
  const Tensor var = centred.square().mean(dims, /*keepdim=*/true);
  const Tensor usable = at::isfinite(shifted.mean(dims, /*keepdim=*/true)) & at::isfinite(var);
  const Tensor invstd = at::where(usable, at::rsqrt(var + eps),
                                  at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                           var.options()));
  return {centred, invstd};
}

inline std::array<Tensor, 3> composite_train_backward(const Tensor& dy, const Tensor& input,
                                                      const Tensor& weight, const Tensor& r,
                                                      const Tensor& d, double eps,
                                                      std::array<bool, 3> mask) {
  const auto sdt = stat_type(input);
  const Tensor x = input.to(sdt), gy = dy.to(sdt);
  const auto dims = reduce_dims(x);
  const auto shape = channel_shape(x);
  const auto [centred, invstd] = composite_stats(x, eps);
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

// Whether a torch.func transform is active: then the output is written in ATen ops, which the
// transform's levels differentiate, rather than given a node of ours. The test is the one
// torch::autograd::Function makes before it refuses to run under a transform (it throws);
// ATen/functorch/DynamicLayer.h, which says it directly, is not usable from an extension (it
// needs nlohmann/json). Throws only under a transform, the slow path anyway.
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

// The training output with r and d as constants, from the input, with the kernels' numerics.
inline Tensor composite_train_output(const Tensor& input, const OptTensor& weight,
                                     const OptTensor& bias, const Tensor& r, const Tensor& d,
                                     double eps) {
  const Tensor x = input.to(stat_type(input));
  const auto shape = channel_shape(x);
  const auto [centred, invstd] = composite_stats(x, eps);
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

// The kernels advance the step counter through its pointer: bump its version as the add_(1) of
// nn.BatchNorm does (and so refuse an inference-mode counter outside inference mode, as it
// does). The running buffers' versions are left as native_batch_norm leaves them, so that code
// which works with nn.BatchNorm works here; nothing of ours reads them after the step (the eval
// node saves its own copies).
inline void bump_counter_version(const OptTensor& running_mean,
                                 const OptTensor& num_batches_tracked) {
  // Without running statistics the counter does not advance.
  if (present(running_mean) && present(num_batches_tracked)) {
    num_batches_tracked->unsafeGetTensorImpl()->bump_version();
  }
}

// A Node handle as this torch's autograd holds one: std::shared_ptr before torch 2.13,
// c10::intrusive_ptr since.
using NodePtr = decltype(ag::Edge::function);

template <typename N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<ag::Node>>) {
    // deleteNode (found by argument-dependent lookup, so only where it exists) frees a long
    // chain of nodes without deep recursion, as the generated nodes are freed.
    return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<N>();
  }
}

// What both backward nodes share: edges 0, 1, 2 to input, weight and bias (an invalid edge for
// an absent one, for which task_should_compute_output says false).
struct BackwardNode : public ag::Node {
  ag::SavedVariable input_, weight_;

  std::array<bool, 3> output_mask() const {
    return {task_should_compute_output(0), task_should_compute_output(1),
            task_should_compute_output(2)};
  }
  static variable_list grads_of(std::tuple<OptTensor, OptTensor, OptTensor> g) {
    auto& [gi, gw, gb] = g;
    return {gi.value_or(Tensor()), gw.value_or(Tensor()), gb.value_or(Tensor())};
  }
  static variable_list grads_of(const std::array<Tensor, 3>& g) { return {g[0], g[1], g[2]}; }
};

template <const char* NS>
struct TrainBackward : public BackwardNode {
  ag::SavedVariable mean_, invstd_, r_, d_;  // the batch's statistics, r and d: constants
  double eps = 0.0;  // the differentiable backward recomputes the statistics

  std::string name() const override { return "BatchRenormTrainBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* v : {&input_, &weight_, &mean_, &invstd_, &r_, &d_}) v->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor& dy = grads[0];
    const auto mask = output_mask();
    if (!dy.defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(3);
    const Tensor input = input_.unpack(), weight = weight_.unpack(), r = r_.unpack(),
                 d = d_.unpack();
    if (at::GradMode::is_enabled()) {
      return grads_of(composite_train_backward(dy, input, weight, r, d, eps, mask));
    }
    return grads_of(Ops<NS>::backward().call(dy, input, optional_of(weight), mean_.unpack(),
                                             invstd_.unpack(), r, d, true, mask));
  }
};

template <const char* NS>
struct EvalBackward : public BackwardNode {
  // Copies of running_mean and 1 / sqrt(running_var + eps) as the forward read them: a training
  // step may update the buffers in place before this backward runs (an RL actor loss taken
  // through its critic in eval mode, then a critic step), and the gradient must be that of the
  // function the forward computed. (nn.BatchNorm reads the updated buffers there.)
  ag::SavedVariable mean_, invstd_;

  std::string name() const override { return "BatchRenormEvalBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* v : {&input_, &weight_, &mean_, &invstd_}) v->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor& dy = grads[0];
    const auto mask = output_mask();
    if (!dy.defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(3);
    const Tensor input = input_.unpack(), weight = weight_.unpack(), mean = mean_.unpack(),
                 invstd = invstd_.unpack();
    if (at::GradMode::is_enabled()) {
      return grads_of(composite_eval_backward(dy, input, weight, mean, invstd, mask));
    }
    return grads_of(Ops<NS>::backward().call(dy, input, optional_of(weight), mean, invstd,
                                             std::nullopt, std::nullopt, false, mask));
  }
};

inline bool has_fw_grad(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  return ag::isFwGradDefined(input) || ag::isFwGradDefined(weight) ||
         ag::isFwGradDefined(bias);
}

// A new node of type N, held by *holder, with its edges and the saved tensors both kinds keep.
template <typename N>
N* new_backward_node(NodePtr* holder, const Tensor& input, const OptTensor& weight,
                     const OptTensor& bias) {
  *holder = make_node<N>();
  auto* node = static_cast<N*>(holder->get());
  node->set_next_edges(ag::collect_next_edges(input, weight, bias));
  node->input_ = ag::SavedVariable(input, /*is_output=*/false);
  node->weight_ = ag::SavedVariable(weight, /*is_output=*/false);
  return node;
}

template <const char* NS>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps, double r_max,
    double d_max, int64_t warmup_steps, int64_t r_max_ramp_steps, int64_t d_max_ramp_steps) {
  // A Python None for a `Tensor` argument arrives undefined; named here, before anything asks
  // it for its device ("tensor does not have a device").
  static const std::string op = std::string(NS) + "::forward_train";
  check_defined(op.c_str(), "input", input);
  const bool composite = functorch_active() || has_fw_grad(input, weight, bias);
  const bool record = !composite && ag::compute_requires_grad(input, weight, bias);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  {
    at::AutoDispatchBelowAutograd guard;
    out = Ops<NS>::forward_train().call(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, momentum, eps, r_max, d_max,
                                        warmup_steps, r_max_ramp_steps, d_max_ramp_steps);
  }
  bump_counter_version(running_mean, num_batches_tracked);
  auto& [output, mean, invstd, r, d] = out;
  if (composite) {
    // The fused op gave the statistics, r, d and the buffer update; the output is recomputed
    // in ATen ops, for the transform (or forward AD) to differentiate.
    output = composite_train_output(input, weight, bias, r, d, eps);
  } else if (record) {
    NodePtr holder;
    auto* node = new_backward_node<TrainBackward<NS>>(&holder, input, weight, bias);
    node->eps = eps;
    node->mean_ = ag::SavedVariable(mean, /*is_output=*/false);
    node->invstd_ = ag::SavedVariable(invstd, /*is_output=*/false);
    node->r_ = ag::SavedVariable(r, /*is_output=*/false);
    node->d_ = ag::SavedVariable(d, /*is_output=*/false);
    ag::set_history(output, holder);  // mean, invstd, r and d stay non-differentiable
  }
  return out;
}

template <const char* NS>
Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps) {
  static const std::string op = std::string(NS) + "::forward_eval";
  check_defined(op.c_str(), "input", input);
  check_defined(op.c_str(), "running_mean", running_mean);
  check_defined(op.c_str(), "running_var", running_var);
  if (functorch_active() || has_fw_grad(input, weight, bias)) {
    return composite_eval_output(input, weight, bias, running_mean, running_var, eps);
  }
  Tensor output;
  {
    at::AutoDispatchBelowAutograd guard;
    output = Ops<NS>::forward_eval().call(input, weight, bias, running_mean, running_var, eps);
  }
  if (ag::compute_requires_grad(input, weight, bias)) {
    NodePtr holder;
    auto* node = new_backward_node<EvalBackward<NS>>(&holder, input, weight, bias);
    node->mean_ = ag::SavedVariable(running_mean.clone(), /*is_output=*/false);
    node->invstd_ = ag::SavedVariable(at::rsqrt(running_var + eps), /*is_output=*/false);
    ag::set_history(output, holder);
  }
  return output;
}

// TORCH_LIBRARY_IMPL(<NS>, Autograd, m) { autograd::register_kernels<kNamespace>(m); }
template <const char* NS>
void register_kernels(torch::Library& m) {
  m.impl("forward_train", &forward_train<NS>);
  m.impl("forward_eval", &forward_eval<NS>);
}

}  // namespace autograd
}  // namespace batchrenorm
