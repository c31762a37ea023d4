import pytest
import torch

import batchrenorm_cuda

requires_cuda = pytest.mark.skipif(
    not batchrenorm_cuda.extension_available("cuda"),
    reason="needs a CUDA GPU and the CUDA build of the extension",
)
requires_cpu_kernels = pytest.mark.skipif(
    not batchrenorm_cuda.extension_available("cpu"),
    reason="needs the compiled CPU kernels",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fused_backward(monkeypatch):
    """Compiled training backwards on our fused kernel (CPU layers otherwise get a generated
    one, _compiled.py), with Dynamo's caches reset first: parametrised tests compile the same
    function once a case, more times in one process than Dynamo's recompile limit (8) allows.
    A test wanting the default calls monkeypatch.undo()."""
    from batchrenorm_cuda import _compiled

    torch._dynamo.reset()
    monkeypatch.setattr(_compiled, "GENERATED_BACKWARD_ON_CPU", False)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda_emulation: the CUDA kernels executed on the CPU by the CUDA emulator")


@pytest.fixture(scope="session")
def cuda_emulation():
    """The emulated CUDA kernels (tests/cuda_emulation.py), built on first use. Without a CUDA
    toolkit's headers or Boost.Fiber they skip, unless BRN_REQUIRE_CUDA_EMULATION=1 (make test
    sets it), where they fail: CI must run them."""
    import os

    import cuda_emulation as emulation

    try:
        module = emulation.load()
    except Exception as error:  # noqa: BLE001 - any build failure
        if os.environ.get("BRN_REQUIRE_CUDA_EMULATION", "0") == "1":
            raise
        pytest.skip(f"CUDA emulation not built: {error}")
    emulation.schedules_from_environment(module)
    return module


@pytest.fixture(params=["reference", "fused", pytest.param(
    "cuda_emulated", marks=pytest.mark.cuda_emulation)])
def backend(request):
    """The `backend=` value for the public API (modules, batch_renorm): the reference, the
    fused CPU kernels, or the CUDA kernels on the emulator (backend="fused" with the emulated
    op namespace swapped in). test_fused_kernels.py overrides it with its own device fixture."""
    if request.param == "reference":
        yield "reference"
        return
    if not batchrenorm_cuda.extension_available("cpu"):
        pytest.skip("needs the compiled CPU kernels")
    if request.param == "fused":
        yield "fused"
        return
    from batchrenorm_cuda._testing import fused_ops_namespace

    request.getfixturevalue("cuda_emulation").set_device(16, 2)
    with fused_ops_namespace("batchrenorm_emulated_cuda"):
        yield "fused"


@pytest.fixture(scope="session")
def load_benchmark():
    """load(filename): a script of benchmarks/ imported as a module (benchmarks/ is a folder of
    scripts, not a package), once per session."""
    import importlib.util
    import os
    import sys

    loaded = {}
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")
    if folder not in sys.path:  # the scripts import each other (harness, networks, peers)
        sys.path.insert(0, folder)

    def load(filename: str):
        if filename not in loaded:
            path = os.path.join(folder, filename)
            name = "benchmark_" + filename[:-3]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[filename] = module
        return loaded[filename]

    return load
