"""SyncBatchRenorm on torch.distributed (gloo, CPU): ranks holding unequal slices of one batch
against ONE process running the reference Batch Renorm on the whole batch, on every backend of
the synchronised path: the reference passes, the fused CPU building blocks and the emulated CUDA
ones (tests/sync_harness.py runs the processes).

The distributed scenarios run in two jobs, each started once per module: a pair (2 processes,
the default group) and a trio (3 processes: the default group, a 2-rank subgroup [1, 2] and a
1-rank subgroup [0]). tests/test_sync_ddp.py has DistributedDataParallel's features, the
collectives per step and a non-finite rank; tests/test_sync_convert.py convert/revert.
"""
import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda._testing import make_params, tolerance
from batchrenorm_cuda._common import use_fused
from sync_harness import (CollectiveCounter, backend_context, emulated_calls, job_backends,
                          run_job, values)

C, H, W = 3, 4, 5
STEPS = 6
EPS = 1e-5
# A short schedule so that r and d clipping is active within STEPS: bounds 1 / 0 at step 0,
# then ramping to their final values by step 3.
SCHEDULE = dict(r_max=1.25, d_max=0.25, warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=2)

BACKEND_PARAMS = [
    "reference",
    pytest.param("fused", marks=pytest.mark.skipif(
        not brn.extension_available("cpu"), reason="the fused CPU kernels are not built")),
    pytest.param("cuda_emulated", marks=pytest.mark.cuda_emulation),
]


# ---------------------------------------------------------------------------------------------
# Data: one global batch per step; the i-th rank of the group holds rows
# [sum(sizes[:i]), sum(sizes[:i + 1])).

def _global_batch(step, n, dtype, spatial=(H, W)):
    g = torch.Generator().manual_seed(1000 + step)
    # Per-channel scale and offset that change from step to step, so that sigma_B / sigma and
    # (mu_B - running_mean) / sigma leave the clip bounds.
    channel = (1, C) + (1,) * len(spatial)
    scale = (torch.rand(C, generator=g, dtype=torch.float64) * 3 + 0.2).view(channel)
    offset = (torch.randn(C, generator=g, dtype=torch.float64) * 2).view(channel)
    x = torch.randn((n, C) + spatial, generator=g, dtype=torch.float64) * scale + offset
    grad = torch.randn((n, C) + spatial, generator=g, dtype=torch.float64)
    return x.to(dtype), grad.to(dtype)


def _initial_state(dtype, affine=True, tracking=True):
    weight, bias, running_mean, running_var = make_params(
        C, dtype, generator=torch.Generator().manual_seed(7))
    state = {}
    if affine:
        state.update(weight=weight, bias=bias)
    if tracking:
        state.update(running_mean=running_mean, running_var=running_var,
                     num_batches_tracked=torch.tensor(0, dtype=torch.long))
    return state


# name: (job, sizes per rank of the group, input dtype, channels_last, layer options); the
# options' "spatial" is the input's shape after (N, C), (H, W) if not given.
CASES = {
    "w2-f64": ("pair", [3, 5], torch.float64, False, dict(momentum=0.1)),
    "w3-f64-empty-rank": ("trio", [4, 0, 3], torch.float64, False, dict(momentum=0.1)),
    "w3-bf16-cumulative": ("trio", [1, 2, 4], torch.bfloat16, False, dict(momentum=None)),
    # On the subgroup [1, 2] of the trio: group ranks are not global ranks.
    "sub2-f32-channels_last": ("trio", [5, 2], torch.float32, True, dict(momentum=0.1)),
    "sub2-f64-empty-first": ("trio", [0, 4], torch.float64, False, dict(momentum=0.1)),
    "sub2-f32-no-running-stats": ("trio", [2, 6], torch.float32, False,
                                  dict(momentum=0.1, track_running_stats=False, affine=False)),
    "w3-f32-2d-input": ("trio", [5, 3, 6], torch.float32, False,
                        dict(momentum=0.1, spatial=())),
    "sub2-f64-5d-input": ("trio", [2, 1], torch.float64, False,
                          dict(momentum=0.1, spatial=(2, 3, 2))),
}


