// batchrenorm.cpp: the `batchrenorm` op namespace (schemas: batchrenorm_schemas.h), and the
// Python module stub.
//
// Backends register their kernels in mirrored files:
//   csrc/cpu/batchrenorm_cpu.cpp (forwards), batchrenorm_cpu_backward.cpp (backwards)
//                                   TORCH_LIBRARY_IMPL(batchrenorm, CPU)
//   csrc/cuda/batchrenorm_cuda.cpp  TORCH_LIBRARY_IMPL(batchrenorm, CUDA)
// Autograd: batchrenorm_autograd.h (C++, the Autograd key). The fake kernels and the vmap
// rules: batchrenorm_cuda/_ops.py and _vmap.py.
#include <Python.h>
#include <torch/library.h>

#include "batchrenorm_autograd.h"
#include "batchrenorm_schemas.h"

namespace {
constexpr char kNamespace[] = "batchrenorm";
}  // namespace

namespace batchrenorm::cpu {
const char* kernels_isa();  // csrc/cpu/batchrenorm_cpu.cpp
}  // namespace batchrenorm::cpu

namespace {
PyObject* cpu_kernels_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(batchrenorm::cpu::kernels_isa());
}
PyMethodDef methods[] = {
    {"cpu_kernels_isa", cpu_kernels_isa, METH_NOARGS,
     "The instruction set of the CPU kernels: 'avx512', 'avx2' or 'base' (the portable "
     "loops); at most ATen's own, and lowered by BATCHRENORM_CPU_ISA=avx2 or base."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing batchrenorm_cuda._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(batchrenorm, m) { batchrenorm::define_ops(m); }
TORCH_LIBRARY_IMPL(batchrenorm, Autograd, m) {
  batchrenorm::autograd::register_kernels<kNamespace>(m);
}
