"""Builds batchrenorm_cuda._C with torch.utils.cpp_extension (README, "Install").

What gets built, first rule that applies:
  BATCHRENORM_CPU_ONLY=1        the CPU kernels only.
  no CUDA toolkit (nvcc under CUDA_HOME, or on PATH) or a CPU build of torch
                                the CPU kernels only (BATCHRENORM_FORCE_CUDA=1 makes this an error).
  a GPU visible, TORCH_CUDA_ARCH_LIST set, or BATCHRENORM_FORCE_CUDA=1
                                the CPU and the CUDA kernels.
  otherwise (toolkit, CUDA torch, no GPU, no TORCH_CUDA_ARCH_LIST)
                                the CPU kernels only, and the log says how to get the CUDA ones.
Architectures: TORCH_CUDA_ARCH_LIST as torch.utils.cpp_extension reads it; else the visible GPUs';
with neither (BATCHRENORM_FORCE_CUDA=1 on a machine without a GPU), the ones this torch was built
for that the toolkit's nvcc can target.

The C++ standard is torch's: no -std flag is passed, so BuildExtension adds the one its headers
need (C++17 up to torch 2.13, C++20 from 2.14).

The torch the extension is built against is written to batchrenorm_cuda/_build_info.py; at
import, an extension built for another torch release is not loaded (batchrenorm_cuda/_loader.py).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup

# Without build isolation the environment's setuptools builds, and before 77 it rejects
# pyproject.toml's SPDX `license` string with a schema error that does not say this.
if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:1]) < (77,):
    raise SystemExit(
        f"batchrenorm_cuda: the build needs setuptools>=77, found {setuptools.__version__}: "
        "pip install 'setuptools>=77' ninja (or build with isolation, which installs them)")


def _find_toolkit():
    """The CUDA toolkit's root when neither CUDA_HOME nor CUDA_PATH is set: where nvcc on PATH
    lives, following a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) to the real one.
    torch would take the wrapper's grandparent (/usr/local), which has no CUDA headers."""
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("latin-1")
            candidates += [os.path.dirname(os.path.dirname(w.strip("\"'")))
                           for w in head.split() if w.strip("\"'").endswith("/bin/nvcc")]
        except OSError:
            pass
    for root in candidates:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return root
    return None


if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and _find_toolkit():
    os.environ["CUDA_HOME"] = _find_toolkit()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # only without build isolation: pyproject.toml lists torch
    raise SystemExit(
        f"batchrenorm_cuda: the build needs torch, which does not import ({error}). Install torch "
        "first (pip install torch), or build with isolation (pip install ., without "
        "--no-build-isolation), which installs it in the build environment.") from error

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"batchrenorm_cuda setup: {message}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _nvcc():
    """The nvcc torch.utils.cpp_extension will run ($CUDA_HOME/bin/nvcc), or None. torch takes
    CUDA_HOME as given even when nothing is there, so the files are checked here."""
    if CUDA_HOME is None:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    headers = os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")
    return nvcc if os.access(nvcc, os.X_OK) and os.path.isfile(headers) else None


def _gpu_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken driver is no GPU, for the build
        return 0


def _use_cuda():
    """(build the CUDA kernels?, why) following the rules in the module docstring."""
    if _flag("BATCHRENORM_CPU_ONLY"):
        return False, "BATCHRENORM_CPU_ONLY=1"
    forced = _flag("BATCHRENORM_FORCE_CUDA")
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU build")
    if _nvcc() is None:
        missing.append(f"no CUDA toolkit (no nvcc under CUDA_HOME={CUDA_HOME!r})")
    if missing:
        if forced:
            raise SystemExit(
                "batchrenorm_cuda: BATCHRENORM_FORCE_CUDA=1 needs a CUDA build of torch and a CUDA "
                f"toolkit: {'; '.join(missing)}. Install a CUDA torch and the toolkit that matches "
                "it (set CUDA_HOME), or unset BATCHRENORM_FORCE_CUDA for a CPU-only build.")
        return False, "; ".join(missing)
    if forced:
        return True, "BATCHRENORM_FORCE_CUDA=1"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    gpus = _gpu_count()
    if gpus:
        return True, f"{gpus} GPU(s) visible"
    return False, ("no GPU visible and TORCH_CUDA_ARCH_LIST unset; set TORCH_CUDA_ARCH_LIST "
                   "(e.g. \"9.0\") or BATCHRENORM_FORCE_CUDA=1 to build the CUDA kernels")


