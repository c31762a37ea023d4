"""The fused kernels against the reference, and the ops called directly, with one test body for
every backend:
  cpu            the CPU kernels (csrc/cpu);
  cuda           the CUDA build on a GPU (skipped without one);
  cuda_emulated  the same CUDA kernel source and glue logic compiled by g++ and executed on the
                 CPU by the CUDA emulator (tests/cuda_emulation.py, csrc/cuda/emulation): every
                 launch is run under the in-order schedule and 3 random ones, which must agree
                 bit for bit, with outputs, workspace and shared memory poisoned first.
Cases only a GPU can run (CUDA graphs, > 2^31 elements on device memory) skip elsewhere;
tests/test_fused_ops.py keeps what only the CPU kernels have (threads).
"""
import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda._testing import DTYPES, make_params, tolerance

import fused_cases
from fused_cases import backend_fixture  # noqa: F401 - autouse: every test on every backend
from fused_cases import op_samples
from fused_cases import buffer_tol as _buffer_tol
from fused_cases import grad_tol as _grad_tol
from fused_cases import train_step as _step

def gpu_only(backend):
    if backend != "cuda":
        pytest.skip("needs a real GPU (not reproducible by the emulator)")


def _layout(shape, kind, device):
    return fused_cases.layout(shape, kind, device)


def _State(C, dtype, device, affine=True, running=True, step=True):
    return fused_cases.State(C, dtype, device, affine, running, step)


def _compare_steps(shape, kind, dtype, device, **kwargs):
    return fused_cases.compare_steps(shape, kind, dtype, device, **kwargs)


# The shared cases (fused_cases.py), plus shapes that pick each CUDA path: NCHW with S a multiple
# of every
# vector width (64), of the float one only (196 = 14x14), of none (49 = 7x7); NHWC with C a
# multiple of 8, of 4 only (12), odd (5, 19); rank 2 (read as NHWC rows); small C with large
# N*S (many CTAs per channel) and large C (several channels per CTA).
LAYOUT_CASES = fused_cases.LAYOUT_CASES + [
    ((64, 12), "contiguous"),
    ((4, 6, 8, 8), "contiguous"),
    ((3, 5, 14, 14), "contiguous"),
    ((3, 5, 7, 7), "contiguous"),
    ((3, 16, 7, 7), "channels_last"),
    ((3, 12, 5, 5), "channels_last"),
    ((5, 8, 1, 1), "contiguous"),
    # NCHW with >= 8 channels: the CPU's one-pass training backward (grad_planes_fused).
    ((3, 9, 5, 6), "contiguous"),
    ((2, 8, 3, 4, 5), "contiguous"),
]

