"""SyncBatchRenorm under DistributedDataParallel on 2 gloo ranks: what nn.SyncBatchNorm supports
(find_unused_parameters, no_sync and gradient accumulation, torch.compile), the collectives a
training step makes, and a non-finite value on one rank. One job of 2 processes runs every
scenario (tests/sync_harness.py); each is checked against one process on the whole batch."""
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda._testing import tolerance
from sync_harness import backend_context, job_backends, run_job, values

SIZES = [3, 5]  # rank 0 holds rows 0-2 of each global batch, rank 1 rows 3-7
RENORM = dict(momentum=0.1, r_max=1.1, d_max=0.1, warmup_steps=0, r_max_ramp_steps=0,
              d_max_ramp_steps=0)
DTYPE = torch.float64


class _Net(nn.Module):
    def __init__(self, norm, unused_branch=False):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), norm(4), nn.ReLU(),
            nn.Conv2d(4, 5, 3, padding=1), norm(5), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
        # Never called: the case of DDP's find_unused_parameters.
        self.unused = nn.Linear(5, 5) if unused_branch else None
        self.to(DTYPE)

    def forward(self, x):
        return self.body(x)


def _net(norm, unused_branch=False):
    return _Net(norm, unused_branch)


def _batch(step, n):
    g = torch.Generator().manual_seed(11 + step)
    return (torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64).to(DTYPE) * 2 + 1,
            torch.randint(0, 3, (n,), generator=g))


def _slice(t, rank):
    return t[sum(SIZES[:rank]):sum(SIZES[:rank + 1])]


# How each mode trains, on every rank and in the one-process oracle alike: (steps, micro-batches
# per step). "accumulate" sums two micro-batches' gradients before each optimizer step, the
# first under DDP's no_sync().
MODES = {"plain": (2, 1), "find_unused": (2, 1), "accumulate": (2, 2), "compiled": (2, 1)}


def _ddp_train(mode):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _net(lambda c: brn.SyncBatchRenorm(c, **RENORM), unused_branch=mode == "find_unused")
    ddp = nn.parallel.DistributedDataParallel(model,
                                              find_unused_parameters=mode == "find_unused")
    step_fn = torch.compile(ddp) if mode == "compiled" else ddp
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    steps, micro = MODES[mode]
    grads = []
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            x, y = _batch(step * micro + m, sum(SIZES))
            # DDP averages gradients over ranks: scale the local sum so that the average is
            # the gradient of the mean loss over the whole batch.
            loss = nn.functional.cross_entropy(step_fn(_slice(x, rank)), _slice(y, rank),
                                               reduction="sum") * world / sum(SIZES)
            if m < micro - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                      if p.grad is not None})
        opt.step()
    return dict(grads=grads, state={k: v.clone() for k, v in model.state_dict().items()})


def _oracle(mode):
    model = _net(lambda c: brn.BatchRenorm2d(c, **RENORM), unused_branch=mode == "find_unused")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    steps, micro = MODES[mode]
    grads = []
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            x, y = _batch(step * micro + m, sum(SIZES))
            nn.functional.cross_entropy(model(x), y).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                      if p.grad is not None})
        opt.step()
    return grads, model.state_dict()


def _collectives_per_step(backend):
    """The gloo collectives of training steps of one layer, counted by the profiler (whatever
    API makes them): the first step adds the one-time [C, dtype] header."""
    backend, context = backend_context(backend)
    layer = brn.SyncBatchRenorm(4, **RENORM, backend=backend)
    counts = []
    for step in range(3):
        x = _slice(torch.randn(sum(SIZES), 4, 3, 3, generator=torch.Generator().manual_seed(step)),
                   dist.get_rank()).requires_grad_()
        with _profile() as forward, context():
            out = layer(x)
        with _profile() as backward, context():
            out.square().sum().backward()
        counts.append((_gloo_events(forward), _gloo_events(backward)))
    layer.eval()
    with _profile() as prof:
        layer(x.detach())
    return dict(train=counts, eval=_gloo_events(prof))


def _profile():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def _gloo_events(prof):
    return sum(1 for e in prof.events() if e.name.startswith("gloo:"))


def _nan_on_one_rank(backend):
    """Rank 1 holds a NaN in channel 0: that channel's output and gradients are NaN on every
    rank, its buffers are kept, the other channels train normally, and every rank ends with the
    same buffers and counter."""
    backend, context = backend_context(backend)
    layer = brn.SyncBatchRenorm(3, **RENORM, backend=backend)
    rank = dist.get_rank()
    x = _slice(torch.randn(sum(SIZES), 3, 4, 4, generator=torch.Generator().manual_seed(5)),
               rank).clone()
    if rank == 1:
        x[1, 0, 2, 3] = float("nan")
    x.requires_grad_()
    with context():
        out = layer(x)
        out.sum().backward()
    return dict(out=out.detach(), grad_input=x.grad, grad_weight=layer.weight.grad,
                buffers={k: v.clone() for k, v in layer.named_buffers()})