def _default_arch_list() -> str:
    """For a CUDA build with no GPU and no TORCH_CUDA_ARCH_LIST: the architectures this torch was
    built for (so the extension runs wherever torch does), less those the local nvcc cannot
    target, PTX on the newest. torch's own default would be the visible GPUs', and with none it
    fails (an IndexError in _get_cuda_arch_flags)."""
    try:
        torch_archs = torch._C._cuda_getArchFlags().split()  # "sm_75 sm_80 ... sm_120"
    except Exception:  # noqa: BLE001 - older torch, or no such attribute
        torch_archs = []
    torch_archs = [a[3:] for a in torch_archs if re.fullmatch(r"sm_\d+a?", a)]
    if not torch_archs:
        torch_archs = ["75", "80", "86", "89", "90", "100", "120"]
    try:
        listed = subprocess.run([_nvcc(), "--list-gpu-arch"], capture_output=True, text=True,
                                check=True).stdout.split()
        nvcc_archs = {a[len("compute_"):] for a in listed if a.startswith("compute_")}
    except (OSError, subprocess.CalledProcessError):
        nvcc_archs = set(torch_archs)
    archs = sorted({a for a in torch_archs if a in nvcc_archs and not a.endswith("a")}, key=int)
    if not archs:
        raise SystemExit(f"batchrenorm_cuda: nvcc targets none of torch's architectures "
                         f"{torch_archs}; set TORCH_CUDA_ARCH_LIST")
    names = [f"{a[:-1]}.{a[-1]}" for a in archs]
    names[-1] += "+PTX"
    return ";".join(names)


def _cuda_library_includes():
    """Include folders for the CUDA libraries torch's headers include (cublas_v2.h, cusparse.h:
    ATen/cuda/CUDAContextLight.h) when the toolkit lacks them, e.g. nvcc alone: the nvidia-*
    packages that a CUDA build of torch depends on ship them (nvidia/cu13/include)."""
    if os.path.isfile(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia  # a namespace package of the nvidia-* wheels
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    found = sorted({os.path.dirname(h) for root in roots
                    for h in glob.glob(os.path.join(root, "*", "include", "cublas_v2.h"))})
    if not found:
        _log(f"warning: no cublas_v2.h in {CUDA_HOME}/include nor in nvidia-* packages; the "
             "compile of torch's CUDA headers will fail (install the toolkit's cuBLAS and "
             "cuSPARSE headers, or the nvidia-cublas and nvidia-cusparse packages)")
    return found


def _sources(pattern: str):
    # Files built for an instruction-set extension (*_avx2.cpp, *_avx512.cpp) link last: the
    # linker keeps the first copy of an inline function that several files emit, and that copy
    # must run on any CPU.
    paths = (os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    return sorted(paths, key=lambda p: (p.endswith(("_avx2.cpp", "_avx512.cpp")), p))


def _write_build_info(with_cuda: bool) -> None:
    """What _ops.py compares with the runtime torch before it loads _C. Rewritten only when it
    changes, so an unchanged rebuild leaves the tree as it was."""
    text = (
        "# Written by setup.py: the torch this build of _C is for. Not under version control.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )
    path = os.path.join(HERE, "batchrenorm_cuda", "_build_info.py")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def _extension():
    use_cuda, why = _use_cuda()
    _write_build_info(use_cuda)
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # at::parallel_for's OpenMP backend is inlined into the caller: without -fopenmp the
    # extension's loops would run on one thread. No -std: BuildExtension adds torch's.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not use_cuda:
        _log(f"building the CPU kernels only ({why}); torch {torch.__version__}")
        return CppExtension("batchrenorm_cuda._C", sources,
                            include_dirs=[os.path.join(HERE, "csrc")],
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not _gpu_count():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list()
        _log("no GPU and no TORCH_CUDA_ARCH_LIST: building for this torch's architectures")
    _log(f"building the CPU and CUDA kernels ({why}); torch {torch.__version__}, nvcc "
         f"{_nvcc()}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the GPUs)')}")
    # Every .cu and .cpp under csrc/cuda (not its emulation/ folder, which is test code).
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    library_includes = _cuda_library_includes()
    if library_includes:
        _log(f"CUDA library headers from {', '.join(library_includes)}")
    return CUDAExtension(
        "batchrenorm_cuda._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")] + library_includes,
        define_macros=[("BATCHRENORM_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=link,
    )


if shutil.which("ninja") is None:
    _log("ninja not found: torch compiles one file at a time (pip install ninja for a parallel "
         "build)")

setup(
    packages=find_packages(include=["batchrenorm_cuda", "batchrenorm_cuda.*"]),
    # PEP 561: the package's annotations are for type checkers too.
    package_data={"batchrenorm_cuda": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
