// batchrenorm_glue.h: what the CPU glue (cpu/batchrenorm_cpu_glue.h) and the CUDA glue
// (cuda/batchrenorm_cuda_glue.h) do alike between the argument checks (batchrenorm_checks.h)
// and the kernels: see the input in one of the two layouts of batchrenorm.h's Geometry, give
// grad_output the same one, allocate outputs in the input's memory format (as
// batchrenorm_cuda._ops.memory_format_of and the fake kernels say), and return masked-out
// gradients as None.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

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

}  // namespace batchrenorm