def _train(group, sizes, dtype, channels_last, options, backend):
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    rank = dist.get_rank(group)
    options = dict(options)
    spatial = options.pop("spatial", (H, W))
    affine = options.get("affine", True)
    tracking = options.get("track_running_stats", True)
    backend, context = backend_context(backend)
    layer = brn.SyncBatchRenorm(C, eps=EPS, **options, **SCHEDULE, process_group=group,
                                dtype=reference.stat_dtype(dtype), backend=backend)
    layer.load_state_dict(_initial_state(dtype, affine, tracking))
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    steps = []
    calls = emulated_calls()
    for step in range(STEPS):
        x, grad = _global_batch(step, sum(sizes), dtype, spatial)
        x = x[lo:hi].contiguous(memory_format=memory_format).requires_grad_()
        with context():
            out = layer(x)
            (out * grad[lo:hi]).sum().backward()
        steps.append(dict(
            out=out.detach(), grad_input=x.grad,
            out_channels_last=out.is_contiguous(memory_format=torch.channels_last),
            grad_weight=layer.weight.grad.clone() if affine else None,
            grad_bias=layer.bias.grad.clone() if affine else None,
            buffers={k: v.clone() for k, v in layer.named_buffers()}))
        layer.zero_grad()
    calls = {k: v - calls.get(k, 0) for k, v in emulated_calls().items()}
    layer.eval()
    x, _ = _global_batch(STEPS, sum(sizes), dtype, spatial)
    with torch.no_grad(), context():
        eval_out = layer(x[lo:hi])
    return dict(steps=steps, eval_out=eval_out, emulated_calls=calls,
                used_fused=use_fused(x, layer.backend, "test"))


def _oracle(sizes, dtype, options):
    """One process, the reference Batch Renorm on the concatenated batch, step by step. Also
    counts the steps in which r, and d, were clipped."""
    options = dict(options)
    spatial = options.pop("spatial", (H, W))
    dims = (0,) + tuple(range(2, 2 + len(spatial)))
    affine = options.get("affine", True)
    tracking = options.get("track_running_stats", True)
    state = _initial_state(dtype, affine, tracking)
    weight = state["weight"].requires_grad_() if affine else None
    bias = state["bias"].requires_grad_() if affine else None
    rm, rv, nbt = (state.get(k) for k in ("running_mean", "running_var", "num_batches_tracked"))
    steps, clipped_r, clipped_d = [], 0, 0
    for step in range(STEPS):
        x, grad = _global_batch(step, sum(sizes), dtype, spatial)
        x.requires_grad_()
        if tracking:
            xs = x.detach().double()
            sigma = (rv.double() + EPS).sqrt()
            r_raw = (xs.var(dims, correction=0) + EPS).sqrt() / sigma
            d_raw = (xs.mean(dims) - rm.double()) / sigma
            r_max, d_max = reference.clip_bounds(nbt, **SCHEDULE)
            clipped_r += bool((r_max > 1) & ((r_raw > r_max) | (r_raw < 1 / r_max)).any())
            clipped_d += bool((d_max > 0) & (d_raw.abs() > d_max).any())
        out = reference.batch_renorm(x, rm, rv, weight, bias, True, options["momentum"], EPS,
                                     SCHEDULE["r_max"], SCHEDULE["d_max"], nbt,
                                     SCHEDULE["warmup_steps"], SCHEDULE["r_max_ramp_steps"],
                                     SCHEDULE["d_max_ramp_steps"])
        (out * grad).sum().backward()
        steps.append(dict(out=out.detach(), grad_input=x.grad,
                          grad_weight=weight.grad.clone() if affine else None,
                          grad_bias=bias.grad.clone() if affine else None,
                          buffers=dict(running_mean=rm.clone(), running_var=rv.clone(),
                                       num_batches_tracked=nbt.clone()) if tracking else {}))
        if affine:
            weight.grad = bias.grad = None
    eval_out = None
    if tracking:
        with torch.no_grad():
            eval_x = _global_batch(STEPS, sum(sizes), dtype, spatial)[0]
            eval_out = reference.batch_renorm(eval_x, rm, rv, weight, bias, False)
    return steps, clipped_r, clipped_d, eval_out


# ---------------------------------------------------------------------------------------------
# Misuse and fallbacks.

