"""Differential fuzzing of SyncBatchRenorm over gloo against the float64 oracle of
tests/fuzz_campaign.py run on the concatenated batch.

Each case is drawn from its seed alone: a world size of 1-4 ranks, unequal slices of one global
batch (empty ones included), the four dtypes, the layouts of fuzz_campaign.py, affine on/off
(bias on/off), running statistics on/off, momentum None or a float, a schedule whose first step
falls in warm-up, a ramp or after it, 1-3 training steps then eval. Every rank runs the case on
each backend (the reference passes, the fused CPU blocks, the emulated CUDA blocks for small
cases), and the parent compares: the concatenated outputs and input gradients, the weight and
bias gradients summed over the ranks (as DDP sums them), and on every rank the running buffers
and num_batches_tracked, which must also be identical across ranks.

One process group per world size serves every case of that size: starting processes costs
seconds, a case milliseconds.

    python tests/fuzz_sync.py --cases 600             # part of `make fuzz`
    python tests/fuzz_sync.py --repro 1234 [--world 3]   # one case, with its details

tests/test_fuzz.py runs a fixed-seed slice in `make test`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import batchrenorm_cuda as brn  # noqa: E402
import fuzz_campaign as fc  # noqa: E402
import sync_harness  # noqa: E402
from batchrenorm_cuda import reference  # noqa: E402
from batchrenorm_cuda._testing import (DTYPES, buffer_tolerance, grad_tolerance,  # noqa: E402
                                       mismatch, tolerance)

WORLD_SIZES = (1, 2, 3, 4)
# Rows per rank: zeros for empty slices, unequal sizes.
ROWS = (0, 1, 1, 2, 3, 5)
EMULATED_MAX_NUMEL = 1200


@dataclasses.dataclass
class SyncCase:
    seed: int
    world: int
    rows: Tuple[int, ...]  # per rank
    shape: Tuple[int, ...]  # of the global batch
    dtype: str
    layout: str
    affine: bool
    bias: bool
    running: bool
    momentum: Optional[float]
    eps: float
    schedule: Dict[str, float]
    start_step: int
    steps: int
    eval: bool
    scale: float
    offset: float

    def repro(self) -> str:
        return f"python tests/fuzz_sync.py --repro {self.seed}"

    def oracle_case(self) -> fc.Case:
        """The same case in fuzz_campaign's terms, for its oracle_step."""
        return fc.Case(seed=self.seed, shape=self.shape, dtype=self.dtype, layout=self.layout,
                       grad_layout="contiguous", weight=self.affine,
                       bias=self.affine and self.bias, running=self.running,
                       counter=self.running, momentum=self.momentum, eps=self.eps,
                       schedule=self.schedule, start_step=self.start_step, phase="",
                       steps=self.steps, eval=self.eval, mask=(True, True, True),
                       scale=self.scale, offset=self.offset)


def draw_case(seed: int, world: Optional[int] = None) -> SyncCase:
    rng = random.Random(seed)
    world = world or rng.choice(WORLD_SIZES)
    while True:
        rows = tuple(rng.choice(ROWS) for _ in range(world))
        rank = rng.choice((2, 3, 4, 4, 5))
        channels = rng.choice((1, 2, 3, 5, 8, 13))
        spatial = tuple(rng.choice((1, 2, 3, 5)) for _ in range(rank - 2))
        shape = (sum(rows), channels) + spatial
        # Training needs more than one value per channel in the whole batch (BatchRenorm raises
        # otherwise; SyncBatchRenorm, which cannot see that without a host read, keeps the
        # buffers) and a value on some rank.
        if sum(rows) * torch.Size(spatial).numel() > 1 and torch.Size(shape).numel() <= 4000:
            break
    momentum = None if rng.random() < 0.2 else rng.choice((0.0, 0.1, 0.5, 1.0))
    warmup = rng.choice((0, 1, 2, 5))
    ramp_r, ramp_d = rng.choice((0, 1, 3)), rng.choice((0, 2, 4))
    schedule = dict(r_max=rng.choice((1.0, 1.5, 3.0)), d_max=rng.choice((0.0, 0.5, 5.0)),
                    warmup_steps=warmup, r_max_ramp_steps=ramp_r, d_max_ramp_steps=ramp_d)
    running = rng.random() < 0.8
    return SyncCase(
        seed=seed, world=world, rows=rows, shape=shape, dtype=str(rng.choice(DTYPES))[6:],
        layout=rng.choice(fc.LAYOUTS), affine=rng.random() < 0.75, bias=rng.random() < 0.75,
        running=running, momentum=momentum, eps=rng.choice((1e-5, 1e-3, 0.1)),
        schedule=schedule,
        start_step=rng.choice((0, max(warmup - 1, 0), warmup, warmup + max(ramp_r, ramp_d), 1000)),
        steps=rng.choice((1, 2, 3)), eval=running and rng.random() < 0.6,
        scale=rng.choice((0.5, 1.7, 4.0)), offset=rng.choice((0.0, 0.4, -3.0)))


