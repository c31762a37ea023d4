// batchrenorm.cpp: the `batchrenorm` op namespace (schemas: batchrenorm_schemas.h), and the
// Python module stub.
//
// Backends register their kernels in mirrored files:
//   csrc/cpu/batchrenorm_cpu.cpp    TORCH_LIBRARY_IMPL(batchrenorm, CPU)
//   csrc/cuda/batchrenorm_cuda.cpp  TORCH_LIBRARY_IMPL(batchrenorm, CUDA)
// Autograd: batchrenorm_autograd.h (C++, the Autograd key). The fake kernels and the vmap
// rules: batchrenorm_cuda/_ops.py and _autograd.py.
#include <Python.h>
#include <torch/library.h>

#include "batchrenorm_autograd.h"
#include "batchrenorm_schemas.h"

namespace {
constexpr char kNamespace[] = "batchrenorm";
}  // namespace

extern "C" {
// Importing batchrenorm_cuda._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(batchrenorm, m) { batchrenorm::define_ops(m); }
TORCH_LIBRARY_IMPL(batchrenorm, Autograd, m) {
  batchrenorm::autograd::register_kernels<kNamespace>(m);
}
