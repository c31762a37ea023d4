"""batchrenorm::backward_relu, the backward of relu(batch_renorm(x)) from ReLU's incoming gradient
(what torch.compile's graphs call after batchrenorm_cuda/_inductor.py's rewrite), on every
backend: backward's results on threshold_backward's masked gradient, bit for bit, in each
layout, rank and dtype and both forms (training, eval); the mask's edge values; its checks.
The rewrite itself is tested in test_compile.py; opcheck, the CPU comparison and the poisoned
outputs in test_op_calls.py (fused_cases.op_samples includes backward_relu)."""
import pytest
import torch

from batchrenorm_cuda import reference
from batchrenorm_cuda._testing import DTYPES

import fused_cases
from fused_cases import backend_fixture  # noqa: F401 - autouse: every test on every backend

# Each path of the CPU and CUDA backwards: NCHW planes fused per channel (C >= 8) or not, with
# and without vector tails (7 x 7), channels_last (rows) with C a multiple of the vector width
# or not, rank 2, 3 and 5, and a strided (sliced) input.
CASES = [
    ((4, 16, 7, 7), "contiguous"),
    ((3, 5, 8, 8), "contiguous"),
    ((3, 16, 6, 7), "channels_last"),
    ((3, 5, 6, 7), "channels_last"),
    ((64, 12), "contiguous"),
    ((9, 5, 11), "contiguous"),
    ((2, 19, 3, 4, 5), "channels_last_3d"),
    ((3, 5, 6, 7), "slice"),
]


def _relu_output(shape, dtype, device):
    """A ReLU's output with the values where the mask's rule shows: exact zeros (about half),
    a negative zero, a NaN (which threshold_backward lets the gradient through) and a denormal."""
    z = torch.randn(shape, device=device).relu().to(dtype)
    flat = z.view(-1)
    flat[1::13] = -0.0
    flat[2::17] = float("nan")
    flat[3::19] = torch.finfo(dtype).tiny / 2
    return z


def _inputs(shape, kind, dtype, backend):
    C = shape[1]
    x = fused_cases.layout(shape, kind, backend.device) * 2 + 1
    if kind == "slice":  # .to() would make it contiguous
        x = torch.empty((shape[0], 2 * C) + tuple(shape[2:]), dtype=dtype,
                        device=backend.device)[:, ::2].copy_(x)
        assert not x.is_contiguous()
    x = x.to(dtype)
    g = torch.randn(shape, device=backend.device).to(dtype)
    z = _relu_output(shape, dtype, backend.device)
    if kind in ("channels_last", "channels_last_3d"):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        g, z = g.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt)
    sdt = reference.stat_dtype(dtype)
    per_channel = [torch.rand(C, dtype=sdt, device=backend.device) + 0.5 for _ in range(5)]
    per_channel[1] -= 1.0  # a mean of either sign
    return x, g, z, per_channel


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES)
def test_is_backward_of_the_masked_gradient(shape, kind, dtype, train, backend):
    x, g, z, (w, mean, invstd, r, d) = _inputs(shape, kind, dtype, backend)
    masked = torch.ops.aten.threshold_backward(g, z, 0)
    assert (masked == 0).any() and (masked != 0).any()
    for output_mask in ([True, True, True], [True, False, False], [False, True, True]):
        fused = backend.ops.backward_relu(g, z, x, w, mean, invstd, r, d, train, output_mask)
        unfused = backend.ops.backward(masked, x, w, mean, invstd, r, d, train, output_mask)
        for name, a, b in zip(("grad_input", "grad_weight", "grad_bias"), fused, unfused):
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.stride() == b.stride(), name
                assert torch.equal(a, b), f"{name}: {(a.double() - b.double()).abs().max()}"


def test_relu_output_in_another_layout(backend):
    # Read through a copy in input's layout, as grad_output is.
    x, g, z, (w, mean, invstd, r, d) = _inputs((3, 16, 6, 7), "channels_last", torch.float32,
                                               backend)
    expected = backend.ops.backward_relu(g, z, x, w, mean, invstd, r, d, True, [True] * 3)
    for z_other in (z.contiguous(), z.transpose(2, 3).contiguous().transpose(2, 3)):
        got = backend.ops.backward_relu(g, z_other, x, w, mean, invstd, r, d, True, [True] * 3)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad,error,match", [
    (lambda z: z[:1], ValueError, r"relu_output must have the input's shape \(2, 4, 3, 3\)"),
    (lambda z: z.double(), TypeError, "relu_output must be torch.float32 like input"),
    (lambda z: None, TypeError, "relu_output"),
])
def test_argument_checks_name_relu_output(bad, error, match, backend):
    x = torch.randn(2, 4, 3, 3, device=backend.device)
    w = torch.rand(4, device=backend.device) + 0.5
    with pytest.raises(error, match=match):
        backend.ops.backward_relu(torch.randn_like(x), bad(x.relu()), x, w, w, w, None, None,
                                  True, [True, True, True])