def _data(case: SyncCase, step: int):
    """The global batch and output gradient of a step, float64 values of the case's dtype."""
    g = torch.Generator().manual_seed(case.seed * 7919 + step)
    dtype = getattr(torch, case.dtype)
    x = (torch.randn(case.shape, generator=g, dtype=torch.float64) * case.scale + case.offset)
    dy = torch.randn(case.shape, generator=g, dtype=torch.float64)
    return x.to(dtype).double(), dy.to(dtype).double()


def _rank_slice(case: SyncCase, rank: int, t: torch.Tensor) -> torch.Tensor:
    lo = sum(case.rows[:rank])
    return t[lo:lo + case.rows[rank]]


def _base(case: SyncCase) -> Dict[str, torch.Tensor]:
    return fc._base_params(case.shape[1], torch.Generator().manual_seed(case.seed))


def run_on_rank(case: SyncCase, backend: str):
    """This rank's part of the case: per step its output, grads and buffers."""
    rank = dist.get_rank()
    dtype = getattr(torch, case.dtype)
    sdt = reference.stat_dtype(dtype)
    backend_arg, context = sync_harness.backend_context(backend)
    layer = brn.SyncBatchRenorm(
        case.shape[1], eps=case.eps, momentum=case.momentum, affine=case.affine,
        track_running_stats=case.running, bias=case.bias, backend=backend_arg, dtype=sdt,
        **case.schedule)
    base = _base(case)
    with torch.no_grad():
        if case.affine:
            layer.weight.copy_(base["weight"])
            if layer.bias is not None:
                layer.bias.copy_(base["bias"])
        if case.running:
            layer.running_mean.copy_(base["running_mean"])
            layer.running_var.copy_(base["running_var"])
            layer.num_batches_tracked.fill_(case.start_step)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    gen = torch.Generator().manual_seed(case.seed)
    steps = []
    for step, training in enumerate([True] * case.steps + ([False] if case.eval else [])):
        x64, dy64 = _data(case, step)
        # detach: a new leaf with the layout's strides (a clone would lose non-dense ones).
        x = fc.make_layout(_rank_slice(case, rank, x64), case.layout, gen).to(dtype).detach()
        dy = _rank_slice(case, rank, dy64).to(dtype)
        layer.train(training)
        x.requires_grad_(training)
        with context():
            y = layer(x)
            grads = (torch.autograd.grad(y, [x] + params, dy) if training
                     else [None] * (1 + len(params)))
        record = dict(out=y.detach(), grad_input=grads[0],
                      buffers={k: v.clone() for k, v in layer.named_buffers()})
        record["grad_weight"] = grads[1] if case.affine else None
        record["grad_bias"] = grads[2] if layer.bias is not None else None
        steps.append(record)
    return steps


def backends_for(case: SyncCase, emulated: bool) -> List[str]:
    fused = ["fused"] if brn.extension_available("cpu") else []
    small = torch.Size(case.shape).numel() <= EMULATED_MAX_NUMEL
    return ["reference"] + fused + (["cuda_emulated"] if emulated and small else [])


def job(seeds, world, emulated):
    return [(f"{seed}/{b}", run_on_rank, (draw_case(seed, world), b))
            for seed in seeds for b in backends_for(draw_case(seed, world), emulated)]


def oracle(case: SyncCase):
    """fuzz_campaign's float64 oracle on the concatenated batch, step by step."""
    ocase = case.oracle_case()
    params = fc.Params(ocase, _base(case), torch.float64)
    out = []
    for step, training in enumerate([True] * case.steps + ([False] if case.eval else [])):
        x64, dy64 = _data(case, step)
        y, grads = fc.oracle_step(ocase, params, x64, dy64, training)
        out.append(dict(out=y, grads=grads if training else [None] * 3,
                        buffers=dict(running_mean=params.running_mean,
                                     running_var=params.running_var,
                                     num_batches_tracked=params.num_batches_tracked)
                        if case.running else {}))
        out[-1]["buffers"] = {k: v.clone() for k, v in out[-1]["buffers"].items()}
    return out


