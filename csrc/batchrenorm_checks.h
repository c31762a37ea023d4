// batchrenorm_checks.h: what the CPU and CUDA glue share: the layout rule and the argument
// checks of the ops. They are the only checks a fused call makes: batchrenorm_cuda.batch_renorm
// checks in Python only what the dispatcher cannot see (non-Tensor arguments, eval without
// running statistics), so the errors raise the exception types and read like the Python API's:
// ValueError for a shape or a range, TypeError for a dtype or a missing tensor, RuntimeError for
// a device, shapes as Python tuples and dtypes as torch.float32. Torch-facing: only the glue
// files include it, never the kernels (csrc/cuda/*.cu stay torch-free, csrc/cpu/*_kernels_*
// stay ISA-specific).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>

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

// A per-channel output of an input x: (C,) in the statistics dtype.
inline at::Tensor per_channel_empty(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(stat_type(x)).memory_format(
                                    at::MemoryFormat::Contiguous));
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Python's spelling of a shape: (3,), (4, 1), ().
inline std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// Python's name of a dtype: torch.float32, not Float.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A Python None passed for a `Tensor` (not `Tensor?`) argument arrives as an undefined tensor.
inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a Tensor, got None");
}

inline void check_input(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  check_defined(op, "input", x);
  TORCH_CHECK(x.device().type() == device_type, op, ": input must be a ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   op, ": input must be float32, float64, float16 or bfloat16, got ",
                   py_dtype(t));
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": input must have shape (N, C, *) of rank >= 2, got shape ",
                    py_shape(x.sizes()));
}

inline void check_per_channel(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& x) {
  check_defined(op, name, t);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", name,
                    " must have shape (C,) = (", C, ",), got ", py_shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == stat_type(x), op, ": ", name, " must be ",
                   py_dtype(stat_type(x)), " for ", py_dtype(x.scalar_type()), " input, got ",
                   py_dtype(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              x.device(), " like input");
}

inline void check_per_channel(const char* op, const char* name,
                              const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (present(t)) check_per_channel(op, name, *t, x);
}

// A tensor of input's shape, dtype and device (grad_output; relu_output of backward_relu).
inline void check_like_input(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have the input's shape ",
                    py_shape(x.sizes()), ", got ", py_shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must be ",
                   py_dtype(x.scalar_type()), " like input, got ", py_dtype(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              x.device(), " like input");
}

inline void check_grad_output(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  check_like_input(op, "grad_output", dy, x);
}

inline void check_eps(const char* op, double eps) {
  // Written as !(ok) so that NaN fails, as in Python.
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

// Training needs two values per channel for a variance (as torch.batch_norm says it).
inline void check_training_count(const char* op, int64_t values_per_channel,
                                 const at::Tensor& input) {
  TORCH_CHECK_VALUE(values_per_channel > 1, op,
                    ": Expected more than 1 value per channel when training, got input size ",
                    py_shape(input.sizes()));
}

// batch_stats (SyncBatchRenorm's building block) needs one value per channel for a mean.
inline void check_stats_count(const char* op, int64_t values_per_channel,
                              const at::Tensor& input) {
  TORCH_CHECK_VALUE(values_per_channel > 0, op,
                    ": expected at least 1 value per channel, got input size ",
                    py_shape(input.sizes()));
}

inline void check_forward_eval(const char* op, const at::Tensor& input,
                               c10::DeviceType device_type,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps) {
  check_input(op, input, device_type);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  check_eps(op, eps);
}

struct TrainFlags {
  bool has_running;  // running_mean and running_var given
  bool has_step;     // num_batches_tracked given
};

// Every argument of forward_train except the one-value-per-channel rule, which needs the
// backend's view of the layout (check_training_count).
inline TrainFlags check_forward_train(
    const char* op, const at::Tensor& input, c10::DeviceType device_type,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps, double r_max, double d_max) {
  check_input(op, input, device_type);
  check_eps(op, eps);
  TORCH_CHECK_VALUE(!(momentum.has_value() && !(*momentum >= 0.0 && *momentum <= 1.0)), op,
                    ": momentum must be in [0, 1] or None, got ", momentum.value_or(0.0));
  TORCH_CHECK_VALUE(r_max >= 1.0, op, ": r_max must be >= 1, got ", r_max);
  TORCH_CHECK_VALUE(d_max >= 0.0, op, ": d_max must be >= 0, got ", d_max);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  TrainFlags f{present(running_mean), present(num_batches_tracked)};
  TORCH_CHECK_VALUE(f.has_running == present(running_var), op,
                    ": running_mean and running_var must both be tensors or both be None");
  if (f.has_step) {
    const at::Tensor& step = *num_batches_tracked;
    TORCH_CHECK_TYPE(step.scalar_type() == at::kLong && step.numel() == 1, op,
                     ": num_batches_tracked must be an int64 scalar tensor, got ",
                     py_dtype(step.scalar_type()), " of shape ", py_shape(step.sizes()));
    TORCH_CHECK(step.device() == input.device(), op, ": num_batches_tracked is on ",
                step.device(), ", expected ", input.device(), " like input");
  }
  TORCH_CHECK_VALUE(momentum.has_value() || f.has_step || !f.has_running, op,
                    ": momentum=None (a cumulative average) needs the step counter "
                    "num_batches_tracked, which batch_renorm() does not take (the modules "
                    "BatchRenorm1d/2d/3d keep one); pass a float momentum");
  return f;
}

// The building blocks' and backward's checks, one function per op, called by every backend's
// glue (csrc/cpu/batchrenorm_cpu*.cpp, csrc/cuda/batchrenorm_cuda_glue.h).
inline void check_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                           c10::DeviceType device_type, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& r,
                           const std::optional<at::Tensor>& d) {
  check_input(op, input, device_type);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_per_channel(op, "r", r, input);
  check_per_channel(op, "d", d, input);
}

// backward_relu: backward's arguments and the ReLU output that masks grad_output.
inline void check_backward_relu(const char* op, const at::Tensor& grad_output,
                                const at::Tensor& relu_output, const at::Tensor& input,
                                c10::DeviceType device_type,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd, const std::optional<at::Tensor>& r,
                                const std::optional<at::Tensor>& d) {
  check_backward(op, grad_output, input, device_type, weight, mean, invstd, r, d);
  check_like_input(op, "relu_output", relu_output, input);
}

inline void check_normalize(const char* op, const at::Tensor& input, c10::DeviceType device_type,
                            const at::Tensor& scale, const at::Tensor& shift) {
  check_input(op, input, device_type);
  check_per_channel(op, "scale", scale, input);
  check_per_channel(op, "shift", shift, input);
}

inline void check_backward_reduce(const char* op, const at::Tensor& grad_output,
                                  const at::Tensor& input, c10::DeviceType device_type,
                                  const at::Tensor& mean, const at::Tensor& invstd) {
  check_input(op, input, device_type);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
}

inline void check_backward_input(const char* op, const at::Tensor& grad_output,
                                 const at::Tensor& input, c10::DeviceType device_type,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& scale, const at::Tensor& mean_dy,
                                 const at::Tensor& mean_dy_xhat) {
  check_backward_reduce(op, grad_output, input, device_type, mean, invstd);
  check_per_channel(op, "scale", scale, input);
  check_per_channel(op, "mean_dy", mean_dy, input);
  check_per_channel(op, "mean_dy_xhat", mean_dy_xhat, input);
}

}  // namespace batchrenorm
