"""The fused CPU kernels (backend="fused") against the reference (backend="reference"), and the
ops called directly: opcheck, poisoned outputs, determinism, argument checks."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda.testing import DTYPES, make_params, tolerance

from conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels

ops = torch.ops.batchrenorm

import fused_cases
from fused_cases import train_step as _step

DEV = "cpu"


def _layout(shape, kind):
    return fused_cases.layout(shape, kind, DEV)


def _State(C, dtype, affine=True, running=True, step=True):
    return fused_cases.State(C, dtype, DEV, affine, running, step)


def _compare_steps(shape, kind, dtype, **kwargs):
    return fused_cases.compare_steps(shape, kind, dtype, DEV, **kwargs)


LAYOUT_CASES = fused_cases.LAYOUT_CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", LAYOUT_CASES)
def test_training_steps_and_eval_match_reference(shape, kind, dtype):
    assert _compare_steps(shape, kind, dtype), "r or d must be clipped in some step"


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_large_inputs_cross_chunk_and_block_boundaries(kind):
    # Enough values per channel for several chunks and work items per channel.
    _compare_steps((3, 3, 150, 160), kind, torch.float32, steps=2)
    _compare_steps((2, 130, 30, 41), kind, torch.float32, steps=2)


def test_momentum_none_cumulative_average():
    _compare_steps((6, 4, 5), "contiguous", torch.float32, momentum=None)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_not_affine(kind):
    _compare_steps((3, 5, 4, 4), kind, torch.float32, affine=False)


def test_without_running_stats_is_batchnorm():
    _compare_steps((3, 5, 4, 4), "contiguous", torch.float32, running=False, step=False)


def test_functional_without_step_counter():
    _compare_steps((3, 5, 4, 4), "channels_last", torch.float32, step=False)


@pytest.mark.parametrize("module_type,shape", [(brn.BatchRenorm1d, (8, 6)),
                                               (brn.BatchRenorm2d, (4, 6, 5, 5))])
def test_module_track_running_stats_false(module_type, shape):
    fused = module_type(6, track_running_stats=False)
    x = torch.randn(shape)
    y_ref = brn.batch_renorm(x, None, None, fused.weight, fused.bias, training=True,
                             backend="reference")
    for mode in (fused.train, fused.eval):
        mode()
        assert_close(fused(x), y_ref, **tolerance(torch.float32))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_weight_or_bias_alone(which):
    C = 5
    x = torch.randn(4, C, 3, 3)
    g = torch.randn_like(x)
    w, b, rm, rv = make_params(C, torch.float32)
    results = []
    for backend in ("fused", "reference"):
        p = (w if which == "weight" else b).clone().requires_grad_()
        xr = x.clone().requires_grad_()
        kwargs = {which: p}
        y = brn.batch_renorm(xr, rm.clone(), rv.clone(), training=True, backend=backend,
                             **kwargs)
        y.backward(g)
        results.append((y, xr.grad, p.grad))
    for a, b_ in zip(*results):
        assert_close(a, b_, **tolerance(torch.float32))


def test_ill_conditioned_channel():
    # Mean 1e4, std 1e-2: x * scale + shift in float32 would lose everything to cancellation,
    # and so would E[x^2] - E[x]^2.
    C = 3
    x = torch.randn(8, C, 20, 20, dtype=torch.float64) * 1e-2 + 1e4
    x[:, 1] = torch.randn(8, 20, 20, dtype=torch.float64)  # an ordinary channel beside it
    x32 = x.float()
    g = torch.randn_like(x)
    w64, b64 = make_params(C, torch.float64)[:2]
    for fmt in (torch.contiguous_format, torch.channels_last):
        outs = []
        for xin, gin in ((x32, g.float()), (x32.double(), g)):
            xin = xin.detach().clone(memory_format=fmt).requires_grad_()
            w, b = w64.to(xin.dtype), b64.to(xin.dtype)
            y = brn.batch_renorm(xin, None, None, w, b, training=True,
                                 backend="fused" if xin.dtype == torch.float32 else "reference")
            y.backward(gin.contiguous(memory_format=fmt))
            outs.append((y.double(), xin.grad.double()))
        (y32, dx32), (y64, dx64) = [(y.detach(), dx) for y, dx in outs]
        assert_close(y32, y64, atol=1e-3 * float(y64.abs().max()), rtol=1e-3)
        assert_close(dx32, dx64, atol=1e-3 * float(dx64.abs().max()), rtol=1e-3)
        stats = ops.batch_stats(x32.contiguous(memory_format=fmt))
        assert_close(stats[0].double(), x32.double().mean((0, 2, 3)), atol=1e-6, rtol=1e-7)
        m2 = ((x32.double() - x32.double().mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
        assert_close(stats[1].double(), m2, atol=0, rtol=1e-4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 20),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    big=st.booleans(),
    kind=st.sampled_from(["contiguous", "channels_last", "slice"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_property_random_shapes(n, c, spatial, big, kind, dtype):
    if big:
        spatial = [3000] if not spatial else [max(2, spatial[0])] + [40]
    shape = (n, c) + tuple(spatial)
    if math.prod(shape) // c < 2:
        shape = (n + 1,) + shape[1:]
    if kind == "channels_last" and len(shape) not in (4, 5):
        kind = "contiguous"
    if kind == "channels_last" and len(shape) == 5:
        kind = "channels_last_3d"
    _compare_steps(shape, kind, dtype, steps=2)


# ---------------------------------------------------------------------------------------------
# The ops called directly.

def _op_samples(dtype=torch.float32, fmt=torch.contiguous_format, shape=(3, 5, 4, 6)):
    C = shape[1]
    x = (torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    w, b, rm, rv = make_params(C, dtype)
    sdt = reference.stat_dtype(dtype)
    pc = lambda: torch.rand(C, dtype=sdt) + 0.5  # noqa: E731
    return dict(
        forward_train=(x, w, b, rm, rv, torch.tensor(2), 0.1, 1e-5, 1.5, 0.5, 1, 2, 2),
        forward_eval=(x, w, b, rm, rv, 1e-5),
        backward=(g, x, w, pc(), pc(), pc(), pc(), True, [True, True, True]),
        batch_stats=(x,),
        normalize=(x, pc(), pc()),
        backward_reduce=(g, x, pc(), pc()),
        backward_input=(g, x, pc(), pc(), pc(), pc(), pc()),
    )


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, torch.contiguous_format),
                                       (torch.bfloat16, torch.channels_last),
                                       (torch.float64, torch.channels_last)], ids=str)
@pytest.mark.parametrize("name", ["forward_train", "forward_eval", "backward", "batch_stats",
                                  "normalize", "backward_reduce", "backward_input"])
def test_opcheck(name, dtype, fmt):
    args = _op_samples(dtype, fmt)[name]
    torch.library.opcheck(getattr(ops, name).default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_dynamic"))


def test_backward_output_mask_and_eval_form():
    x, g = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    mean, invstd, w = torch.randn(3), torch.rand(3) + 0.5, torch.rand(3) + 0.5
    full = ops.backward(g, x, w, mean, invstd, None, None, False, [True, True, True])
    assert all(t is not None for t in full)
    # batch_stats=False: dx = w * invstd * dy, no centring terms.
    assert_close(full[0], g * (w * invstd).view(1, 3, 1, 1))
    xhat = (x - mean.view(1, 3, 1, 1)) * invstd.view(1, 3, 1, 1)
    assert_close(full[1], (g * xhat).sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert_close(full[2], g.sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    for mask in ([True, False, False], [False, True, False], [False, False, True],
                 [False, False, False]):
        out = ops.backward(g, x, w, mean, invstd, None, None, True, mask)
        assert [t is not None for t in out] == mask
    # A grad_output in another layout than the input gives the same result.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_mixed = ops.backward(g, x_cl, w, mean, invstd, None, None, True, [True, True, True])
    out_same = ops.backward(g.contiguous(memory_format=torch.channels_last), x_cl, w, mean,
                            invstd, None, None, True, [True, True, True])
    assert out_mixed[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(out_mixed, out_same):
        assert torch.equal(a, b)


def test_building_blocks_compose_to_the_fused_step():
    x = torch.randn(4, 6, 5, 5) * 2 + 1
    g = torch.randn_like(x)
    w, b, rm, rv = make_params(6, torch.float32)
    y, mean, invstd, r, d = ops.forward_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5,
                                              1.5, 0.5, 0, 0, 0)
    m = x.numel() // 6
    bmean, m2 = ops.batch_stats(x)
    assert_close(bmean, mean)
    assert_close(torch.rsqrt(m2 / m + 1e-5), invstd)
    scale = w * r * invstd
    shift = b + w * (d - r * mean * invstd)
    assert_close(ops.normalize(x, scale, shift), y, atol=1e-5, rtol=1e-5)
    sum_dy, sum_dy_xhat = ops.backward_reduce(g, x, mean, invstd)
    dx, dw, db = ops.backward(g, x, w, mean, invstd, r, d, True, [True, True, True])
    assert_close(db, sum_dy)
    assert_close(dw, r * sum_dy_xhat + d * sum_dy)
    dx2 = ops.backward_input(g, x, mean, invstd, scale, sum_dy / m, sum_dy_xhat / m)
    assert_close(dx2, dx, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_no_poison_survives(fmt):
    shape = (3, 7, 9, 11)
    samples = _op_samples(torch.float32, fmt, shape)
    for name, args in samples.items():
        if name == "forward_train":
            args = args[:3] + (args[3].clone(), args[4].clone(), args[5].clone()) + args[6:]
        # Free a NaN-filled block of the same size first, so the op's outputs likely reuse it.
        poison = torch.full(shape, float("nan")).contiguous(memory_format=fmt)
        del poison
        out = getattr(ops, name)(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            assert t is not None
            assert torch.isfinite(t).all(), name
    # And each element right: the forward against the reference, elementwise.
    x, w, b, rm, rv = samples["forward_train"][:5]
    poison = torch.full(shape, float("nan")).contiguous(memory_format=fmt)
    del poison
    y = ops.forward_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5, 3.0, 5.0, 0, 0, 0)[0]
    y_ref = reference.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 3.0, 5.0)
    assert_close(y, y_ref, equal_nan=False, **tolerance(torch.float32))


@pytest.mark.parametrize("shape,fmt", [((2, 3, 200, 200), torch.contiguous_format),
                                       ((8, 64, 20, 20), torch.channels_last),
                                       ((4, 256, 9, 9), torch.contiguous_format)])
def test_deterministic_with_threads(shape, fmt):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        assert torch.get_num_threads() > 1
        x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt)
        g = torch.randn(shape).contiguous(memory_format=fmt)
        base = _State(shape[1], torch.float32)
        runs = []
        for _ in range(2):
            state = base.clone()
            y, grads = _step(state, x, g, "fused")
            runs.append((y, *grads, state.running_mean, state.running_var))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_thread_count_does_not_change_results():
    # The reductions' work partition has fixed sizes: one thread or two give the same bits.
    x = torch.randn(2, 3, 300, 200) * 3 + 1
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    base = _State(3, torch.float32)
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            state = base.clone()
            y, grads = _step(state, x, g, "fused")
            runs.append((y, *grads, state.running_mean, state.running_var))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: ops.forward_eval(x, w[:3], None, w, w, 1e-5), r"weight must have shape \(C,\) = \(4,\)"),
    (lambda x, w: ops.forward_eval(x, w.double(), None, w, w, 1e-5), "weight must be Float"),
    (lambda x, w: ops.forward_eval(x[0, 0, 0], None, None, w, w, 1e-5), "rank >= 2"),
    (lambda x, w: ops.forward_eval(x.int(), None, None, w, w, 1e-5), "input must be float32"),
    (lambda x, w: ops.forward_train(x, None, None, w.clone(), None, None, 0.1, 1e-5, 3.0, 5.0,
                                    0, 0, 0), "both be tensors or both be None"),
    (lambda x, w: ops.forward_train(x[:1, :, :1, :1], None, None, None, None, None, 0.1, 1e-5,
                                    3.0, 5.0, 0, 0, 0), "more than 1 value per channel"),
    (lambda x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None, None, 1e-5,
                                    3.0, 5.0, 0, 0, 0), "momentum=None"),
    (lambda x, w: ops.backward(x[:1], x, None, w, w, None, None, True, [True, True, True]),
     "grad_output must have the input's shape"),
    (lambda x, w: ops.normalize(x, w, w[:2]), r"shift must have shape \(C,\)"),
    (lambda x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None, float("nan"), 1e-5,
                                    3.0, 5.0, 0, 0, 0), r"momentum must be in \[0, 1\]"),
    (lambda x, w: ops.forward_train(x, None, None, None, None, torch.tensor(1.0), 0.1, 1e-5, 3.0,
                                    5.0, 0, 0, 0), "num_batches_tracked must be an int64 scalar"),
])
def test_op_argument_checks(call, match):
    x = torch.randn(2, 4, 3, 3)
    w = torch.rand(4) + 0.5
    with pytest.raises(RuntimeError, match=match):
        call(x, w)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_parallel_for_runs_on_worker_threads():
    # The extension is built with -fopenmp so that at::parallel_for really forks; were it not,
    # the ops would run on the calling thread alone. A fresh process: no OpenMP pool exists
    # until the first parallel region, which is our op's.
    code = textwrap.dedent("""
        import os, torch, batchrenorm_cuda
        torch.set_num_threads(2)
        x = torch.randn(4, 64, 56, 56)
        before = len(os.listdir('/proc/self/task'))
        torch.ops.batchrenorm.batch_stats(x)
        print(before, len(os.listdir('/proc/self/task')))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after = int(out[-2]), int(out[-1])
    assert after > before, f"at::parallel_for started no worker thread ({before} -> {after})"


@requires_cpu_kernels
def test_counter_advances_only_with_running_statistics():
    """num_batches_tracked is incremented with the running buffers, as in the reference and the
    CUDA kernels; without buffers it only selects the schedule's bounds."""
    x = torch.randn(4, 3, 5)
    step = torch.tensor(7)
    torch.ops.batchrenorm.forward_train(x, None, None, None, None, step, 0.1, 1e-5, 3.0, 5.0,
                                        0, 0, 0)
    assert step.item() == 7
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.ops.batchrenorm.forward_train(x, None, None, rm, rv, step, 0.1, 1e-5, 3.0, 5.0, 0, 0, 0)
    assert step.item() == 8
