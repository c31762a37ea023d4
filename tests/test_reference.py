"""The reference against an independent float64 computation of the paper's formulas, and against
torch's BatchNorm where Batch Renorm reduces to it."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda._testing import (DTYPES, buffer_tolerance, grad_tolerance, make_params,
                                       tolerance)


def textbook(x, running_mean, running_var, weight, bias, eps, r_max, d_max, momentum, grad_out):
    """Algorithm 1 of Ioffe 2017 in float64, channel by channel, with the backward written out
    by hand (no autograd): the independent oracle for the reference."""
    x = x.double()
    C = x.shape[1]
    xc = x.transpose(0, 1).reshape(C, -1)  # (C, m)
    gc = grad_out.double().transpose(0, 1).reshape(C, -1)
    m = xc.shape[1]
    mu = xc.sum(1) / m
    var = ((xc - mu[:, None]) ** 2).sum(1) / m
    sigma_b = (var + eps).sqrt()
    sigma = (running_var.double() + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((mu - running_mean.double()) / sigma).clamp(-d_max, d_max)
    xhat = (xc - mu[:, None]) / sigma_b[:, None]
    w, b = weight.double(), bias.double()
    y = w[:, None] * (xhat * r[:, None] + d[:, None]) + b[:, None]
    # Backward: BatchNorm's with w * r as the scale, r and d constants.
    mean_g = gc.mean(1)
    mean_gx = (gc * xhat).mean(1)
    dx = (w * r / sigma_b)[:, None] * (gc - mean_g[:, None] - xhat * mean_gx[:, None])
    dw = r * (gc * xhat).sum(1) + d * gc.sum(1)
    db = gc.sum(1)
    new_mean = (1 - momentum) * running_mean.double() + momentum * mu
    new_var = (1 - momentum) * running_var.double() + momentum * var * m / (m - 1)

    def back(t):  # (C, m) -> x's shape
        shape = (x.shape[1], x.shape[0]) + tuple(x.shape[2:])
        return t.reshape(shape).transpose(0, 1)

    return back(y), back(dx), dw, db, new_mean, new_var, r, d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 7), (3, 4, 5, 6), (2, 3, 4, 3, 5)])
def test_reference_matches_textbook_over_steps(dtype, shape):
    C = shape[1]
    weight, bias, running_mean, running_var = make_params(C, dtype)
    # Running statistics far from the batch's: r and d are clipped in some channels.
    running_var[0] = 20.0
    running_mean[-1] = 3.0
    tb_mean, tb_var = running_mean.double().clone(), running_var.double().clone()
    clipped = False
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        xr = x.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        y = brn.batch_renorm(xr, running_mean, running_var, w, b, training=True, momentum=0.1,
                             eps=1e-3, r_max=1.5, d_max=0.5, backend="reference")
        y.backward(g)
        ey, edx, edw, edb, tb_mean, tb_var, r, d = textbook(
            x, tb_mean, tb_var, weight, bias, 1e-3, 1.5, 0.5, 0.1, g)
        clipped |= bool((r == 1.5).any() | (r == 1 / 1.5).any() | (d.abs() == 0.5).any())
        tol = tolerance(dtype)
        assert y.dtype == dtype
        assert_close(y.double(), ey, **tol)
        assert_close(xr.grad.double(), edx, **tol)
        gtol = grad_tolerance(dtype, x.numel() // C)
        assert_close(w.grad.double(), edw, **gtol)
        assert_close(b.grad.double(), edb, **gtol)
        assert_close(running_mean.double(), tb_mean, **buffer_tolerance(dtype))
        assert_close(running_var.double(), tb_var, **buffer_tolerance(dtype))
    assert clipped, "the test must exercise the clipping of r or d"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_rmax1_dmax0_is_batchnorm(dtype, layout):
    x = torch.randn(4, 6, 5, 5, dtype=dtype) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    weight, bias, rm, rv = make_params(6, dtype)
    results = []
    for fn in ("brn", "bn"):
        xr, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        m, v = rm.clone(), rv.clone()
        for _ in range(3):
            if fn == "brn":
                y = brn.batch_renorm(xr, m, v, w, b, training=True, momentum=0.2, r_max=1.0,
                                     d_max=0.0, backend="reference")
            else:
                y = F.batch_norm(xr, m, v, w, b, training=True, momentum=0.2)
            y.backward(g)
        results.append((y, xr.grad, w.grad, b.grad, m, v))
    for a, e in zip(*results):
        assert_close(a, e, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_is_batchnorm_eval(dtype):
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    layer = brn.convert_batchnorm(bn).eval()
    bn.eval()
    if dtype == torch.float64:
        bn, layer = bn.double(), layer.double()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    expected = bn(x.to(bn.weight.dtype))
    got = layer(x.to(dtype))
    assert got.dtype == dtype
    assert_close(got.to(expected.dtype), expected, **tolerance(dtype))


def test_gradcheck_clipped_and_unclipped():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, dtype=torch.float64, requires_grad=True)
    # Running statistics far away: r and d sit on their clip bounds, hence are locally
    # constant, and finite differences agree with the detached-r/d analytic gradient.
    rm = torch.full((4,), 50.0, dtype=torch.float64)
    rv = torch.full((4,), 100.0, dtype=torch.float64)

    def clipped(x, w, b):
        return brn.batch_renorm(x, rm.clone(), rv.clone(), w, b, training=True, r_max=2.0,
                                d_max=1.0, backend="reference")

    def batchnorm(x, w, b):  # r_max=1, d_max=0
        return brn.batch_renorm(x, rm.clone(), rv.clone(), w, b, training=True, r_max=1.0,
                                d_max=0.0, backend="reference")

    def evaluation(x, w, b):
        return brn.batch_renorm(x, rm, rv, w, b, training=False, backend="reference")

    for fn in (clipped, batchnorm, evaluation):
        assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(batchnorm, (x, w, b))


def test_r_and_d_carry_no_gradient():
    """Unclipped r and d depend on x; their gradient must not flow (they are constants)."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    rm = torch.zeros(3, dtype=torch.float64)
    rv = torch.ones(3, dtype=torch.float64)
    y = brn.batch_renorm(x, rm.clone(), rv.clone(), None, None, training=True, r_max=100.0,
                         d_max=100.0, backend="reference")
    g = torch.arange(18, dtype=torch.float64).view(6, 3)
    (y * g).sum().backward()
    _, dx, _, _, _, _, r, d = textbook(x.detach(), rm, rv, torch.ones(3), torch.zeros(3), 1e-5,
                                       100.0, 100.0, 0.01, g)
    assert ((r > 1 / 100) & (r < 100)).all() and (d.abs() < 100).all(), "r, d must be unclipped"
    assert_close(x.grad, dx)


