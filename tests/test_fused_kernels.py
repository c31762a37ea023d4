"""The fused kernels against the reference (training steps, eval, the modules and the functional
form, their edge cases), with one test body for every backend:
  cpu            the CPU kernels (csrc/cpu);
  cuda           the CUDA build on a GPU (skipped without one);
  cuda_emulated  the same CUDA kernel source and glue logic compiled by g++ and executed on the
                 CPU by the CUDA emulator (tests/cuda_emulation.py, csrc/cuda/emulation): every
                 launch is run under the in-order schedule and 3 random ones, which must agree
                 bit for bit, with outputs, workspace and shared memory poisoned first.
Cases only a GPU can run (CUDA graphs, > 2^31 elements on device memory) skip elsewhere;
tests/test_fused_ops.py keeps what only the CPU kernels have (threads), and tests/test_op_calls.py
the ops called directly.
"""
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
from fused_cases import buffer_tol as _buffer_tol
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
