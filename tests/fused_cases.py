"""Cases shared by the fused-kernel tests of every backend (test_fused_kernels.py: the CPU
kernels, the CUDA kernels on a GPU and under the CUDA emulator; test_fused_ops.py): random
inputs in each layout, a few training steps with the schedule active compared with the
reference, then eval."""
import pytest
import torch
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda.functional import batch_renorm_scheduled as _batch_renorm
from batchrenorm_cuda._testing import (buffer_tolerance, fused_ops_namespace, grad_tolerance,
                                       make_params, tolerance)

# A schedule that is active from the second step on, so r and d really are clipped.
SCHEDULE = dict(r_max=1.5, d_max=0.5, warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=2)


def layout(shape, kind, device):
    """A random float64 tensor on `device` of `shape` in a layout: contiguous,
    channels_last(_3d), or a
    non-contiguous slice of a larger tensor."""
    if kind == "slice":
        big = torch.randn((shape[0], shape[1] * 2) + tuple(shape[2:]), dtype=torch.float64,
                          device=device)
        return big[:, ::2]
    x = torch.randn(shape, dtype=torch.float64, device=device)
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def grad_tol(dtype, x):
    return grad_tolerance(dtype, x.numel() // x.shape[1])


def buffer_tol(dtype):
    return buffer_tolerance(dtype)


class State:
    def __init__(self, C, dtype, device, affine=True, running=True, step=True):
        w, b, rm, rv = make_params(C, dtype, device=device)
        rm[0] = 2.0   # far from the batch mean: d is clipped
        rv[-1] = 25.0  # far from the batch variance: r is clipped
        self.weight = w.requires_grad_() if affine else None
        self.bias = b.requires_grad_() if affine else None
        self.running_mean = rm if running else None
        self.running_var = rv if running else None
        self.num_batches_tracked = torch.tensor(0, device=device) if step else None

    def clone(self):
        new = State.__new__(State)
        for k, v in vars(self).items():
            if v is None:
                setattr(new, k, None)
            elif v.requires_grad:
                setattr(new, k, v.detach().clone().requires_grad_())
            else:
                setattr(new, k, v.clone())
        return new


def train_step(state, x, grad, backend, momentum=0.3, eps=1e-3, schedule=SCHEDULE, training=True):
    xr = x.detach().clone().requires_grad_()
    for p in (state.weight, state.bias):
        if p is not None:
            p.grad = None
    y = _batch_renorm(xr, state.running_mean, state.running_var, state.weight, state.bias,
                      training, momentum, eps, schedule["r_max"], schedule["d_max"],
                      num_batches_tracked=state.num_batches_tracked,
                      warmup_steps=schedule["warmup_steps"],
                      r_max_ramp_steps=schedule["r_max_ramp_steps"],
                      d_max_ramp_steps=schedule["d_max_ramp_steps"], backend=backend)
    y.backward(grad)
    grads = (xr.grad, None if state.weight is None else state.weight.grad,
             None if state.bias is None else state.bias.grad)
    return y, grads


def was_clipped(x, state, eps, schedule):
    if state.running_mean is None:
        return False
    r_max, d_max = reference.clip_bounds(state.num_batches_tracked, schedule["r_max"],
                                         schedule["d_max"], schedule["warmup_steps"],
                                         schedule["r_max_ramp_steps"], schedule["d_max_ramp_steps"])
    r_max, d_max = float(r_max), float(d_max)
    if r_max == 1.0 and d_max == 0.0:
        return False
    dims = (0,) + tuple(range(2, x.dim()))
    xd = x.double()
    sigma_b = (xd.var(dims, correction=0) + eps).sqrt()
    sigma = (state.running_var.double() + eps).sqrt()
    r = sigma_b / sigma
    d = (xd.mean(dims) - state.running_mean.double()) / sigma
    return bool(((r > r_max) | (r < 1 / r_max) | (d.abs() > d_max)).any())


def compare_steps(shape, kind, dtype, device, steps=3, momentum=0.3, affine=True, running=True,
                   step=True, eps=1e-3):
    fused = State(shape[1], dtype, device, affine, running, step)
    ref = fused.clone()
    tol = tolerance(dtype)
    clipped = False
    for _ in range(steps):
        x = (layout(shape, kind, device) * 1.7 + 0.4).to(dtype)
        g = layout(shape, kind, device).to(dtype)
        clipped |= was_clipped(x, ref, eps, SCHEDULE)
        y_f, grads_f = train_step(fused, x, g, "fused", momentum, eps)
        y_r, grads_r = train_step(ref, x, g, "reference", momentum, eps)
        assert y_f.dtype == dtype and y_f.device.type == torch.device(device).type
        if kind != "slice":
            fmt = brn._ops.memory_format_of(x)
            assert y_f.is_contiguous(memory_format=fmt)
            assert grads_f[0].is_contiguous(memory_format=fmt)
        assert_close(y_f, y_r, **tol)
        assert_close(grads_f[0], grads_r[0], **tol)
        for gf, gr in zip(grads_f[1:], grads_r[1:]):
            assert (gf is None) == (gr is None)
            if gf is not None:
                assert_close(gf, gr, **grad_tol(dtype, x))
        for name in ("running_mean", "running_var"):
            a, b = getattr(fused, name), getattr(ref, name)
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(a, b, **buffer_tol(dtype))
        if step:
            assert torch.equal(fused.num_batches_tracked, ref.num_batches_tracked)
    if running:
        x = layout(shape, kind, device).to(dtype)
        g = layout(shape, kind, device).to(dtype)
        y_f, grads_f = train_step(fused, x, g, "fused", momentum, eps, training=False)
        y_r, grads_r = train_step(ref, x, g, "reference", momentum, eps, training=False)
        assert_close(y_f, y_r, **tol)
        assert_close(grads_f[0], grads_r[0], **tol)
        for gf, gr in zip(grads_f[1:], grads_r[1:]):
            if gf is not None:
                assert_close(gf, gr, **grad_tol(dtype, x))
    return clipped


# Layouts and ranks every device runs.
LAYOUT_CASES = [
    ((16, 5), "contiguous"),
    ((4, 6, 9), "contiguous"),
    ((4, 6, 9), "slice"),
    ((3, 5, 6, 7), "contiguous"),
    ((3, 70, 6, 7), "channels_last"),
    ((3, 5, 6, 7), "channels_last"),
    ((3, 5, 6, 7), "slice"),
    ((2, 4, 3, 4, 5), "contiguous"),
    ((2, 19, 3, 4, 5), "channels_last_3d"),
    ((2, 4, 3, 4, 5), "slice"),
]


# ---------------------------------------------------------------------------------------------
# The backends of the op-level tests (test_fused_kernels.py, test_op_calls.py,
# test_backward_relu.py), which import the fixture.

class Target(str):
    """The backend under test: its name (compares as a str), the device its tensors live on and
    the op namespace that runs them."""

    def __new__(cls, name: str, device: str, ops) -> "Target":
        target = super().__new__(cls, name)
        target.device, target.ops = device, ops
        return target


@pytest.fixture(name="backend", autouse=True, params=["cpu", "cuda", pytest.param(
    "cuda_emulated", marks=pytest.mark.cuda_emulation)])
def backend_fixture(request):
    """`backend`: a Target per backend, for every test of a module that imports this (it
    overrides conftest.py's `backend`, the public API's choice of implementation)."""
    if request.param in ("cpu", "cuda"):
        if not brn.extension_available(request.param):
            pytest.skip(f"needs the {request.param} build of the extension"
                        + (" and a GPU" if request.param == "cuda" else ""))
        yield Target(request.param, request.param, torch.ops.batchrenorm)
        return
    emulation = request.getfixturevalue("cuda_emulation")
    emulation.set_device(16, 2)
    with fused_ops_namespace("batchrenorm_emulated_cuda") as ops:
        yield Target("cuda_emulated", "cpu", ops)


def op_samples(device, dtype=torch.float32, fmt=torch.contiguous_format, shape=(3, 5, 4, 6)):
    C = shape[1]
    x = (torch.randn(shape, device=device) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    w, b, rm, rv = make_params(C, dtype, device=device)
    sdt = reference.stat_dtype(dtype)
    pc = lambda: torch.rand(C, dtype=sdt, device=device) + 0.5  # noqa: E731

    def backward_stats():  # channel 0 not well centred (|mean * invstd| > 16): its residue
        mean, invstd = pc(), pc()  # is recovered, the others' saved mean taken at its word
        invstd[0] = 40.0
        return mean, invstd
    return dict(
        forward_train=(x, w, b, rm, rv, torch.tensor(2, device=device), 0.1, 1e-5, 1.5, 0.5, 1, 2,
                       2),
        forward_eval=(x, w, b, rm, rv, 1e-5),
        backward=(g, x, w, *backward_stats(), pc(), pc(), True, [True, True, True]),
        # A ReLU's output: about half exact zeros, so that the mask cuts both ways.
        backward_relu=(g, torch.randn_like(g).relu(), x, w, *backward_stats(), pc(), pc(), True,
                       [True, True, True]),
        batch_stats=(x,),
        normalize=(x, pc(), pc()),
        backward_reduce=(g, x, pc(), pc()),
        backward_input=(g, x, pc(), pc(), pc(), pc(), pc()),
    )
