"""The op-boundary fuzzing of tests/fuzz_ops.py under an AddressSanitizer + UBSan build of the
CPU extension (`python tests/fuzz_ops.py --asan`): the extension's sources compiled with
-fsanitize=address,undefined into build/asan_cpu, then fuzz_ops.py in a subprocess with libasan
and libstdc++ preloaded (python itself is not instrumented), the ASan library standing in for
batchrenorm_cuda._C. Any sanitizer error fails the run."""
import os
import subprocess
import sys

import torch
from torch_build import torch_cxx_standard

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ASAN_DIR = os.path.join(ROOT, "build", "asan_cpu")


def build_asan() -> str:
    """batchrenorm_cuda._C compiled with -fsanitize=address,undefined into build/asan_cpu."""
    import sysconfig

    from torch.utils import cpp_extension

    os.makedirs(ASAN_DIR, exist_ok=True)
    lib = os.path.join(ASAN_DIR, "_C.so")
    sources = sorted(os.path.join(d, f) for d in (os.path.join(ROOT, "csrc"),
                                                 os.path.join(ROOT, "csrc", "cpu"))
                     for f in os.listdir(d) if f.endswith(".cpp"))
    headers = [os.path.join(d, f) for d in (os.path.join(ROOT, "csrc"),
                                           os.path.join(ROOT, "csrc", "cpu"))
               for f in os.listdir(d) if f.endswith(".h")]
    if os.path.exists(lib) and os.path.getmtime(lib) >= max(map(os.path.getmtime,
                                                                sources + headers)):
        return lib
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -O0: a third of the compile time of -O1, and the calls are small.
    flags = ["-std=" + torch_cxx_standard(), "-O0", "-g", "-fPIC", "-fopenmp",
             "-fno-omit-frame-pointer",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I" + os.path.join(ROOT, "csrc"),
             "-I" + sysconfig.get_paths()["include"]]
    flags += ["-isystem" + p for p in cpp_extension.include_paths()]
    procs, objs = [], []
    for src in sources:
        obj = os.path.join(ASAN_DIR, os.path.basename(src) + ".o")
        objs.append(obj)
        procs.append(subprocess.Popen(["g++", *flags, "-c", src, "-o", obj]))
        if len(procs) >= 2:
            assert procs.pop(0).wait() == 0, "asan build: compile failed"
    for p in procs:
        assert p.wait() == 0, "asan build: compile failed"
    # Object order as setup.py links them: the *_avx2 objects last.
    objs.sort(key=lambda o: (o.endswith("_avx2.cpp.o"), o))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    subprocess.run(["g++", "-shared", "-fsanitize=address,undefined", "-fopenmp", *objs,
                    "-L" + torch_lib, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
                    "-Wl,-rpath," + torch_lib, "-o", lib + ".tmp"], check=True)
    os.replace(lib + ".tmp", lib)
    return lib


def use_asan_extension() -> None:
    # Imported as batchrenorm_cuda._C before the package imports its own (one TORCH_LIBRARY
    # registration per process).
    import importlib.util

    spec = importlib.util.spec_from_file_location("batchrenorm_cuda._C",
                                                  os.path.join(ASAN_DIR, "_C.so"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["batchrenorm_cuda._C"] = module
    spec.loader.exec_module(module)


def run_under_asan(calls: int, seed: int) -> int:
    build_asan()
    libs = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True,
                           check=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    log = os.path.join(ASAN_DIR, "report")
    for f in os.listdir(ASAN_DIR):
        if f.startswith("report"):
            os.remove(os.path.join(ASAN_DIR, f))
    env = dict(os.environ, LD_PRELOAD=" ".join(libs), BRN_FUZZ_ASAN="1",
               # allocator_may_return_null: the huge cases must fail as allocation errors, as
               # they do without ASan, not abort.
               ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:exitcode=99:"
               f"allocator_may_return_null=1:log_path={log}",
               UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:exitcode=98:log_path={log}")
    run = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_ops.py"), "--calls", str(calls),
                          "--seed", str(seed)],
                         env=env, capture_output=True, text=True)
    # Only errors count: the log also gets a warning for each refused huge allocation.
    reports = [text for text in (open(os.path.join(ASAN_DIR, f)).read()
                                 for f in os.listdir(ASAN_DIR) if f.startswith("report"))
               if "ERROR: AddressSanitizer" in text or "runtime error:" in text]
    print(run.stdout[-3000:] + run.stderr[-3000:])
    for r in reports:
        print(r[:6000])
    clean = run.returncode == 0 and not reports
    print(f"fuzz ops (ASan+UBSan build of the CPU extension): {'clean' if clean else 'FAILED'}, "
          f"exit code {run.returncode}, {len(reports)} sanitizer reports")
    return 0 if clean else 1