def compare(case: SyncCase, backend: str, per_rank: List[list]) -> List[str]:
    """Every mismatch of one backend's run of the case against the oracle."""
    dtype = getattr(torch, case.dtype)
    tol = tolerance(dtype)
    problems = []
    for step, want in enumerate(oracle(case)):
        got = [steps[step] for steps in per_rank]
        where = f"{backend} step {step}"
        m = case.shape[0] * torch.Size(case.shape[2:]).numel()
        x64, _ = _data(case, step)
        training = want["grads"][0] is not None
        ocase = case.oracle_case()
        params = fc.Params(ocase, _base(case), torch.float64)
        dx_scale = fc._dx_scale(x64, params, ocase, training) if training else 1.0
        checks = [("output", torch.cat([g["out"] for g in got]), want["out"], tol)]
        if training:
            checks.append(("grad_input", torch.cat([g["grad_input"] for g in got]),
                           want["grads"][0], dict(tol, atol=tol["atol"] * dx_scale)))
            for name, i in (("grad_weight", 1), ("grad_bias", 2)):
                parts = [g[name] for g in got]
                if (parts[0] is None) != (want["grads"][i] is None):
                    problems.append(f"{where} {name}: present {parts[0] is not None}, "
                                    f"expected {want['grads'][i] is not None}")
                elif parts[0] is not None:
                    checks.append((name, sum(parts), want["grads"][i],
                                   grad_tolerance(dtype, m)))
        for name, value in want["buffers"].items():
            if name == "num_batches_tracked":
                counts = [int(g["buffers"][name]) for g in got]
                if counts != [int(value)] * len(got):
                    problems.append(f"{where} num_batches_tracked {counts}, expected {int(value)}")
                continue
            checks.append((name, got[0]["buffers"][name], value, buffer_tolerance(dtype)))
            for rank in range(1, len(got)):
                if not torch.equal(got[rank]["buffers"][name], got[0]["buffers"][name]):
                    problems.append(f"{where} {name} differs between ranks 0 and {rank}")
        for name, a, b, tol_of in checks:
            err = mismatch(a, b, **tol_of)
            if err:
                problems.append(f"{where} {name}: {err}")
    return problems


def run_world(seeds: List[int], world: int, emulated: bool, timeout_s: float):
    """{seed: [problems]} for the cases of one world size, on one process group."""
    with tempfile.TemporaryDirectory() as outdir:
        try:
            results = sync_harness.run_job(job, world, outdir, seeds, world, emulated,
                                           timeout_s=timeout_s)
        except sync_harness.JobFailed as error:
            return {seed: [f"job of world size {world} failed: {str(error)[:2000]}"]
                    for seed in seeds}
    problems = {}
    for seed in seeds:
        case = draw_case(seed, world)
        found = []
        for b in backends_for(case, emulated):
            ranks = results.get(f"{seed}/{b}")
            if ranks is None:
                found.append(f"{b}: did not run")
            elif not all(r["ok"] for r in ranks):
                found.append(f"{b} raised: " + next(r["error"] for r in ranks if not r["ok"])
                             .strip().splitlines()[-1])
            else:
                found += compare(case, b, [r["value"] for r in ranks])
        problems[seed] = found
    return problems


def emulation_available() -> bool:
    try:
        import cuda_emulation

        cuda_emulation.load()
        return True
    except Exception as error:  # noqa: BLE001 - no toolkit headers or Boost.Fiber
        print(f"fuzz_sync: emulated CUDA kernels not built ({error}); running without them",
              file=sys.stderr)
        return False


def campaign(cases: int, seed: int, emulated: bool, timeout_s: float) -> int:
    t0 = time.time()
    seeds = [seed * 1_000_000 + i for i in range(cases)]
    # A case's world size comes from its seed; one job per world size runs them all.
    by_world: Dict[int, List[int]] = {}
    for s in seeds:
        by_world.setdefault(draw_case(s).world, []).append(s)
    problems, counts = {}, {}
    for world, group in sorted(by_world.items()):
        problems.update(run_world(group, world, emulated, timeout_s))
        for s in group:
            case = draw_case(s, world)
            for key in (f"world {world}", f"dtype {case.dtype}", f"layout {case.layout}",
                        f"rank {len(case.shape)}", "empty slice" if 0 in case.rows else None,
                        "affine" if case.affine else "not affine",
                        "running stats" if case.running else "no running stats",
                        "momentum None" if case.momentum is None else None,
                        "eval" if case.eval else None,
                        "emulated" if "cuda_emulated" in backends_for(case, emulated) else None):
                if key:
                    counts[key] = counts.get(key, 0) + 1
    failures = 0
    for s in seeds:
        if problems.get(s):
            failures += 1
            print(f"MISMATCH seed {s}: {problems[s][0]}\n  repro: {draw_case(s).repro()}")
    print(f"\nfuzz_sync: {len(seeds)} SyncBatchRenorm cases in {time.time() - t0:.0f} s, "
          "gloo world sizes " + ", ".join(str(w) for w in sorted(by_world))
          + "; backends reference, fused CPU" + (", emulated CUDA" if emulated else "")
          + " vs the float64 oracle on the concatenated batch")
    print("fuzz_sync: coverage " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"fuzz_sync: {failures} cases with mismatches, {len(seeds) - failures} clean")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-emulation", action="store_true")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds per world size's job")
    parser.add_argument("--repro", type=int, help="run one case, by its seed, and describe it")
    parser.add_argument("--world", type=int, help="with --repro: the world size the case ran "
                        "at, when a slice fixed it (tests/test_fuzz.py uses 3)")
    args = parser.parse_args(argv)
    emulated = not args.no_emulation and emulation_available()
    if args.repro is not None:
        case = draw_case(args.repro, args.world)
        print(json.dumps(dataclasses.asdict(case)))
        found = run_world([args.repro], case.world, emulated, args.timeout)[args.repro]
        print("\n".join(found) or "no mismatch")
        return 1 if found else 0
    return campaign(args.cases, args.seed, emulated, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
