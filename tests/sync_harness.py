"""Runs scenarios on gloo process groups of 2-4 CPU processes, for the SyncBatchRenorm tests
(tests/test_sync*.py) and the differential campaign (tests/fuzz_campaign.py --sync).

Starting a process costs seconds (importing torch), so a job starts its `world` processes once,
creates one process group, and runs every scenario the job lists on it; each scenario records its
value or its traceback per rank, and how many collectives each rank made. A job is bounded by a
wall clock (the workers are killed and the job fails rather than hang), and every collective by
the process group's own timeout.

The emulated CUDA kernels (tests/cuda_emulation.py) run here too: backend "cuda_emulated" is
backend="fused" with the op namespace swapped for the emulator's, loaded once per process.
"""
from __future__ import annotations

import collections
import contextlib
import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOB_TIMEOUT_S = 150
COLLECTIVE_TIMEOUT_S = 30
EMULATED_NAMESPACE = "batchrenorm_emulated_cuda"


class JobFailed(AssertionError):
    """A job or a scenario failed; the message has every rank's first error."""


class _CountingOps:
    """The emulated op namespace, counting which ops the package looks up through _ops.OPS:
    proof that a "cuda_emulated" scenario ran the emulated kernels, not the CPU ones."""

    def __init__(self, ops):
        self._ops = ops
        self.calls = collections.Counter()

    def __getattr__(self, name):
        self.calls[name] += 1
        return getattr(self._ops, name)


_EMULATION = []


@contextlib.contextmanager
def _emulated_ops():
    from batchrenorm_cuda import _ops

    previous, _ops.OPS = _ops.OPS, _EMULATION[1]
    try:
        yield
    finally:
        _ops.OPS = previous


def backend_context(backend: str):
    """(the backend= value to give the layer, a function returning a context to run it in) for
    "reference", "fused" or "cuda_emulated"."""
    if backend != "cuda_emulated":
        return backend, contextlib.nullcontext
    if not _EMULATION:
        import cuda_emulation

        module = cuda_emulation.load()
        module.set_device(16, 2)
        # The in-order schedule and one random one: the single-process tests run three.
        module.set_random_schedules([1])
        _EMULATION.extend([module, _CountingOps(getattr(torch.ops, EMULATED_NAMESPACE))])
    return "fused", _emulated_ops


def emulated_calls() -> dict:
    """{op name: calls} made through the emulated namespace in this process so far."""
    return dict(_EMULATION[1].calls) if _EMULATION else {}


def job_backends(request) -> list:
    """The backends a test job runs: the reference, the fused CPU kernels when built, and the
    emulated CUDA kernels when built (the cuda_emulation fixture skips without them or, under
    make test, fails)."""
    import batchrenorm_cuda as brn
    import pytest

    backends = ["reference"] + (["fused"] if brn.extension_available("cpu") else [])
    # A run that deselects the emulated kernels (make test-torch: -m "not cuda_emulation")
    # leaves them out of the jobs too: there the emulator may build and not run.
    if "not cuda_emulation" in " ".join((request.config.getoption("markexpr") or "").split()):
        return backends
    try:
        request.getfixturevalue("cuda_emulation")
    except pytest.skip.Exception:
        return backends
    return backends + ["cuda_emulated"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectiveCounter:
    """Counts the collectives SyncBatchRenorm makes (it looks torch.distributed up at call
    time, so patching the module's attributes sees every call)."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce")

    def __init__(self):
        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def snapshot(self):
        return dict(self.counts)


SAVE_EVERY_S = 2.0


def _entry(rank, world, port, outdir, job, args):
    torch.set_num_threads(1)
    results = {}
    saved_at = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        counter = CollectiveCounter()
        for name, scenario, scenario_args in job(*args):
            before = counter.snapshot()
            try:
                value = scenario(*scenario_args)
                after = counter.snapshot()
                results[name] = dict(ok=True, value=value,
                                     collectives={k: after[k] - before[k] for k in after})
            except Exception:
                results[name] = dict(ok=False, error=traceback.format_exc())
            # Saved as we go (every few seconds: a campaign job runs hundreds of scenarios), so
            # that a job killed on timeout still tells what went wrong.
            if time.monotonic() - saved_at > SAVE_EVERY_S:
                torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
                saved_at = time.monotonic()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_results(outdir, world):
    per_rank = []
    for rank in range(world):
        path = os.path.join(outdir, f"rank{rank}.pt")
        per_rank.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
    return per_rank


def _first_errors(outdir, world):
    lines = []
    for rank, results in enumerate(_load_results(outdir, world)):
        done = list(results)
        errors = [(n, r["error"]) for n, r in results.items() if not r["ok"]]
        lines.append(f"rank {rank}: finished {done[-1] if done else 'no scenario'!r}"
                     + (f"; first error in {errors[0][0]}:\n{errors[0][1]}" if errors else ""))
    return "\n".join(lines)


def run_job(job, world, outdir, *args, timeout_s: float = JOB_TIMEOUT_S):
    """Run the scenarios job(*args) lists on `world` gloo ranks; {name: [result per rank]}."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), outdir, job, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    failure = None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                failure = f"workers still running after {timeout_s} s (a collective hangs?)"
                break
    except mp.ProcessRaisedException as error:
        failure = f"a worker raised:\n{error}"
    except mp.ProcessExitedException as error:
        failure = f"a worker died: {error}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    if failure is not None:
        raise JobFailed(f"{job.__name__}: {failure}\n{_first_errors(outdir, world)}")
    per_rank = _load_results(outdir, world)
    return {name: [res.get(name, dict(ok=False, error="did not run")) for res in per_rank]
            for name in per_rank[0]}


def values(results, name):
    """The scenario's value on every rank that ran it; fails with the ranks' tracebacks."""
    assert name in results, f"scenario {name} did not run"
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results[name])
              if not res["ok"]]
    if errors:
        raise JobFailed(f"scenario {name} raised\n" + "\n".join(errors))
    return [res for res in results[name] if res["value"] is not None]