def _mismatched_channels():
    channels = 4 if dist.get_rank() == 0 else 5
    layer = brn.SyncBatchRenorm(channels)
    try:
        layer(torch.randn(3, channels, 2, 2))
    except ValueError as error:
        return str(error)
    return "no error"


def _steps_against_batchrenorm(shape, make_sync, steps=4):
    """Train SyncBatchRenorm and BatchRenormNd side by side on the same data; eval too.
    Unsynchronised, they must agree bit for bit."""
    renorm_type = {2: brn.BatchRenorm1d, 3: brn.BatchRenorm1d, 4: brn.BatchRenorm2d,
                   5: brn.BatchRenorm3d}[len(shape)]
    sync, plain = make_sync(), renorm_type(shape[1], momentum=0.1, **SCHEDULE)
    plain.load_state_dict(sync.state_dict())
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(shape, generator=gen) * (step + 1) + step
        g = torch.randn(shape, generator=gen)
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yp = sync(xs), plain(xp)
        (ys * g).sum().backward()
        (yp * g).sum().backward()
        assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad), f"step {step}"
        assert torch.equal(sync.weight.grad, plain.weight.grad), f"step {step}"
    for (name, a), b in zip(sync.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name
    assert int(sync.num_batches_tracked) == steps
    sync.eval(), plain.eval()
    x = torch.randn(shape, generator=gen)
    assert torch.equal(sync(x), plain(x))
    return True


FALLBACK_SHAPES = ((6, C), (6, C, 5), (2, C, 3, 4), (2, C, 2, 3, 2))


def _one_rank_group(group):
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    for shape in FALLBACK_SHAPES:
        _steps_against_batchrenorm(
            shape, lambda: brn.SyncBatchRenorm(shape[1], momentum=0.1, **SCHEDULE,
                                               process_group=group))
    return True


def _every_rank_empty(group):
    """No rank has a sample: as BatchRenorm on an empty batch, buffers untouched, the counter
    advanced, zero (finite) parameter gradients; the collectives still run."""
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    layer = brn.SyncBatchRenorm(C, momentum=0.1, **SCHEDULE, process_group=group)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = torch.randn(0, C, H, W, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(C))
    assert torch.equal(layer.bias.grad, torch.zeros(C))
    assert torch.equal(layer.running_mean, before["running_mean"])
    assert torch.equal(layer.running_var, before["running_var"])
    assert int(layer.num_batches_tracked) == 1
    return True


def _one_value_per_channel(group):
    """A global batch of one value per channel: the buffers are kept (unbiased variance 0/0),
    the counter advances, the output is finite."""
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    layer = brn.SyncBatchRenorm(C, momentum=0.1, process_group=group)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    out = layer(torch.randn(1 - dist.get_rank(group), C))
    assert torch.isfinite(out).all()
    assert torch.equal(layer.running_mean, before["running_mean"])
    assert torch.equal(layer.running_var, before["running_var"])
    assert int(layer.num_batches_tracked) == 1
    return True


def _not_a_member(group):
    """A rank given a group it does not belong to gets a clear error (members skip this)."""
    if group != dist.GroupMember.NON_GROUP_MEMBER:
        return None
    try:
        brn.SyncBatchRenorm(C, process_group=group)(torch.randn(4, C, 2, 2))
    except RuntimeError as error:
        return str(error)
    return "no error"


def _half_parameters():
    """model.half(): half parameters and buffers compute in float32 over the group, as the
    single-process layer does. Against the same layer with float32 copies of the same values:
    the output and input gradient are identical, the parameter gradients and buffers are its
    own rounded to half."""
    half = brn.SyncBatchRenorm(C, momentum=0.1, **SCHEDULE).half()
    full = brn.SyncBatchRenorm(C, momentum=0.1, **SCHEDULE)
    full.load_state_dict({k: v.float() if v.is_floating_point() else v
                          for k, v in half.state_dict().items()})
    gen = torch.Generator().manual_seed(11 + dist.get_rank())
    x = (torch.randn(3, C, H, W, generator=gen) * 2 + 1).half()
    grad = torch.randn(3, C, H, W, generator=gen).half()
    xh, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_h, out_f = half(xh), full(xf)
    (out_h * grad).sum().backward()
    (out_f * grad).sum().backward()
    assert out_h.dtype == torch.float16 and torch.equal(out_h, out_f)
    assert torch.equal(xh.grad, xf.grad)
    for (name, p_h), p_f in zip(half.named_parameters(), full.parameters()):
        assert p_h.grad.dtype == torch.float16 and torch.equal(p_h.grad, p_f.grad.half()), name
    for (name, b_h), b_f in zip(half.named_buffers(), full.buffers()):
        assert torch.equal(b_h, b_f.to(b_h.dtype)), name
    assert half.running_mean.dtype == torch.float16 and int(half.num_batches_tracked) == 1
    return True


def _destroyed_group(group):
    """Run last: a layer whose group was destroyed raises a clear error, no hang, no silent
    fallback."""
    layer = brn.SyncBatchRenorm(C, process_group=group)
    dist.destroy_process_group()
    try:
        layer(torch.randn(4, C, 2, 2))
    except RuntimeError as error:
        return str(error)
    return "no error"


# ---------------------------------------------------------------------------------------------
# The two jobs.

def _train_name(case, backend):
    return f"train/{case}/{backend}"


def pair_job(backends):
    scenarios = [(_train_name(case, backend), _train, (None,) + CASES[case][1:] + (backend,))
                 for backend in backends for case in CASES if CASES[case][0] == "pair"]
    scenarios += [("mismatch", _mismatched_channels, ()),
                  ("half-parameters", _half_parameters, ())]
    return scenarios


def trio_job(backends):
    # Every rank creates every group, in the same order (torch.distributed's rule).
    sub2 = dist.new_group([1, 2])
    sub1 = dist.new_group([0])
    scenarios = []
    for backend in backends:
        for case, (job, sizes, *rest) in CASES.items():
            if job == "trio":
                group = None if len(sizes) == 3 else sub2
                scenarios.append((_train_name(case, backend), _train,
                                  (group, sizes, *rest, backend)))
    scenarios += [("every-rank-empty", _every_rank_empty, (sub2,)),
                  ("one-value-per-channel", _one_value_per_channel, (sub2,)),
                  ("one-rank-group", _one_rank_group, (sub1,)),
                  ("not-a-member", _not_a_member, (sub2,)),
                  ("destroyed-group", _destroyed_group, (sub2,))]
    return scenarios


@pytest.fixture(scope="module")
def pair(tmp_path_factory, request):
    return run_job(pair_job, 2, str(tmp_path_factory.mktemp("pair")), job_backends(request))


@pytest.fixture(scope="module")
def trio(tmp_path_factory, request):
    return run_job(trio_job, 3, str(tmp_path_factory.mktemp("trio")), job_backends(request))


# ---------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_one_process_on_the_whole_batch(case, backend, request):
    if backend == "cuda_emulated":
        request.getfixturevalue("cuda_emulation")  # skips (or fails) when it is not built
    job, sizes, dtype, channels_last, options = CASES[case]
    results = values(request.getfixturevalue(job), _train_name(case, backend))
    assert len(results) == len(sizes)
    got_by_rank = [res["value"] for res in results]
    expected, clipped_r, clipped_d, eval_expected = _oracle(sizes, dtype, options)
    tol, stat_tol = tolerance(dtype), tolerance(reference.stat_dtype(dtype))
    tracking = options.get("track_running_stats", True)
    affine = options.get("affine", True)
    if tracking:
        assert clipped_r >= 2 and clipped_d >= 2, "the test data must make r and d clip"
    assert all(v["used_fused"] == (backend != "reference") for v in got_by_rank)
    blocks = ("batch_stats", "normalize", "backward_reduce", "backward_input")
    for v, n in zip(got_by_rank, sizes):
        # Each training step's building blocks ran on the emulator (an empty slice runs none).
        calls = [v["emulated_calls"].get(op, 0) for op in blocks]
        assert calls == [STEPS if backend == "cuda_emulated" and n > 0 else 0] * 4, calls

    for step, want in enumerate(expected):
        got = [v["steps"][step] for v in got_by_rank]
        where = f"step {step}"
        assert_close(torch.cat([g["out"] for g in got]), want["out"], **tol,
                     msg=lambda m: f"output, {where}: {m}")
        assert_close(torch.cat([g["grad_input"] for g in got]), want["grad_input"], **tol,
                     msg=lambda m: f"grad_input, {where}: {m}")
        if channels_last:
            assert all(g["out_channels_last"] for g, n in zip(got, sizes) if n > 0)
        if affine:
            # DDP sums the ranks' local parameter gradients.
            assert_close(sum(g["grad_weight"] for g in got), want["grad_weight"], **stat_tol,
                         msg=lambda m: f"grad_weight, {where}: {m}")
            assert_close(sum(g["grad_bias"] for g in got), want["grad_bias"], **stat_tol,
                         msg=lambda m: f"grad_bias, {where}: {m}")
        for name, value in want["buffers"].items():
            assert_close(got[0]["buffers"][name], value, **stat_tol,
                         msg=lambda m: f"{name}, {where}: {m}")
            for rank in range(1, len(got)):
                assert torch.equal(got[rank]["buffers"][name], got[0]["buffers"][name]), \
                    f"{name} differs between group ranks 0 and {rank} after {where}"
    if tracking:
        assert int(got_by_rank[0]["steps"][-1]["buffers"]["num_batches_tracked"]) == STEPS
        assert_close(torch.cat([v["eval_out"] for v in got_by_rank]), eval_expected, **tol)
    for res in results:
        # One all_gather per training step plus the [C, dtype] header once, one all_reduce
        # per backward, and nothing for eval.
        assert res["collectives"] == dict(all_gather=STEPS + 1, all_gather_into_tensor=0,
                                          all_reduce=STEPS)


def test_channel_mismatch_raises_on_every_rank(pair):
    messages = [res["value"] for res in values(pair, "mismatch")]
    assert len(messages) == 2
    for message in messages:
        assert "disagree on the number of channels" in message, message
        assert "rank 0: C=4" in message and "rank 1: C=5" in message, message


def test_half_parameters_compute_in_float32(pair):
    results = values(pair, "half-parameters")
    assert len(results) == 2
    for res in results:
        assert res["value"] is True, res["value"]
        assert res["collectives"]["all_reduce"] == 2  # both layers synchronised their backward


def test_one_rank_group_is_batchrenorm(trio):
    (result,) = values(trio, "one-rank-group")
    assert result["value"] is True
    assert result["collectives"] == dict.fromkeys(CollectiveCounter.NAMES, 0)


def test_every_rank_empty(trio):
    results = values(trio, "every-rank-empty")
    assert len(results) == 2
    for res in results:
        assert res["value"] is True
        assert res["collectives"] == dict(all_gather=2, all_gather_into_tensor=0, all_reduce=1)


def test_one_value_per_channel_keeps_buffers(trio):
    results = values(trio, "one-value-per-channel")
    assert len(results) == 2 and all(res["value"] is True for res in results)


def test_rank_outside_its_group_raises(trio):
    (result,) = values(trio, "not-a-member")
    assert "not a member of the process_group" in result["value"], result["value"]


def test_destroyed_group_raises(trio):
    for res in values(trio, "destroyed-group"):
        assert "torch.distributed is not initialized" in res["value"], res["value"]


def test_uninitialised_is_batchrenorm():
    assert not dist.is_initialized()
    for shape in FALLBACK_SHAPES:
        assert _steps_against_batchrenorm(
            shape, lambda: brn.SyncBatchRenorm(shape[1], momentum=0.1, **SCHEDULE))
    # The same checks as BatchRenorm's on one process.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        brn.SyncBatchRenorm(C)(torch.randn(1, C))
    with pytest.raises(ValueError, match="rank >= 2"):
        brn.SyncBatchRenorm(C)(torch.randn(C))
    with pytest.raises(ValueError, match="expected num_features=3"):
        brn.SyncBatchRenorm(C)(torch.randn(2, 4, 3))


def test_process_group_without_init_raises():
    layer = brn.SyncBatchRenorm(C, process_group=object())
    with pytest.raises(RuntimeError, match="process_group was given but torch.distributed is "
                                           "not initialized"):
        layer(torch.randn(4, C, 2, 2))
    layer.eval()  # eval never synchronises, so it needs no group
    assert layer(torch.randn(4, C, 2, 2)).shape == (4, C, 2, 2)