def _graph_outliving_its_group():
    """A forward whose backward never runs (an output kept to the end of a script) must not
    keep its group alive past destroy_process_group(): a gloo group alive at interpreter exit
    aborts the process (tests/torchrun_loop.py). Its backward then says what happened."""
    group = dist.new_group([0, 1])
    layer = brn.SyncBatchRenorm(3, process_group=group)
    out = layer(torch.randn(2, 3, 2, requires_grad=True))
    alive = weakref.ref(group)
    dist.destroy_process_group(group)
    del group, layer
    gc.collect()
    try:
        out.sum().backward()
    except RuntimeError as error:
        return dict(group_freed=alive() is None, error=str(error))
    return dict(group_freed=alive() is None, error="no error")


def ddp_job(backends):
    scenarios = [(f"ddp/{mode}", _ddp_train, (mode,)) for mode in MODES]
    scenarios += [(f"collectives/{b}", _collectives_per_step, (b,)) for b in backends]
    scenarios += [(f"nan/{b}", _nan_on_one_rank, (b,)) for b in backends]
    return scenarios + [("graph-outliving-group", _graph_outliving_its_group, ())]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, request):
    return run_job(ddp_job, 2, str(tmp_path_factory.mktemp("ddp")), job_backends(request))


BACKENDS = ["reference",
            pytest.param("fused", marks=pytest.mark.skipif(
                not brn.extension_available("cpu"), reason="the fused CPU kernels are not built")),
            pytest.param("cuda_emulated", marks=pytest.mark.cuda_emulation)]


def _skip_unbuilt(backend, request):
    if backend == "cuda_emulated":
        request.getfixturevalue("cuda_emulation")  # skips (or fails) when it is not built


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_matches_one_process(ddp, mode):
    results = [res["value"] for res in values(ddp, f"ddp/{mode}")]
    grads, state = _oracle(mode)
    tol = tolerance(DTYPE)
    for res in results:
        for step, (got, want) in enumerate(zip(res["grads"], grads)):
            assert got.keys() == want.keys(), (step, got.keys(), want.keys())
            for k, g in want.items():
                assert_close(got[k], g, **tol, msg=lambda m: f"grad of {k}, step {step}: {m}")
        for k, v in state.items():
            assert_close(res["state"][k], v, **tol, msg=lambda m: f"{k} after training: {m}")
        for k, v in results[0]["state"].items():
            assert torch.equal(res["state"][k], v), f"{k} differs between ranks"
    assert int(state["body.1.num_batches_tracked"]) == MODES[mode][0] * MODES[mode][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_collective_forward_one_backward(ddp, backend, request):
    _skip_unbuilt(backend, request)
    for res in values(ddp, f"collectives/{backend}"):
        counts = res["value"]
        assert counts["train"] == [(2, 1), (1, 1), (1, 1)], counts
        assert counts["eval"] == 0, counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_on_one_rank_reaches_every_rank(ddp, backend, request):
    _skip_unbuilt(backend, request)
    results = [res["value"] for res in values(ddp, f"nan/{backend}")]
    fresh = brn.SyncBatchRenorm(3)
    for res in results:
        out, grad = res["out"], res["grad_input"]
        assert out[:, 0].isnan().all() and grad[:, 0].isnan().all()
        assert out[:, 1:].isfinite().all() and grad[:, 1:].isfinite().all()
        assert res["grad_weight"][0].isnan() and res["grad_weight"][1:].isfinite().all()
        buffers = res["buffers"]
        assert buffers["running_mean"][0] == 0 and buffers["running_var"][0] == 1  # kept
        assert not torch.equal(buffers["running_mean"][1:], fresh.running_mean[1:])  # moved
        assert int(buffers["num_batches_tracked"]) == 1
        for k, v in results[0]["buffers"].items():
            assert torch.equal(buffers[k], v), f"{k} differs between ranks"


def test_a_graph_does_not_keep_its_group_alive(ddp):
    for res in values(ddp, "graph-outliving-group"):
        assert res["value"]["group_freed"], "the autograd graph kept the process group alive"
        assert "process group of this forward was destroyed before its backward" in \
            res["value"]["error"], res["value"]["error"]
