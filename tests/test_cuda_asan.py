"""The emulated CUDA kernels under AddressSanitizer and UBSan: out-of-bounds global (tensor) and
shared-memory accesses, and undefined behaviour, in the kernels and their host code.

A subprocess runs a slice of tests/test_fused_kernels.py's and test_op_calls.py's emulated cases
with the ASan build of libbatchrenorm_cuda_emulation.so (BRN_CUDA_EMULATION_ASAN=1) and libasan
preloaded (python is not instrumented itself); any report fails the run."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# One case of each kind: every element size (bfloat16 is left out: it has float16's vector
# widths and index arithmetic, and its cases cost a quarter of the run) and layout, ranks 2-5,
# odd sizes, the ops called directly, many CTAs per channel.
# opcheck is left out: it checks the ops' registrations (schema, fakes, autograd), and the
# kernels it runs are the training_steps cases'. One random schedule (BRN_EMULATION_RANDOM_
# SCHEDULES): the indices a kernel touches do not depend on the schedule.
SLICE = ("(training_steps_and_eval or momentum_none or not_affine or building_blocks "
         "or no_poison or ops_match_cpu or other_sizes or each_check) and not bfloat16")


@pytest.mark.cuda_emulation
def test_emulated_kernels_under_address_sanitizer(cuda_emulation, tmp_path):
    # libstdc++ preloaded too: ASan intercepts __cxa_throw only if it is there at start-up, and
    # python itself does not link it.
    libs = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True,
                           check=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    assert all(os.path.isabs(lib) for lib in libs), f"runtime libraries not found: {libs}"
    asan_dir = os.path.join(os.path.dirname(HERE), "build", "cuda_emulation_asan")
    env = dict(os.environ, BRN_CUDA_EMULATION_ASAN="1", LD_PRELOAD=" ".join(libs),
               LD_LIBRARY_PATH=os.pathsep.join(
                   [asan_dir] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(
                       os.pathsep) if p]),
               BRN_REQUIRE_CUDA_EMULATION="1", BRN_EMULATION_RANDOM_SCHEDULES="1",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=99:log_path="
               + str(tmp_path / "asan"),
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98:log_path="
               + str(tmp_path / "ubsan"))
    # Built first, without libasan in the compilers' environment.
    subprocess.run([sys.executable, os.path.join(HERE, "cuda_emulation.py"), "--asan"],
                   check=True, capture_output=True)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",
         os.path.join(HERE, "test_fused_kernels.py"), os.path.join(HERE, "test_op_calls.py"),
         os.path.join(HERE, "test_cuda_emulator.py"),
         "-m", "cuda_emulation", "-k", SLICE,
         "--hypothesis-seed=0"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE), timeout=1800)
    out = run.stdout + run.stderr
    # The sanitizers' reports go to files (pytest's capture would swallow them).
    for report in sorted(tmp_path.glob("*san.*")):
        out += f"\n--- {report.name}\n" + report.read_text()[:20000]
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
    assert run.returncode == 0, out[-6000:]
    assert " passed" in out, out[-3000:]
