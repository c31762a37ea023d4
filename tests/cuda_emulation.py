"""Builds and loads the CUDA emulation (csrc/cuda/emulation): the CUDA kernels of
csrc/cuda/*.cu compiled by g++ against the emulator, behind the CUDA glue, as
the op namespace torch.ops.batchrenorm_emulated_cuda on CPU tensors.

    python tests/cuda_emulation.py [--asan]     build only (make test-cuda-emulation does it)

Two libraries: libbatchrenorm_cuda_emulation.so (kernels + emulator, torch-free, Boost.Fiber) and
the torch extension with the glue that links it. `--asan` also builds an AddressSanitizer + UBSan
variant of the first, which a process with libasan preloaded picks up through LD_LIBRARY_PATH
(tests/test_cuda_asan.py).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(CSRC, "cuda", "emulation")
# Every torch-free kernel source (the glue, batchrenorm_cuda.cpp, is the GPU build's only).
KERNELS = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
EMULATOR = [os.path.join(EMU, f) for f in ("emulator.cpp", "device.cpp", "counters.cpp",
                                           "selftest_kernels.cu")]
NAMESPACE = "batchrenorm_emulated_cuda"


def cuda_include() -> str:
    """The toolkit's headers (cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h): types and NVIDIA's
    half/bfloat16 rounding. Found from CUDA_HOME or nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [home] if home else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script (exec /path/bin/nvcc "$@")
            head = f.read(512).decode("latin-1")
        for word in head.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(os.path.dirname(os.path.dirname(word.strip('"'))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    raise RuntimeError("cuda emulation: no CUDA toolkit headers found (set CUDA_HOME); the "
                       "emulated kernels need cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h")


def asan_enabled() -> bool:
    return os.environ.get("BRN_CUDA_EMULATION_ASAN", "0") == "1"


def build_dir(asan: bool) -> str:
    return os.path.join(ROOT, "build", "cuda_emulation_asan" if asan else "cuda_emulation")


def _sources():
    deps = KERNELS + [os.path.join(CSRC, "batchrenorm.h")]
    for pattern in ("*.h", "*.cuh"):
        deps += glob.glob(os.path.join(CSRC, "cuda", pattern))
    for d, _, files in os.walk(EMU):
        deps += [os.path.join(d, f) for f in files]
    return deps


@contextlib.contextmanager
def _build_lock(out_dir: str):
    # pytest-xdist workers (make test) build on first use, each in its own process.
    with open(os.path.join(out_dir, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_library(asan: bool) -> str:
    """libbatchrenorm_cuda_emulation.so: the kernel source as C++ plus the emulator."""
    out_dir = build_dir(asan)
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, "libbatchrenorm_cuda_emulation.so")
    with _build_lock(out_dir):
        if os.path.exists(lib) and os.path.getmtime(lib) >= max(map(os.path.getmtime, _sources())):
            return lib
        flags = ["-std=c++17", "-O2", "-g", "-fPIC", "-Wall", "-Wextra", "-Werror",
                 "-Wno-unknown-pragmas", "-I" + os.path.join(EMU, "include"), "-I" + CSRC,
                 "-I" + EMU, "-isystem", cuda_include(),
                 # As nvcc gets them from torch's BuildExtension: half types without implicit
                 # conversions, so the kernels' explicit ones are what runs.
                 "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
        if asan:
            flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                      "-fno-sanitize-recover=undefined"]
        # The compiles side by side (at most MAX_JOBS at once): the kernels take most of the time.
        objs, compiles, failed = [], [], []
        jobs = max(1, int(os.environ.get("MAX_JOBS", "0")) or len(KERNELS + EMULATOR))
        for src in KERNELS + EMULATOR:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            if len(compiles) >= jobs:
                done = compiles.pop(0)
                if done.wait() != 0:
                    failed.append(done.args)
            compiles.append(subprocess.Popen(["g++", *flags, "-x", "c++", "-c", src, "-o", obj]))
            objs.append(obj)
        failed += [c.args for c in compiles if c.wait() != 0]
        if failed:
            raise RuntimeError(f"cuda emulation: compile failed: {failed[0]}")
        tmp = lib + ".tmp"
        subprocess.run(["g++", "-shared", *(["-fsanitize=address,undefined"] if asan else []),
                        *objs, "-o", tmp, "-lboost_fiber", "-lboost_context", "-ldl",
                        "-pthread"], check=True)
        os.replace(tmp, lib)
    return lib


def load(verbose: bool = False):
    """Builds what is stale and loads the extension (registers torch.ops.batchrenorm_emulated_cuda).

    With BRN_CUDA_EMULATION_ASAN=1 the process must have libasan preloaded and the ASan library
    built (`--asan`) and first on LD_LIBRARY_PATH, which overrides the extension's RUNPATH."""
    lib = build_library(False)
    if asan_enabled():
        asan_lib = os.path.join(build_dir(True), os.path.basename(lib))
        if not os.path.isfile(asan_lib) or build_dir(True) not in os.environ.get(
                "LD_LIBRARY_PATH", "").split(os.pathsep):
            raise RuntimeError("cuda emulation: BRN_CUDA_EMULATION_ASAN=1 needs the ASan build "
                               f"({asan_lib}, from `{__file__} --asan`) on LD_LIBRARY_PATH")
    from torch.utils.cpp_extension import load as load_extension

    out_dir = build_dir(False)
    module = load_extension(
        name="batchrenorm_emulated_cuda",
        sources=[os.path.join(EMU, "batchrenorm_emulated.cpp")],
        extra_include_paths=[CSRC, EMU, cuda_include()],
        # No -std: cpp_extension adds the one torch's headers need (C++20 from torch 2.14).
        extra_cflags=["-O2"],
        extra_ldflags=["-L" + out_dir, "-lbatchrenorm_cuda_emulation",
                       "-Wl,--enable-new-dtags,-rpath," + out_dir],
        build_directory=out_dir,
        verbose=verbose,
    )
    import batchrenorm_cuda._vmap as _vmap
    import batchrenorm_cuda._ops as _ops

    _ops.register_fakes(NAMESPACE)
    _vmap.register_vmaps(NAMESPACE)
    return module


@contextlib.contextmanager
def random_schedules(module, seeds):
    """Run the emulated launches inside under the in-order schedule and `seeds` only (by default
    every launch also runs under 3 random schedules, which must agree bit for bit)."""
    saved = module.random_schedules()
    module.set_random_schedules(list(seeds))
    try:
        yield
    finally:
        module.set_random_schedules(saved)


@contextlib.contextmanager
def launch_log(module):
    """Collects the emulated launches made inside the block, each run under the in-order
    schedule only (counting needs no reruns, and large tensors make them slow): yields a list
    that is filled, on leaving the block, with their launch_log() records (dicts: kernel, op,
    grid, block, shared_bytes, cooperative, ok, seed, device, ctas, grid_syncs, bytes_read,
    bytes_written, max_cta_bytes)."""
    records = []
    module.reset_launch_log()
    with random_schedules(module, []):
        yield records
    records.extend(r for r in module.launch_log() if r["seed"] == 0)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "rows": torch.contiguous_format}


def count_train_step(module, shape, layout, dtype, seed=0):
    """A training step's fused ops on the current emulated device, as the autograd calls them
    (forward_train with weight, bias and running statistics; backward with the batch's
    statistics and every gradient), and backward_relu as a compiled graph calls it in backward's
    place when a ReLU follows: {"forward_train": records, "backward": records, "backward_relu":
    records, "tensor_bytes": bytes of one tensor of `shape`, "channels": C}. `layout`:
    "contiguous", "channels_last" (4-D) or "rows" ((N, C))."""
    from batchrenorm_cuda._testing import make_params

    ops = getattr(torch.ops, NAMESPACE)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    C = shape[1]
    weight, bias, running_mean, running_var = make_params(C, dtype, generator=g)
    step = torch.zeros((), dtype=torch.long)
    out = {"tensor_bytes": x.nbytes, "channels": C}
    with launch_log(module) as records:
        y, mean, invstd, r, d = ops.forward_train(x, weight, bias, running_mean, running_var, step,
                                                  0.01, 1e-5, 3.0, 5.0, 0, 0, 0)
    out["forward_train"] = _with_plan(records, module.last_plan())
    with launch_log(module) as records:
        ops.backward(dy, x, weight, mean, invstd, r, d, True, [True, True, True])
    out["backward"] = _with_plan(records, module.last_plan())
    relu_output = y.relu()
    with launch_log(module) as records:
        ops.backward_relu(dy, relu_output, x, weight, mean, invstd, r, d, True, [True, True, True])
    out["backward_relu"] = _with_plan(records, module.last_plan())
    return out


def _with_plan(records, plan):
    """Each op is one launch; its record gets the plan the host chose (regime, items, ...)."""
    return [dict(r, plan=plan) for r in records]


def schedules_from_environment(module) -> None:
    """BRN_EMULATION_RANDOM_SCHEDULES="1,2" sets the random schedules of a whole run (the
    AddressSanitizer run uses one: a memory error does not need a second schedule to show)."""
    seeds = os.environ.get("BRN_EMULATION_RANDOM_SCHEDULES")
    if seeds:
        module.set_random_schedules([int(s) for s in seeds.split(",")])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asan", action="store_true", help="the AddressSanitizer build")
    args = parser.parse_args()
    load(verbose=True)
    if args.asan:
        build_library(True)
    print("cuda emulation built in", build_dir(args.asan), file=sys.stderr)
