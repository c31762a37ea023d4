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
