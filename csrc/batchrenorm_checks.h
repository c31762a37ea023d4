// batchrenorm_checks.h: what the CPU and CUDA glue share: the layout rule and the argument
// checks of the ops (batchrenorm_cuda.batch_renorm validates first in Python; these guard
// direct callers of torch.ops.batchrenorm.*). Torch-facing: only the glue files include it,
// never the kernels (csrc/cuda/*.cu stay torch-free, csrc/cpu/*_kernels_* stay ISA-specific).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace batchrenorm {

// The layout the kernels produce for an input of this layout, as
// batchrenorm_cuda._ops.memory_format_of says: channels_last(_3d) when the input is dense in
// it, else contiguous (other strides are made contiguous first).
inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Per-channel tensors (weight, bias, buffers, statistics) are float32, float64 for double input.
inline at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A Python None passed for a `Tensor` (not `Tensor?`) argument arrives as an undefined tensor.
inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a Tensor, got None");
}

inline void check_input(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  check_defined(op, "input", x);
  TORCH_CHECK(x.device().type() == device_type, op, ": input must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": input must have shape (N, C, *) of rank >= 2, got shape ",
              x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": input must be float32, float64, float16 or bfloat16, got ", t);
}

inline void check_per_channel(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& x) {
  check_defined(op, name, t);
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (C,) = (", C,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == stat_type(x), op, ": ", name, " must be ", stat_type(x),
              " for ", x.scalar_type(), " input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              x.device(), " like input");
}

inline void check_per_channel(const char* op, const char* name,
                              const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (present(t)) check_per_channel(op, name, *t, x);
}

inline void check_grad_output(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  check_defined(op, "grad_output", dy);
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": grad_output must have the input's shape ",
              x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": grad_output must be ",
              x.scalar_type(), " like input, got ", dy.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), op, ": grad_output is on ", dy.device(), ", expected ",
              x.device(), " like input");
}

struct TrainFlags {
  bool has_running;  // running_mean and running_var given
  bool has_step;     // num_batches_tracked given
};

// Every argument of forward_train except the one-value-per-channel rule, which needs the
// backend's view of the layout.
inline TrainFlags check_forward_train(
    const char* op, const at::Tensor& input, c10::DeviceType device_type,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps, double r_max, double d_max) {
  check_input(op, input, device_type);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  TrainFlags f{present(running_mean), present(num_batches_tracked)};
  TORCH_CHECK(f.has_running == present(running_var), op,
              ": running_mean and running_var must both be tensors or both be None");
  if (f.has_step) {
    const at::Tensor& step = *num_batches_tracked;
    TORCH_CHECK(step.scalar_type() == at::kLong && step.numel() == 1 &&
                    step.device() == input.device(),
                op, ": num_batches_tracked must be an int64 scalar tensor on ", input.device(),
                ", got ", step.scalar_type(), " of shape ", step.sizes(), " on ", step.device());
  }
  TORCH_CHECK(momentum.has_value() || f.has_step || !f.has_running, op,
              ": momentum=None (cumulative average) needs num_batches_tracked");
  // Written as !(ok) so that NaN fails, as in Python.
  TORCH_CHECK(!(momentum.has_value() && !(*momentum >= 0.0 && *momentum <= 1.0)), op,
              ": momentum must be in [0, 1] or None, got ", momentum.value_or(0.0));
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(r_max >= 1.0, op, ": r_max must be >= 1, got ", r_max);
  TORCH_CHECK(d_max >= 0.0, op, ": d_max must be >= 0, got ", d_max);
  return f;
}

}  // namespace batchrenorm
