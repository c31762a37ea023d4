"""The portable CPU kernels (csrc/cpu/batchrenorm_cpu_kernels_base.cpp) run on an AVX2 machine
only when BATCHRENORM_CPU_ISA=base forces them: this runs the fused-vs-reference cases of
test_fused_kernels.py (CPU backend) in a process that does, after checking it took effect."""
import os
import subprocess
import sys

import pytest

import batchrenorm_cuda as brn

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not brn.extension_available("cpu"),
                                reason="the fused CPU kernels are not built")

_CHILD = """
import sys
import pytest
from batchrenorm_cuda import _ops
assert _ops._C.cpu_kernels_isa() == "base", _ops._C.cpu_kernels_isa()
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", sys.argv[1],
                      "-k", "cpu and (training_steps or not_affine or momentum_none "
                            "or without_running_stats or large_inputs or ops_match)"]))
"""


def test_the_isa_is_reported():
    assert brn._ops._C.cpu_kernels_isa() in ("avx2", "base")


def test_portable_kernels_match_the_reference():
    env = dict(os.environ, BATCHRENORM_CPU_ISA="base")
    run = subprocess.run([sys.executable, "-c", _CHILD,
                          os.path.join(HERE, "test_fused_kernels.py")],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
