"""Builds batchrenorm_cuda._C with torch.utils.cpp_extension.

A CUDAExtension when a CUDA toolkit and a CUDA build of torch are both present, a
CppExtension otherwise. Overrides (environment):
  BATCHRENORM_FORCE_CUDA=1   build the CUDA kernels even where no GPU is visible (the toolkit
                             and a CUDA build of torch are still required).
  BATCHRENORM_CPU_ONLY=1     never build the CUDA kernels.
Target architectures come from TORCH_CUDA_ARCH_LIST, as torch.utils.cpp_extension reads it.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _use_cuda() -> bool:
    if _flag("BATCHRENORM_CPU_ONLY"):
        return False
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if _flag("BATCHRENORM_FORCE_CUDA"):
        if not has_toolkit:
            raise RuntimeError(
                "BATCHRENORM_FORCE_CUDA=1 needs a CUDA toolkit (CUDA_HOME) and a CUDA build of "
                f"torch; found CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}"
            )
        return True
    return has_toolkit


def _sources(pattern: str):
    # Files built for an instruction-set extension (*_avx2.cpp) link last: the linker keeps the
    # first copy of an inline function that several files emit, and that copy must run on any CPU.
    paths = (os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    return sorted(paths, key=lambda p: (p.endswith("_avx2.cpp"), p))


def _extension():
    use_cuda = _use_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # at::parallel_for's OpenMP backend is inlined into the caller: without -fopenmp the
    # extension's loops would run on one thread.
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    link = ["-fopenmp"]
    if use_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        return CUDAExtension(
            "batchrenorm_cuda._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("BATCHRENORM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link,
        )
    return CppExtension(
        "batchrenorm_cuda._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    name="batchrenorm_cuda",
    packages=find_packages(include=["batchrenorm_cuda", "batchrenorm_cuda.*"]),
    # PEP 561: the package's annotations are for type checkers too.
    package_data={"batchrenorm_cuda": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