BIG_CASES = [
    ((32, 3, 64, 64), "contiguous"),
    ((32, 3, 64, 64), "channels_last"),
    ((8, 64, 56, 56), "contiguous"),
    ((8, 64, 56, 56), "channels_last"),
    ((4, 2048, 7, 7), "contiguous"),
    ((4, 2048, 7, 7), "channels_last"),
    ((2, 1000, 9, 10), "contiguous"),
    # More values a channel (67,200) than the CPU's one-pass backward took before it was
    # widened to 262,144: its chunked sums over many planes.
    ((2, 8, 160, 210), "contiguous"),
    # Wider than the elementwise kernels' shared-memory coefficient table (2048 float channels).
    ((3, 2500, 3, 3), "contiguous"),
    ((3, 2504, 3, 3), "channels_last"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", LAYOUT_CASES)
def test_training_steps_and_eval_match_reference(shape, kind, dtype, backend):
    assert _compare_steps(shape, kind, dtype, backend.device), "r or d must be clipped in some step"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,kind", BIG_CASES)
def test_large_inputs_many_ctas_per_channel_and_channels_per_cta(shape, kind, dtype, backend,
                                                               request):
    if backend != "cuda_emulated":
        _compare_steps(shape, kind, dtype, backend.device, steps=2)
        return
    if dtype != torch.float32:
        pytest.skip("emulated in float32 only, for time (float16 runs in every small case)")
    # The emulator's cost grows with the CTA count, which NCHW gives one per channel: the wide
    # NCHW layers run one step there (the kernels and the table/no-table paths are the same in
    # step 2; multi-step clipping is covered by every small case). One random schedule besides
    # the in-order one, not three: the small cases try three on the same kernels.
    import cuda_emulation

    wide_nchw = kind == "contiguous" and shape[1] >= 1000
    with cuda_emulation.random_schedules(request.getfixturevalue("cuda_emulation"), [1]):
        _compare_steps(shape, kind, dtype, backend.device, steps=1 if wide_nchw else 2)


def test_momentum_none_cumulative_average(backend):
    _compare_steps((6, 4, 5), "contiguous", torch.float32, backend.device, momentum=None)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_not_affine(kind, backend):
    _compare_steps((3, 5, 4, 4), kind, torch.float32, backend.device, affine=False)


def test_without_running_stats_is_batchnorm(backend):
    _compare_steps((3, 5, 4, 4), "contiguous", torch.float32, backend.device, running=False,
                   step=False)


def test_functional_without_step_counter(backend):
    _compare_steps((3, 5, 4, 4), "channels_last", torch.float32, backend.device, step=False)


@pytest.mark.parametrize("module_type,shape", [(brn.BatchRenorm1d, (8, 6)),
                                               (brn.BatchRenorm2d, (4, 6, 5, 5))])
def test_module_track_running_stats_false(module_type, shape, backend):
    fused = module_type(6, track_running_stats=False).to(backend.device)
    x = torch.randn(shape, device=backend.device)
    y_ref = brn.batch_renorm(x, None, None, fused.weight, fused.bias, training=True,
                             backend="reference")
    for mode in (fused.train, fused.eval):
        mode()
        assert_close(fused(x), y_ref, **tolerance(torch.float32))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_weight_or_bias_alone(which, backend):
    C = 5
    x = torch.randn(4, C, 3, 3, device=backend.device)
    g = torch.randn_like(x)
    w, b, rm, rv = make_params(C, torch.float32, device=backend.device)
    results = []
    for backend in ("fused", "reference"):
        p = (w if which == "weight" else b).clone().requires_grad_()
        xr = x.clone().requires_grad_()
        y = brn.batch_renorm(xr, rm.clone(), rv.clone(), training=True, backend=backend,
                             **{which: p})
        y.backward(g)
        results.append((y, xr.grad, p.grad))
    for a, b_ in zip(*results):
        assert_close(a, b_, **tolerance(torch.float32))


def test_module_schedule_over_steps_matches_reference(backend):
    # The schedule read on the device from num_batches_tracked, step after step.
    torch.manual_seed(3)
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = brn.BatchRenorm2d(8, momentum=None, r_max=1.3, d_max=0.4, warmup_steps=2,
                              r_max_ramp_steps=3, d_max_ramp_steps=2).to(backend.device)
        m.running_mean.fill_(0.7)
        m.running_var.fill_(3.0)
        for step in range(7):
            x = (torch.randn(6, 8, 5, 5, device=backend.device) * 2 + 0.3).contiguous(
                memory_format=fmt)
            rm, rv, nbt = (m.running_mean.clone(), m.running_var.clone(),
                           m.num_batches_tracked.clone())
            y = m(x)
            expected = reference.batch_renorm(x, rm, rv, m.weight, m.bias, True, None, m.eps,
                                              m.r_max, m.d_max, nbt, m.warmup_steps,
                                              m.r_max_ramp_steps, m.d_max_ramp_steps)
            assert_close(y, expected, **tolerance(torch.float32))
            assert_close(m.running_mean, rm, **_buffer_tol(torch.float32))
            assert_close(m.running_var, rv, **_buffer_tol(torch.float32))
            assert m.num_batches_tracked.item() == nbt.item() == step + 1


def test_ill_conditioned_channel(backend):
    C = 3
    x = torch.randn(8, C, 20, 20, dtype=torch.float64, device=backend.device) * 1e-2 + 1e4
    x[:, 1] = torch.randn(8, 20, 20, dtype=torch.float64, device=backend.device)
    x32 = x.float()
    g = torch.randn_like(x)
    # One set of parameters for both runs (found by the emulator: fresh random ones per run
    # made the two outputs incomparable).
    w64, b64 = make_params(C, torch.float64, device=backend.device)[:2]
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
        stats = backend.ops.batch_stats(x32.contiguous(memory_format=fmt))
        # atol: channel 1's mean is near 0, where a relative bound alone means nothing.
        assert_close(stats[0].double(), x32.double().mean((0, 2, 3)), atol=1e-6, rtol=1e-7)
        m2 = ((x32.double() - x32.double().mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
        assert_close(stats[1].double(), m2, atol=0, rtol=1e-4)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fp16_near_max_gives_finite_statistics(fmt, backend):
    # Values up to 6.5e4 (fp16's max is 65504): sums of squares would be ~1e15 per channel, and
    # E[x^2] - E[x]^2 would cancel to garbage; Welford/Chan merges stay finite and accurate.
    x64 = (torch.rand(16, 8, 32, 32, dtype=torch.float64, device=backend.device) * 6000 + 59000)
    x64[:, 3] = torch.rand(16, 32, 32, dtype=torch.float64, device=backend.device) * 130000 - 65000
    x = x64.half().contiguous(memory_format=fmt)
    xd = x.double()
    mean, m2 = backend.ops.batch_stats(x)
    assert torch.isfinite(mean).all() and torch.isfinite(m2).all()
    # atol: channel 3 spans +-6.5e4 with a mean near 0; 1e-8 of its range.
    assert_close(mean.double(), xd.mean((0, 2, 3)), atol=1e-3, rtol=1e-5)
    ref_m2 = ((xd - xd.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
    assert_close(m2.double(), ref_m2, atol=0, rtol=1e-3)
    w, b, rm, rv = make_params(8, torch.float16, device=backend.device)
    y, smean, invstd, r, d = backend.ops.forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, 3.0, 5.0,
                                               0, 0, 0)
    for t in (y, smean, invstd, r, d, rm, rv):
        assert torch.isfinite(t).all()
    var = xd.var((0, 2, 3), correction=0)
    assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=1e-3)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 40),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    big=st.booleans(),
    kind=st.sampled_from(["contiguous", "channels_last", "slice"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_property_random_shapes(n, c, spatial, big, kind, dtype, backend):
    if big:
        spatial = [3000] if not spatial else [max(2, spatial[0])] + [40]
    shape = (n, c) + tuple(spatial)
    if math.prod(shape) // c < 2:
        shape = (n + 1,) + shape[1:]
    if kind == "channels_last" and len(shape) not in (4, 5):
        kind = "contiguous"
    if kind == "channels_last" and len(shape) == 5:
        kind = "channels_last_3d"
    _compare_steps(shape, kind, dtype, backend.device, steps=2)


# ---------------------------------------------------------------------------------------------
# The ops called directly.

@pytest.mark.parametrize("dtype,fmt", [(torch.float32, torch.contiguous_format),
                                       (torch.bfloat16, torch.channels_last),
                                       (torch.float16, torch.contiguous_format),
                                       (torch.float64, torch.channels_last)], ids=str)
@pytest.mark.parametrize("name", ["forward_train", "forward_eval", "backward", "backward_relu",
                                  "batch_stats", "normalize", "backward_reduce",
                                  "backward_input"])
def test_opcheck(name, dtype, fmt, backend):
    args = op_samples(backend.device, dtype, fmt)[name]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(backend.ops, name).default, args, test_utils=tests)
    if name in ("forward_train", "forward_eval"):
        # With input, weight and bias requiring grad: the C++ autograd (batchrenorm_autograd.h)
        # is registered, and AOTAutograd traces through it.
        args = tuple(a.detach().clone().requires_grad_() if i < 3 else a
                     for i, a in enumerate(args))
        torch.library.opcheck(getattr(backend.ops, name).default, args, test_utils=tests)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", [((3, 5, 4, 6), torch.contiguous_format),
                                       ((3, 8, 7, 7), torch.channels_last),
                                       ((40, 6), torch.contiguous_format)])
def test_ops_match_cpu_kernels(dtype, shape, fmt, backend):
    # Same op, same inputs, on both devices (the CPU kernels are tested against the reference).
    if backend == "cpu":
        pytest.skip("the CPU kernels are what the other backends are compared with here")
    if not brn.extension_available("cpu"):
        pytest.skip("needs the compiled CPU kernels")
    samples = op_samples(backend.device, dtype, fmt, shape)
    tol = tolerance(dtype)
    for name, args in samples.items():
        if name == "forward_train":
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        cpu_args = tuple(a.cpu().clone() if isinstance(a, torch.Tensor) else a for a in args)
        out = getattr(backend.ops, name)(*args)
        out_cpu = getattr(torch.ops.batchrenorm, name)(*cpu_args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        outs_cpu = out_cpu if isinstance(out_cpu, (tuple, list)) else (out_cpu,)
        for a, b in zip(outs, outs_cpu):
            assert a.device.type == torch.device(backend.device).type
            # Full-size outputs: elementwise tolerance; per-channel ones are sums over m values.
            t = tol if a.dim() > 1 else _grad_tol(dtype, args[0])
            assert_close(a.cpu(), b, **t, msg=lambda m: f"{name}: {m}")
        if name == "forward_train":
            for i in (3, 4):  # running_mean, running_var
                assert_close(args[i].cpu(), cpu_args[i], **_buffer_tol(dtype))
            assert args[5].item() == cpu_args[5].item() == 3


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backward_output_mask_and_eval_form(fmt, backend):
    x = torch.randn(4, 3, 5, 5, device=backend.device).contiguous(memory_format=fmt)
    g = torch.randn(4, 3, 5, 5, device=backend.device)
    mean, invstd = torch.randn(3, device=backend.device), torch.rand(3, device=backend.device) + 0.5
    w = torch.rand(3, device=backend.device) + 0.5
    full = backend.ops.backward(g, x, w, mean, invstd, None, None, False, [True, True, True])
    assert all(t is not None for t in full)
    assert_close(full[0], g * (w * invstd).view(1, 3, 1, 1))
    xhat = (x - mean.view(1, 3, 1, 1)) * invstd.view(1, 3, 1, 1)
    assert_close(full[1], (g * xhat).sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert_close(full[2], g.sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    dx_only = backend.ops.backward(g, x, w, mean, invstd, None, None, False, [True, False, False])
    assert torch.equal(dx_only[0], full[0])
    full_t = backend.ops.backward(g, x, w, mean, invstd, None, None, True, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True],
                 [False, False, False], [True, True, False]):
        out = backend.ops.backward(g, x, w, mean, invstd, None, None, True, mask)
        assert [t is not None for t in out] == mask
        for t, f in zip(out, full_t):
            if t is not None:
                assert torch.equal(t, f)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_mixed = backend.ops.backward(g, x_cl, w, mean, invstd, None, None, True, [True, True, True])
    out_same = backend.ops.backward(g.contiguous(memory_format=torch.channels_last), x_cl, w, mean,
                            invstd, None, None, True, [True, True, True])
    assert out_mixed[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(out_mixed, out_same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_building_blocks_compose_to_the_fused_step(fmt, backend):
    x = (torch.randn(4, 6, 5, 5, device=backend.device) * 2 + 1).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    w, b, rm, rv = make_params(6, torch.float32, device=backend.device)
    y, mean, invstd, r, d = backend.ops.forward_train(x, w, b, rm.clone(), rv.clone(), None,
                                                      0.1, 1e-5,
                                              1.5, 0.5, 0, 0, 0)
    m = x.numel() // 6
    bmean, m2 = backend.ops.batch_stats(x)
    assert_close(bmean, mean)
    assert_close(torch.rsqrt(m2 / m + 1e-5), invstd)
    scale = w * r * invstd
    shift = b + w * (d - r * mean * invstd)
    assert_close(backend.ops.normalize(x, scale, shift), y, atol=1e-5, rtol=1e-5)
    sum_dy, sum_dy_xhat = backend.ops.backward_reduce(g, x, mean, invstd)
    xhat = (x - mean.view(1, 6, 1, 1)) * invstd.view(1, 6, 1, 1)
    assert_close(sum_dy, g.sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert_close(sum_dy_xhat, (g * xhat).sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    dx, dw, db = backend.ops.backward(g, x, w, mean, invstd, r, d, True, [True, True, True])
    assert_close(db, sum_dy)
    assert_close(dw, r * sum_dy_xhat + d * sum_dy)
    dx2 = backend.ops.backward_input(g, x, mean, invstd, scale, sum_dy / m, sum_dy_xhat / m)
    assert_close(dx2, dx, atol=1e-5, rtol=1e-4)


@contextlib.contextmanager
def _poisoned_allocations():
    """Within the block every floating-point tensor allocated through ATen (at::empty and
    the like, which the ops' glue uses for their outputs) starts as NaN, on every device:
    PyTorch's deterministic mode fills uninitialised memory. An output element a kernel does not
    write stays NaN."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def test_poisoned_allocations_catch_an_unwritten_output(backend):
    # The checker below can fail: an "op" that allocates its output and writes nothing.
    x = torch.randn(3, 7, 9, 11, device=backend.device)
    with _poisoned_allocations():
        unwritten = torch.empty_like(x)
    assert torch.isnan(unwritten).all()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 7, 9, 11), (3, 9, 9, 11)])  # CPU: 2-pass, fused backward
def test_no_poison_survives(fmt, shape, backend):
    samples = op_samples(backend.device, torch.float32, fmt, shape)
    for name, args in samples.items():
        if name == "forward_train":
            args = args[:3] + (args[3].clone(), args[4].clone(), args[5].clone()) + args[6:]
        with _poisoned_allocations():
            out = getattr(backend.ops, name)(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            assert t is not None
            assert torch.isfinite(t).all(), name
    x, w, b, rm, rv = samples["forward_train"][:5]
    with _poisoned_allocations():
        y = backend.ops.forward_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5, 3.0,
                                      5.0, 0, 0, 0)[0]
    y_ref = reference.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 3.0, 5.0)
    assert_close(y, y_ref, equal_nan=False, **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,fmt", [((2, 3, 200, 200), torch.contiguous_format),
                                       ((8, 64, 20, 20), torch.channels_last),
                                       ((4, 256, 9, 9), torch.contiguous_format),
                                       ((64, 64, 28, 28), torch.channels_last)])
def test_repeated_runs_are_bit_identical(shape, fmt, dtype, backend):
    # No atomics: partials merge in a fixed order, so runs agree to the bit.
    if backend == "cuda_emulated":
        pytest.skip("the emulator already runs every launch under four schedules and requires "
                    "bit-identical results")
    x = (torch.randn(shape, device=backend.device) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=backend.device).to(dtype).contiguous(memory_format=fmt)
    runs = []
    base = _State(shape[1], dtype, backend.device)  # one state, cloned: make_params is random
    for _ in range(3):
        state = base.clone()
        y, grads = _step(state, x, g, "fused")
        runs.append((y, *grads, state.running_mean, state.running_var))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_graph_training_step(fmt, backend):
    gpu_only(backend)
    # A whole training step (forward, backward) of a module captured in a CUDA graph: replays
    # read the step counter on the device, update the buffers, and match eager steps.
    torch.manual_seed(5)

    def make():
        torch.manual_seed(7)
        m = brn.BatchRenorm2d(16, momentum=0.2, r_max=1.4, d_max=0.3, warmup_steps=1,
                              r_max_ramp_steps=2, d_max_ramp_steps=2).to(backend.device)
        m.running_mean.fill_(0.5)
        m.running_var.fill_(2.0)
        return m

    graphed, eager = make(), make()
    shape = (8, 16, 12, 12)
    static_x = torch.randn(shape, device=backend.device).contiguous(
        memory_format=fmt).requires_grad_()
    static_g = torch.randn(shape, device=backend.device).contiguous(memory_format=fmt)

    def step(module, x, g):
        y = module(x)
        y.backward(g)
        return y

    inputs = [(torch.randn(shape, device=backend.device) * 1.5 + 0.2,
               torch.randn(shape, device=backend.device))
              for _ in range(6)]
    # Warm-up on a side stream (as torch.cuda.graph asks), the same steps on the eager twin.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for xi, gi in inputs[:2]:
            static_x.grad = None
            with torch.no_grad():
                static_x.copy_(xi)
            static_g.copy_(gi)
            step(graphed, static_x, static_g)
    torch.cuda.current_stream().wait_stream(side)
    for xi, gi in inputs[:2]:
        step(eager, xi.contiguous(memory_format=fmt).requires_grad_(),
             gi.contiguous(memory_format=fmt))

    for p in graphed.parameters():
        p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(graphed, static_x, static_g)
    for xi, gi in inputs[2:]:
        with torch.no_grad():
            static_x.copy_(xi)
        static_g.copy_(gi)
        graph.replay()
        for p in eager.parameters():
            p.grad = None
        xe = xi.contiguous(memory_format=fmt).requires_grad_()
        ye = step(eager, xe, gi.contiguous(memory_format=fmt))
        torch.cuda.synchronize()
        assert_close(static_y, ye, atol=0, rtol=0)
        assert_close(static_x.grad, xe.grad, atol=0, rtol=0)
        assert_close(graphed.weight.grad, eager.weight.grad, atol=0, rtol=0)
        assert_close(graphed.running_mean, eager.running_mean, atol=0, rtol=0)
        assert_close(graphed.running_var, eager.running_var, atol=0, rtol=0)
        assert graphed.num_batches_tracked.item() == eager.num_batches_tracked.item()
    assert graphed.num_batches_tracked.item() == len(inputs)


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_over_2_31_elements(fmt, backend):
    gpu_only(backend)
    # 2^31 + a bit fp16 elements (4 GiB each for x, y, dy, dx): 64-bit indexing everywhere.
    if _free_gib() < 40:
        pytest.skip("needs about 40 GiB of free GPU memory")
    C = 4
    if fmt == torch.channels_last:
        shape = (2**31 // (C * 64 * 64) + 1, C, 64, 64)
    else:
        shape = (1, C, 2**29 + 17, 1)
    assert math.prod(shape) > 2**31
    x = torch.empty(shape, dtype=torch.float16, device=backend.device).contiguous(memory_format=fmt)
    x.normal_(1.5, 2.0)
    x[:, 2].add_(3.0)
    w, b, rm, rv = make_params(C, torch.float16, device=backend.device)
    y, mean, invstd, r, d = backend.ops.forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, 1.2, 0.5,
                                              0, 0, 0)
    ref_mean = torch.stack([x[:, c].double().mean() for c in range(C)])
    ref_var = torch.stack([x[:, c].double().var(correction=0) for c in range(C)])
    assert_close(mean.double(), ref_mean, atol=1e-4, rtol=1e-4)
    assert_close(invstd.double(), (ref_var + 1e-5).rsqrt(), atol=1e-4, rtol=1e-4)
    # Spot-check y where offsets exceed 2^31: the last batch item / the last rows.
    scale = (w * r * invstd).view(1, C, 1, 1)
    shift = (b + w * d).view(1, C, 1, 1)
    tail = (slice(-1, None),) if fmt == torch.channels_last else (slice(None), slice(None),
                                                                   slice(-1000, None))
    expected = ((x[tail].float() - mean.view(1, C, 1, 1)) * scale + shift).half()
    assert_close(y[tail], expected, **tolerance(torch.float16))
    del y
    g = torch.empty_like(x).normal_()
    dx, dw, db = backend.ops.backward(g, x, w, mean, invstd, r, d, True, [True, True, True])
    ref_db = torch.stack([g[:, c].double().sum() for c in range(C)])
    assert_close(db.double(), ref_db, atol=1e-3 * math.prod(shape) ** 0.5, rtol=1e-4)
    xhat_t = (x[tail].float() - mean.view(1, C, 1, 1)) * invstd.view(1, C, 1, 1)
    m = math.prod(shape) // C
    expected_dx = (w * r * invstd).view(1, C, 1, 1) * (
        g[tail].float() - (db / m).view(1, C, 1, 1)
        - xhat_t * ((dw - d * db) / r / m).view(1, C, 1, 1))
    assert_close(dx[tail], expected_dx.half(), **tolerance(torch.float16))


# The exception types and words of the Python API (batchrenorm_checks.h): ValueError for a
# shape or a range, TypeError for a dtype, RuntimeError for a device.
@pytest.mark.parametrize("call,error,match", [
    (lambda ops, x, w: ops.forward_eval(x, w[:3], None, w, w, 1e-5), ValueError,
     r"weight must have shape \(C,\) = \(4,\), got \(3,\)"),
    (lambda ops, x, w: ops.forward_eval(x, w.double(), None, w, w, 1e-5), TypeError,
     "weight must be torch.float32 for torch.float32 input, got torch.float64"),
    (lambda ops, x, w: ops.forward_eval(x, w.cpu(), None, w, w, 1e-5), RuntimeError,
     "weight is on cpu"),
    (lambda ops, x, w: ops.forward_eval(x[0, 0, 0], None, None, w, w, 1e-5), ValueError,
     r"rank >= 2, got shape \(3,\)"),
    (lambda ops, x, w: ops.forward_eval(x.int(), None, None, w, w, 1e-5), TypeError,
     "input must be float32, float64, float16 or bfloat16, got torch.int32"),
    (lambda ops, x, w: ops.forward_eval(x, None, None, w, w, 0.0), ValueError, "eps must be > 0"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), None, None, 0.1, 1e-5, 3.0, 5.0,
                                    0, 0, 0), ValueError, "both be tensors or both be None"),
    (lambda ops, x, w: ops.forward_train(x[:1, :, :1, :1], None, None, None, None, None, 0.1, 1e-5,
                                    3.0, 5.0, 0, 0, 0), ValueError,
     r"Expected more than 1 value per channel when training, got input size \(1, 4, 1, 1\)"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None, None, 1e-5,
                                    3.0, 5.0, 0, 0, 0), ValueError, "momentum=None"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), torch.tensor(0), 0.1,
                                    1e-5, 3.0, 5.0, 0, 0, 0), RuntimeError,
     "num_batches_tracked is on cpu"),
    (lambda ops, x, w: ops.backward(x[:1], x, None, w, w, None, None, True, [True, True, True]),
     ValueError, "grad_output must have the input's shape"),
    (lambda ops, x, w: ops.normalize(x, w, w[:2]), ValueError, r"shift must have shape \(C,\)"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None,
                                         float("nan"), 1e-5,
                                         3.0, 5.0, 0, 0, 0), ValueError,
     r"momentum must be in \[0, 1\]"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None, 0.1, 1e-5, 0.5,
                                    5.0, 0, 0, 0), ValueError, "r_max must be >= 1"),
    (lambda ops, x, w: ops.forward_train(x, None, None, None, None,
                                    torch.tensor(1.0, device=x.device), 0.1, 1e-5, 3.0, 5.0,
                                    0, 0, 0), TypeError,
     r"num_batches_tracked must be an int64 scalar tensor, got torch.float32 of shape \(\)"),
])
def test_op_argument_checks(call, error, match, backend):
    if backend != "cuda" and match in ("weight is on cpu", "num_batches_tracked is on cpu"):
        pytest.skip("a device mismatch needs two devices")
    x = torch.randn(2, 4, 3, 3, device=backend.device)
    w = torch.rand(4, device=backend.device) + 0.5
    with pytest.raises(error, match=match):
        call(backend.ops, x, w)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_large_mean_with_d_correction_active(fmt, backend):
    # Mean 3000, std 0.05, running_mean within +-0.04 of the batch mean: d = (mean - running_mean)
    # / sigma must come from the unrounded mean (an fp32 mean near 3000 is off by ~1e-4, 0.5% of
    # d here). Found by the emulator: d was -0.7462 where -0.7499 is right.
    torch.manual_seed(11)
    C = 4
    x64 = torch.randn(8, C, 10, 10, dtype=torch.float64) * 0.05 + 3000.0
    x = x64.float().to(backend.device).contiguous(memory_format=fmt)
    xd = x.double()
    batch_mean = xd.mean((0, 2, 3))
    run_mean = (batch_mean + torch.linspace(-0.04, 0.04, C, dtype=torch.float64,
                                            device=backend.device))
    run_var = torch.full((C,), 0.05**2, dtype=torch.float64, device=backend.device)
    w, b = torch.ones(C, device=backend.device), torch.zeros(C, device=backend.device)
    y, mean, invstd, r, d = backend.ops.forward_train(x, w, b, run_mean.float(), run_var.float(),
                                                      None,
                                              0.1, 1e-5, 3.0, 5.0, 0, 0, 0)
    y_ref = reference.batch_renorm(xd, run_mean.float().double(), run_var.float().double(),
                                   w.double(), b.double(), True, 0.1, 1e-5, 3.0, 5.0)
    sigma = (run_var.float().double() + 1e-5).sqrt()
    d_ref = ((batch_mean - run_mean.float().double()) / sigma).clamp(-5, 5)
    assert_close(d.double(), d_ref, atol=2e-4, rtol=0)
    assert_close(y.double(), y_ref, atol=5e-5 * float(y_ref.abs().max()), rtol=0)
