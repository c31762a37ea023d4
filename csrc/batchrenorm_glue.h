// batchrenorm_glue.h: what the CPU glue (cpu/batchrenorm_cpu_glue.h) and the CUDA glue
// (cuda/batchrenorm_cuda_glue.h) do alike between the argument checks (batchrenorm_checks.h)
// and the kernels: see the input in one of the two layouts of batchrenorm.h's Geometry, give
// grad_output the same one, allocate outputs in the input's memory format (as
// batchrenorm_cuda._ops.memory_format_of and the fake kernels say), return masked-out
// gradients as None, and the out= overloads of the backwards.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "batchrenorm.h"
#include "batchrenorm_checks.h"

namespace batchrenorm {

// An input's Geometry, and the memory format its outputs take.
struct InputLayout : Geometry {
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t count() const { return N * S; }  // values per channel
};

// `x` in a layout the kernels read in place: itself when it is dense in its memory format (a
// copy only for other strides). Contiguous inputs without spatial extent (S == 1) are read as
// rows: the same memory, and the layout that vectorises along C.
inline at::Tensor canonical(const at::Tensor& x, InputLayout* g) {
  g->format = memory_format_of(x);
  g->N = x.size(0);
  g->C = x.size(1);
  g->S = 1;
  for (int64_t i = 2; i < x.dim(); ++i) g->S *= x.size(i);
  g->rows = g->format != at::MemoryFormat::Contiguous || g->S == 1;
  return x.contiguous(g->format);
}

// grad_output in the (canonical) input's layout, whatever layout it arrived in. Under
// torch.compile Inductor hands it over in that layout already (batchrenorm_cuda/_inductor.py).
inline at::Tensor match_layout(const at::Tensor& dy, const InputLayout& g) {
  return dy.contiguous(g.format);
}

inline at::Tensor empty_output(const at::Tensor& x, const InputLayout& g) {
  return at::empty(x.sizes(), x.options().memory_format(g.format));
}

// Masked-out gradients are None, as the schemas say (Tensor?), not undefined tensors.
inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

using OptTensor = std::optional<at::Tensor>;
using BackwardResult = std::tuple<OptTensor, OptTensor, OptTensor>;

// Where a backward writes its gradients: each undefined (allocate one) or a tensor of the
// output's shape, dtype and layout to write in place (an out= overload's argument).
struct BackwardOutputs {
  at::Tensor grad_input, grad_weight, grad_bias;
};

inline at::Tensor output_into(const at::Tensor& into, const at::Tensor& x, const InputLayout& g) {
  return into.defined() ? into : empty_output(x, g);
}

inline at::Tensor per_channel_into(const at::Tensor& into, const at::Tensor& x) {
  return into.defined() ? into : per_channel_empty(x);
}

namespace detail {

inline void check_out(const char* op, const char* name, const at::Tensor& out,
                      at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& input) {
  TORCH_CHECK(out.device() == input.device(), op, ": ", name, " is on ", out.device(),
              ", expected ", input.device(), " like input");
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, op, ": ", name, " must be ", dtype,
                   " (the dtype of the gradient it receives), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == sizes, op, ": ", name, " must have shape ", sizes,
                    " (the gradient it receives), got ", out.sizes());
}

// `out` written in place when it has the layout the kernels write and shares no memory with
// what they read; otherwise undefined (the kernel writes a new tensor, copied into `out`).
inline at::Tensor in_place_or_none(const at::Tensor& out, at::MemoryFormat format,
                                   std::initializer_list<at::Tensor> reads) {
  if (!out.is_contiguous(format)) return at::Tensor();
  // Storage first: get_overlap_status calls any strided tensor "too hard", even one that
  // shares no memory with `out` (a sliced input).
  for (const at::Tensor& t : reads)
    if (t.defined() && t.has_storage() && out.storage().is_alias_of(t.storage()) &&
        at::get_overlap_status(out, t) != at::MemOverlapStatus::No)
      return at::Tensor();
  return out;
}

inline void store(const OptTensor& computed, at::Tensor& out) {
  if (computed.has_value() && !computed->is_same(out)) out.copy_(*computed);
}

}  // namespace detail

// The out= overloads of backward and backward_relu (batchrenorm_schemas.h) on every backend:
// `run(outputs)` is the backend's functional backward writing into `outputs`.
template <typename Run>
std::tuple<at::Tensor&, at::Tensor&, at::Tensor&> backward_out(
    const char* op, const at::Tensor& input, std::array<bool, 3> output_mask,
    std::initializer_list<at::Tensor> reads, at::Tensor& grad_input, at::Tensor& grad_weight,
    at::Tensor& grad_bias, Run run) {
  const at::ScalarType stat = stat_type(input);
  const int64_t C = input.size(1);
  BackwardOutputs into;
  if (output_mask[0]) {
    detail::check_out(op, "grad_input", grad_input, input.sizes(), input.scalar_type(), input);
    into.grad_input = detail::in_place_or_none(grad_input, memory_format_of(input), reads);
  }
  if (output_mask[1]) {
    detail::check_out(op, "grad_weight", grad_weight, {C}, stat, input);
    into.grad_weight = detail::in_place_or_none(grad_weight, at::MemoryFormat::Contiguous, reads);
  }
  if (output_mask[2]) {
    detail::check_out(op, "grad_bias", grad_bias, {C}, stat, input);
    into.grad_bias = detail::in_place_or_none(grad_bias, at::MemoryFormat::Contiguous, reads);
  }
  const BackwardResult computed = run(into);
  detail::store(std::get<0>(computed), grad_input);
  detail::store(std::get<1>(computed), grad_weight);
  detail::store(std::get<2>(computed), grad_bias);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace batchrenorm
