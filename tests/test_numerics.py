"""Adversarial numerics, each with its bound, on every backend: the reference, the fused CPU
kernels and the emulated CUDA kernels. The non-finite policy tested here is README's
"Non-finite batches": a channel whose batch mean or M2 = sum((x - mean)^2) is not finite in the
statistics dtype gets a NaN output (and NaN gradients) in training, and its running buffers are
left unchanged; the step counter still advances."""
import math

import pytest
import torch
from torch.testing import assert_close

from batchrenorm_cuda import reference
from batchrenorm_cuda.functional import batch_renorm_scheduled as _batch_renorm
from batchrenorm_cuda._testing import tolerance

FLT_MAX = torch.finfo(torch.float32).max


def step(x, backend, training=True, running=None, weight=None, bias=None, r_max=3.0, d_max=5.0,
         eps=1e-5, grad=True):
    """One step; returns output, grad_input (of sum(y * g) for a fixed g), the buffers and the
    counter after it."""
    C = x.shape[1]
    sdt = reference.stat_dtype(x.dtype)
    rm, rv = running if running is not None else (torch.zeros(C, dtype=sdt),
                                                  torch.ones(C, dtype=sdt))
    rm, rv, nbt = rm.clone(), rv.clone(), torch.tensor(3)
    xr = x.detach().clone().requires_grad_(grad)
    y = _batch_renorm(xr, rm, rv, weight, bias, training, 0.1, eps, r_max, d_max, nbt,
                      backend=backend)
    dx = None
    if grad:
        g = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape).to(x.dtype)
        (dx,) = torch.autograd.grad(y, xr, g)
    return y.detach(), dx, rm, rv, nbt


def oracle(x, **kwargs):
    """The same step in float64 on the same (rounded) input values."""
    kwargs = dict(kwargs)
    if kwargs.get("running") is not None:
        kwargs["running"] = tuple(t.double() for t in kwargs["running"])
    return step(x.double(), "reference", **kwargs)


# Each of the CPU kernels' backward paths: the planes' two passes (C < 8), the fused planes
# (C >= 8), the rows (channels_last, and 2-D).
@pytest.mark.parametrize("shape,fmt", [((8, 4, 6, 6), torch.contiguous_format),
                                       ((8, 16, 6, 6), torch.contiguous_format),
                                       ((8, 4, 6, 6), torch.channels_last),
                                       ((288, 4), torch.contiguous_format)],
                         ids=["planes", "planes_fused", "channels_last", "2d"])
def test_large_mean_small_std_float32(shape, fmt, backend):
    # mean 1e4, std 1e-2: the float32 ulp at 1e4 is 1e-3, a tenth of sigma, so the backward
    # must recover the saved mean's rounding (batchrenorm.h, well_centred). Within 1e-3
    # relative of float64 on the same values.
    torch.manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=fmt)
    C = shape[1]
    running = (torch.full((C,), 1e4), torch.full((C,), 1e-4))
    y, dx, rm, rv, _ = step(x, backend, running=running)
    y64, dx64, rm64, rv64, _ = oracle(x, running=running)
    assert_close(y.double(), y64, atol=1e-3 * float(y64.abs().max()), rtol=1e-3)
    assert_close(dx.double(), dx64, atol=1e-3 * float(dx64.abs().max()), rtol=1e-3)
    assert_close(rm.double(), rm64, rtol=1e-6, atol=0)
    assert_close(rv.double(), rv64, rtol=1e-3, atol=0)


def test_float16_near_its_largest_value(backend):
    # Values around 6e4 (float16's largest is 65504): squares overflow float16, not the float32
    # statistics. No inf or NaN anywhere, and float16 accuracy.
    torch.manual_seed(1)
    x = (6e4 + 3000 * torch.randn(8, 3, 5, 5, dtype=torch.float64)).clamp(max=65504).half()
    running = (torch.full((3,), 6e4), torch.full((3,), 9e6))
    for training in (True, False):
        y, dx, rm, rv, _ = step(x, backend, training=training, running=running)
        y64, dx64, _, _, _ = oracle(x, training=training, running=running)
        for t in (y, dx, rm, rv):
            assert torch.isfinite(t).all()
        assert_close(y.double(), y64, **tolerance(torch.float16))
        assert_close(dx.double(), dx64, atol=2e-3 * float(dx64.abs().max()), rtol=2e-3)


