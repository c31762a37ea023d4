"""Under torch.func (grad, jvp) the fused ops compute their output and its derivatives in ATen
ops (csrc/batchrenorm_autograd.h, composite_*): those must have the kernels' numerics, the
large-mean shift and the non-finite policy, on every backend (README, "Non-finite batches").
"""
import math

import pytest
import torch

import batchrenorm_cuda as brn

BOUNDS = dict(r_max=3.0, d_max=5.0)


def _ill_conditioned():
    """float32 channels with mean 3000 and std 0.05, running statistics that make d active."""
    g = torch.Generator().manual_seed(0)
    x = (3000 + 0.05 * torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)).float()
    rm = torch.tensor([2999.99, 3000.0, 3000.02])
    rv = torch.tensor([0.0025, 0.004, 0.001])
    w = torch.tensor([0.8, 1.2, 1.0])
    return x, rm, rv, w


def _f(backend):
    def f(x, w, rm, rv):
        return brn.batch_renorm(x, rm, rv, w, None, training=True, momentum=0.0,
                                backend=backend, **BOUNDS)
    return f


def _loss(backend):
    return lambda x, w, rm, rv: (_f(backend)(x, w, rm, rv) * _weights(x)).sum()


def _jvp(backend, x, w, rm, rv, tangent):
    """jvp in x; the buffers are primals too (with zero tangents): a transformed function may
    not mutate captured tensors."""
    zeros = tuple(torch.zeros_like(t) for t in (w, rm, rv))
    return torch.func.jvp(_f(backend), (x, w, rm, rv), (tangent, *zeros))


def _weights(x):
    return torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)


def _close_to_max(got, expected, share):
    err = (got.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= share * scale, f"max error {err:.3g} = {err / scale:.3g} of the max {scale:.3g}"


def test_grad_and_jvp_of_a_large_mean_channel_match_float64(backend):
    x, rm, rv, w = _ill_conditioned()
    exact = [t.double() for t in (x, w, rm, rv)]
    y64 = _f("reference")(*exact)
    g64 = torch.func.grad(_loss("reference"))(*exact)
    tangent = _weights(x)
    _, t64 = _jvp("reference", *exact, tangent.double())

    y = torch.func.grad_and_value(_loss(backend))(x, w, rm, rv)[1]  # under the transform
    _close_to_max(_f(backend)(x, w, rm, rv), y64, 1e-5)
    g = torch.func.grad(_loss(backend))(x, w, rm, rv)
    _close_to_max(g, g64, 1e-3)
    out, t = _jvp(backend, x, w, rm, rv, tangent)
    _close_to_max(out, y64, 1e-5)
    _close_to_max(t, t64, 1e-3)
    assert math.isfinite(y.item())


def test_a_nan_channel_under_grad_keeps_its_buffers(backend):
    x, rm, rv, w = _ill_conditioned()
    x[1, 1, 2, 3] = float("nan")
    rm0, rv0 = rm.clone(), rv.clone()

    def loss(x, w, rm, rv):
        return brn.batch_renorm(x, rm, rv, w, None, training=True, momentum=0.5,
                                backend=backend, **BOUNDS).nan_to_num(0.0).sum()

    g = torch.func.grad(loss, argnums=(0, 1))(x, w, rm, rv)
    assert torch.isnan(g[0][:, 1]).all() and torch.isnan(g[1][1])
    assert torch.isfinite(g[0][:, [0, 2]]).all() and torch.isfinite(g[1][[0, 2]]).all()
    assert rm[1] == rm0[1] and rv[1] == rv0[1], "the NaN channel's buffers moved"
    assert not torch.equal(rm[[0, 2]], rm0[[0, 2]]), "the finite channels' buffers did not move"


def test_an_overflowing_variance_gives_nan_under_jvp(backend):
    """A finite channel whose sum of squares overflows float32 (values near +-1e20) is unusable:
    NaN output, as the kernels give, not the finite d * weight + bias of invstd = 0."""
    x, rm, rv, w = _ill_conditioned()
    x[:, 2] = torch.where(torch.rand(x[:, 2].shape) > 0.5, 1e20, -1e20)
    out, _ = _jvp(backend, x, w, rm, rv, torch.ones_like(x))
    eager = _f(backend)(x, w, rm, rv)
    assert torch.isnan(out[:, 2]).all() and torch.isnan(eager[:, 2]).all()
    assert torch.isfinite(out[:, :2]).all()


@pytest.fixture(autouse=True)
def _no_grad_mode_leak():
    yield
    assert torch.is_grad_enabled()
