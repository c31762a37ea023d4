// batchrenorm_schemas.h: the schemas of the batchrenorm ops, defined once for every library
// that registers them: `batchrenorm` (csrc/batchrenorm.cpp) and the CUDA emulator's test library
// (csrc/cuda/emulation/batchrenorm_emulated.cpp), which must take exactly the same arguments.
#pragma once

#include <torch/library.h>

#include <vector>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

namespace batchrenorm {

inline void define_ops(torch::Library& m) {
  // Every op reads any layout (channels_last in place, other strides through a copy) and gives
  // its outputs the layout memory_format_of(input) says, as the fakes do. flexible_layout lets
  // Inductor pass what it has: without it, a channels_last convolution output (Inductor's
  // choice on the CPU even in NCHW models) is copied to the eager strides first. All but
  // backward, whose grad_output has a constraint of its own (below).
  const std::vector<at::Tag> tags = {at::Tag::flexible_layout};
  // One fused training step: batch statistics, clip bounds from the step counter (read on the
  // device), r and d from the pre-update buffers, y = x * scale + shift, then the running
  // buffers and the counter are updated. Returns y and, in the statistics dtype (float32, or
  // float64 for float64 input), the per-channel mean, invstd = 1/sigma_B, r and d that
  // backward needs.
  //  - running_mean / running_var: both or neither. Neither: r = 1, d = 0 (BatchNorm).
  //  - num_batches_tracked: int64 scalar or None. None: the final bounds (r_max, d_max); momentum
  //    must then be a float. It is incremented when running_mean / running_var are given.
  //  - momentum None: cumulative average with factor 1 / (num_batches_tracked + 1).
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "float r_max, float d_max, int warmup_steps, int r_max_ramp_steps, int d_max_ramp_steps) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor r, Tensor d)", tags);
  // Inference with the running statistics: exactly nn.BatchNorm's eval.
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> Tensor", tags);
  // Backward of both forwards. train: mean and invstd are the batch's own statistics (a
  // training step), so dx gets BatchNorm's centring terms; otherwise they are constants (eval).
  // (The name and meaning of aten::native_batch_norm_backward's `train`.)
  // r and d None mean 1 and 0. output_mask picks (grad_input, grad_weight, grad_bias); an
  // entry that is false comes back as None.
  // No layout tag: a tag would override the layout constraint that batchrenorm_cuda/_inductor.py
  // registers with Inductor (grad_output in input's stride order, so that the kernel producing
  // the gradient writes it in the convolution's channels_last rather than our kernel
  // converting it). Without that registration Inductor applies its default for custom ops.
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "Tensor? r, Tensor? d, bool train, bool[3] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?)");
  // backward of relu(batch_renorm(input)) from ReLU's incoming gradient: backward with
  // grad_output zeroed where relu_output <= 0, as aten::threshold_backward(grad_output,
  // relu_output, 0) would give it (a NaN lets the gradient through), without writing that
  // masked gradient out. relu_output has input's shape and dtype. Inductor's graphs get it from
  // the rewrite in batchrenorm_cuda/_inductor.py; its layout constraint is backward's, for both
  // grad_output and relu_output.
  m.def(
      "backward_relu(Tensor grad_output, Tensor relu_output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, Tensor? r, Tensor? d, bool train, bool[3] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?)");
  // Their out= overloads: the same gradients written into given tensors, for Inductor, which
  // lowers a functional custom op to the overload tagged `out` whose other arguments match
  // (torch/_library/_out_variant.py) and passes buffers it plans and reuses, where the
  // functional op allocates three fresh outputs a call. An output whose mask entry is false is
  // left as it is. The tensors must have the functional outputs' shapes, dtypes and device;
  // any strides (those that are not the input's memory format, or that overlap an argument,
  // are written through a copy).
  // at::Tag::out and the lowering that reads it came with torch 2.13; before it the overloads
  // are there, untagged, and Inductor keeps the functional ops.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  const std::vector<at::Tag> out_tags = {at::Tag::out};
#else
  const std::vector<at::Tag> out_tags = {};
#endif
  m.def(
      "backward.out(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, Tensor? r, Tensor? d, bool train, bool[3] output_mask, *, "
      "Tensor(a!) grad_input, Tensor(b!) grad_weight, Tensor(c!) grad_bias) "
      "-> (Tensor(a!), Tensor(b!), Tensor(c!))", out_tags);
  m.def(
      "backward_relu.out(Tensor grad_output, Tensor relu_output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, Tensor? r, Tensor? d, bool train, bool[3] output_mask, *, "
      "Tensor(a!) grad_input, Tensor(b!) grad_weight, Tensor(c!) grad_bias) "
      "-> (Tensor(a!), Tensor(b!), Tensor(c!))", out_tags);

  // The building blocks of the fused ops, for SyncBatchRenorm, which merges statistics across
  // processes between them (as nn.SyncBatchNorm uses batch_norm_stats / _elemt / _reduce):
  //  batch_stats:     per-channel mean and M2 = sum((x - mean)^2), for Chan merges.
  //  normalize:       y = x * scale[c] + shift[c].
  //  backward_reduce: per-channel sum(dy) and sum(dy * xhat), xhat = (x - mean) * invstd.
  //  backward_input:  dx = scale[c] * (dy - mean_dy[c] - xhat * mean_dy_xhat[c]).
  // All per-channel tensors are in the statistics dtype; outputs keep the input's layout.
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor m2)", tags);
  m.def("normalize(Tensor input, Tensor scale, Tensor shift) -> Tensor", tags);
  m.def(
      "backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd) "
      "-> (Tensor sum_dy, Tensor sum_dy_xhat)", tags);
  m.def(
      "backward_input(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor scale, Tensor mean_dy, Tensor mean_dy_xhat) -> Tensor", tags);
}

}  // namespace batchrenorm