def test_schedule_values():
    step = torch.tensor([0, 4, 5, 6, 10, 15, 25, 100])
    r_max, d_max = reference.clip_bounds(step, 3.0, 5.0, warmup_steps=5, r_max_ramp_steps=10,
                                         d_max_ramp_steps=20)
    assert_close(r_max, torch.tensor([1, 1, 1, 1.2, 2.0, 3.0, 3.0, 3.0], dtype=torch.float64))
    assert_close(d_max, torch.tensor([0, 0, 0, 0.25, 1.25, 2.5, 5.0, 5.0], dtype=torch.float64))
    zero = reference.clip_bounds(torch.tensor([0, 1]), 3.0, 5.0, 0, 0, 0)
    assert zero[0].tolist() == [3.0, 3.0] and zero[1].tolist() == [5.0, 5.0]
    assert reference.clip_bounds(None, 3.0, 5.0, 5, 10, 20) == (3.0, 5.0)


def test_d_of_a_large_mean_channel_is_accurate_in_float32():
    # Mean 3000, std 0.05, running_mean within 0.04 of the batch mean: d must not inherit the
    # float32 mean's rounding (~1e-4, 0.5% of d here).
    torch.manual_seed(11)
    x = (torch.randn(8, 4, 10, 10, dtype=torch.float64) * 0.05 + 3000.0).float()
    xd = x.double()
    run_mean = (xd.mean((0, 2, 3)) + torch.linspace(-0.04, 0.04, 4, dtype=torch.float64)).float()
    run_var = torch.full((4,), 0.05**2)
    y32 = reference.batch_renorm(x, run_mean.clone(), run_var.clone(), None, None, True, 0.1,
                                 1e-5, 3.0, 5.0)
    y64 = reference.batch_renorm(xd, run_mean.double(), run_var.double(), None, None, True, 0.1,
                                 1e-5, 3.0, 5.0)
    assert_close(y32.double(), y64, atol=5e-5 * float(y64.abs().max()), rtol=0)