def test_bfloat16_at_1e30(backend):
    torch.manual_seed(2)
    x = (1e30 * (1 + 0.01 * torch.randn(4, 3, 5, dtype=torch.float64))).bfloat16()
    # Eval: finite running statistics normalise 1e30 inputs to bfloat16 accuracy.
    running = (torch.full((3,), 1e30), torch.full((3,), 1e38))
    y, dx, _, _, _ = step(x, backend, training=False, running=running)
    y64, dx64, _, _, _ = oracle(x, training=False, running=running)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert_close(y.double(), y64, atol=1.6e-2 * float(y64.abs().max()), rtol=1.6e-2)
    # Training: sigma_B is about 1e28, but its square, the variance, is beyond float32: the
    # policy's non-finite statistics (NaN output, buffers unchanged).
    y, dx, rm, rv, nbt = step(x, backend, training=True, running=running)
    assert y.isnan().all() and dx.isnan().all()
    assert torch.equal(rm, running[0]) and torch.equal(rv, running[1]) and int(nbt) == 4
    # At 1e18 the variance (1e32) fits, and training is accurate.
    x = (x.double() * 1e-12).bfloat16()
    y, _, _, _, _ = step(x, backend, training=True)
    y64, _, _, _, _ = oracle(x, training=True)
    assert_close(y.double(), y64, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_constant_channels_and_denormals(backend, dtype):
    torch.manual_seed(3)
    tiny = torch.finfo(dtype).tiny
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    x[:, 0] = 2.5                      # variance exactly 0
    x[:, 1] = x[:, 1] * tiny * 0.25    # subnormal values
    x[0, 2, 0, 0] = tiny / 8           # one subnormal among normal values
    x = x.to(dtype)
    weight, bias = torch.tensor([1.5, -0.5, 2.0]), torch.tensor([0.1, 0.2, -0.3])
    running = (torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    y, dx, rm, rv, _ = step(x, backend, running=running, weight=weight, bias=bias, eps=1e-3)
    y64, dx64, rm64, rv64, _ = oracle(x, running=running, weight=weight.double(),
                                      bias=bias.double(), eps=1e-3)
    for t in (y, dx, rm, rv):
        assert torch.isfinite(t).all()
    assert_close(y.double(), y64, **tolerance(dtype))
    assert_close(dx.double(), dx64, atol=tolerance(dtype)["atol"] * 40,
                 rtol=tolerance(dtype)["rtol"])
    assert_close(rv.double(), rv64, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5), (1, 5, 1, 1)])
def test_one_value_per_channel_in_eval(backend, shape):
    x = torch.randn(shape)
    running = (torch.randn(5), torch.rand(5) + 0.5)
    y, dx, _, _, _ = step(x, backend, training=False, running=running)
    y64, dx64, _, _, _ = oracle(x, training=False, running=running)
    assert_close(y.double(), y64, **tolerance(torch.float32))
    assert_close(dx.double(), dx64, **tolerance(torch.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        step(x, backend, training=True, running=running)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_batches(backend, bad):
    torch.manual_seed(4)
    x = torch.randn(4, 3, 5)
    x[2, 1, 3] = bad
    running = (torch.randn(3), torch.rand(3) + 0.5)
    y, dx, rm, rv, nbt = step(x, backend, running=running)
    y64, _, rm64, rv64, _ = oracle(x, running=running)
    # The bad channel: NaN output and gradient, buffers unchanged; the others as usual.
    assert y[:, 1].isnan().all() and dx[:, 1].isnan().all()
    assert rm[1] == running[0][1] and rv[1] == running[1][1] and int(nbt) == 4
    keep = [0, 2]
    assert_close(y[:, keep].double(), y64[:, keep], **tolerance(torch.float32))
    assert torch.isfinite(dx[:, keep]).all()
    assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-6)
    assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-6)
    # Eval: only the bad element is not finite.
    y, _, _, _, _ = step(x, backend, training=False, running=running)
    assert (~torch.isfinite(y)).sum() == 1 and not torch.isfinite(y[2, 1, 3])


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_statistics_beyond_float32_give_nan_and_keep_the_buffers(backend, scale):
    # The case: before, the fused kernels returned an all-zero output and the reference
    # a finite one with running_var = inf (var * count overflowed after the finiteness check).
    torch.manual_seed(5)
    x = torch.randn(8, 4, 5, 5) * scale
    y, dx, rm, rv, nbt = step(x, backend, running=(torch.zeros(4), torch.ones(4)), r_max=1.0,
                              d_max=0.0)
    assert y.isnan().all() and dx.isnan().all()
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)) and int(nbt) == 4


@pytest.mark.parametrize("value,usable", [(1.25e19, True), (1.35e19, False)])
def test_at_the_float32_limit(backend, value, usable):
    # Two values +-v per channel: mean 0, M2 = 2 v^2, which is 3.13e38 (finite) for 1.25e19 and
    # 3.65e38 (beyond FLT_MAX = 3.40e38) for 1.35e19. Nearer FLT_MAX the verdict depends on
    # each backend's summation order.
    x = torch.tensor([[value, -value], [-value, value]]).view(2, 2, 1)
    y, dx, rm, rv, _ = step(x, backend, running=(torch.zeros(2), torch.ones(2)), r_max=1.0,
                            d_max=0.0)
    if usable:
        assert_close(y, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).view(2, 2, 1))
        # running_var = 0.9 + 0.1 * M2 / (m - 1): finite, though var * m is close to FLT_MAX.
        expected = 0.9 + 0.1 * 2 * torch.tensor(value, dtype=torch.float64) ** 2
        assert torch.isfinite(rv).all() and float(rv.max()) <= FLT_MAX
        assert_close(rv.double(), expected.expand(2), rtol=1e-5, atol=0)
    else:
        assert y.isnan().all() and dx.isnan().all()
        assert torch.equal(rv, torch.ones(2)) and torch.equal(rm, torch.zeros(2))
