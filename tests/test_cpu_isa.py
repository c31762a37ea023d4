"""Each build of the CPU kernels (csrc/cpu/batchrenorm_cpu_kernels_{base,avx2,avx512}.cpp) runs
the fused-vs-reference cases of test_fused_kernels.py, test_op_calls.py and test_backward_relu.py
(CPU backend).
The main test process uses the highest one this CPU and ATen allow; each lower one runs here,
in a process that BATCHRENORM_CPU_ISA forces to it, after checking that it took effect."""
import os
import subprocess
import sys

import pytest

import batchrenorm_cuda as brn

HERE = os.path.dirname(os.path.abspath(__file__))
ISAS = ("base", "avx2", "avx512")  # lowest first

pytestmark = pytest.mark.skipif(not brn.extension_available("cpu"),
                                reason="the fused CPU kernels are not built")

_CHILD = """
import sys
import pytest
from batchrenorm_cuda import _ops
assert _ops._C.cpu_kernels_isa() == sys.argv[1], (_ops._C.cpu_kernels_isa(), sys.argv[1])
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", sys.argv[2],
                      *sys.argv[3:],
                      "-k", "cpu and (training_steps or not_affine or momentum_none "
                            "or without_running_stats or large_inputs or ops_match "
                            "or masked_gradient)"]))
"""


def _isa_in(env_overrides) -> str:
    env = dict(os.environ, **env_overrides)
    code = "from batchrenorm_cuda import _ops; print(_ops._C.cpu_kernels_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, timeout=300).stdout.strip()


def test_the_isa_is_reported():
    assert brn._ops._C.cpu_kernels_isa() in ISAS


def test_the_isa_is_at_most_atens():
    # Like with like: ours follows ATen's own choice down (ATEN_CPU_CAPABILITY lowers both).
    ours = brn._ops._C.cpu_kernels_isa()
    if ours == "base":
        pytest.skip("the portable kernels are the only ones on this CPU")
    assert _isa_in({"ATEN_CPU_CAPABILITY": "default"}) == "base"
    assert _isa_in({"ATEN_CPU_CAPABILITY": "avx2"}) == "avx2"


@pytest.mark.parametrize("isa", ISAS[:-1])
def test_lower_isa_kernels_match_the_reference(isa, request):
    if ISAS.index(isa) >= ISAS.index(brn._ops._C.cpu_kernels_isa()):
        pytest.skip(f"the main test process runs {brn._ops._C.cpu_kernels_isa()} already")
    env = dict(os.environ, BATCHRENORM_CPU_ISA=isa)
    files = [os.path.join(HERE, f) for f in ("test_fused_kernels.py", "test_op_calls.py",
                                              "test_backward_relu.py")]
    # The parent's -m (make test-torch deselects the emulated CUDA kernels) holds in the child.
    markexpr = request.config.getoption("markexpr") or ""
    run = subprocess.run([sys.executable, "-c", _CHILD, isa, markexpr, *files],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
