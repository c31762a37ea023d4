"""Differential fuzzing of every backend against a float64 oracle.

Each case is drawn from its seed alone (so `--repro SEED` replays it exactly): rank 2-5, sizes
with 1s and primes, the four dtypes, seven layouts, affine on/off (weight and bias apart),
running statistics on/off, momentum None, a step counter or none, a schedule whose first step
falls in warm-up, in a ramp or after it, 0-3 training steps then eval, and a random backward
output mask. The package's reference (in the input's dtype), the fused CPU kernels and the
emulated CUDA kernels (tests/cuda_emulation.py) each run the case, and every output, gradient,
running buffer and num_batches_tracked is compared with batchrenorm_cuda.reference run in
float64 on the same values, under batchrenorm_cuda._testing.TOLERANCES.

    python tests/fuzz_campaign.py --cases 5000 --jobs 2        # part of `make fuzz`
    python tests/fuzz_campaign.py --repro 1234                 # one case, with its details

tests/test_fuzz.py runs a fixed-seed slice in `make test`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from batchrenorm_cuda import reference  # noqa: E402
from batchrenorm_cuda._ops import memory_format_of  # noqa: E402
from batchrenorm_cuda.functional import batch_renorm_scheduled as _batch_renorm  # noqa: E402
from batchrenorm_cuda._testing import (DTYPES, buffer_tolerance, fused_ops_namespace,  # noqa: E402
                                       grad_tolerance, mismatch, tolerance)

SIZES = (1, 1, 2, 3, 4, 5, 7, 8, 11, 13)
CHANNELS = (1, 2, 3, 5, 7, 8, 13, 16, 17)
LAYOUTS = ("contiguous", "channels_last", "slice", "stride", "transpose", "offset", "permute")
# The emulator runs every CUDA thread as a fiber: cases for it stay this small.
EMULATED_MAX_NUMEL = 1500
HOST_MAX_NUMEL = 6000
EMULATED_NAMESPACE = "batchrenorm_emulated_cuda"


@dataclasses.dataclass
class Case:
    seed: int
    shape: Tuple[int, ...]
    dtype: str
    layout: str
    grad_layout: str
    weight: bool
    bias: bool
    running: bool
    counter: bool
    momentum: Optional[float]
    eps: float
    schedule: Dict[str, float]
    start_step: int
    phase: str
    steps: int
    eval: bool
    mask: Tuple[bool, bool, bool]
    scale: float
    offset: float

    def repro(self) -> str:
        return f"python tests/fuzz_campaign.py --repro {self.seed}"


def _shape(rng: random.Random, rank: int, max_numel: int) -> Tuple[int, ...]:
    while True:
        shape = (rng.choice(SIZES), rng.choice(CHANNELS)) + tuple(
            rng.choice(SIZES) for _ in range(rank - 2))
        if 0 < torch.Size(shape).numel() <= max_numel:
            return shape


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    rank = rng.choice((2, 3, 4, 4, 5))
    shape = _shape(rng, rank, EMULATED_MAX_NUMEL if rng.random() < 0.8 else HOST_MAX_NUMEL)
    dtype = rng.choice(DTYPES)
    running = rng.random() < 0.8
    counter = rng.random() < 0.8
    # momentum None is a cumulative average over the counter: it needs one.
    momentum = None if (counter and rng.random() < 0.2) else rng.choice((0.0, 0.1, 0.5, 1.0))
    warmup = rng.choice((0, 1, 2, 5))
    ramp_r, ramp_d = rng.choice((0, 1, 3)), rng.choice((0, 2, 4))
    schedule = dict(r_max=rng.choice((1.0, 1.5, 3.0)), d_max=rng.choice((0.0, 0.5, 5.0)),
                    warmup_steps=warmup, r_max_ramp_steps=ramp_r, d_max_ramp_steps=ramp_d)
    start = rng.choice((0, max(warmup - 1, 0), warmup, warmup + 1, warmup + max(ramp_r, ramp_d),
                        1000))
    if not counter:
        phase = "final"
    elif start < warmup:
        phase = "warmup"
    elif start < warmup + max(ramp_r, ramp_d):
        phase = "ramp"
    else:
        phase = "final"
    values_per_channel = torch.Size(shape).numel() // shape[1]
    # Training needs more than one value per channel (as nn.BatchNorm): such a case is eval only.
    steps = rng.choice((1, 1, 2, 3)) if values_per_channel > 1 else 0
    evaluate = running and (steps == 0 or rng.random() < 0.6)
    if steps == 0 and not evaluate:
        running, evaluate = True, True
    return Case(seed=seed, shape=shape, dtype=str(dtype).split(".")[1],
                layout=rng.choice(LAYOUTS), grad_layout=rng.choice(LAYOUTS),
                weight=rng.random() < 0.75, bias=rng.random() < 0.75, running=running,
                counter=counter, momentum=momentum, eps=rng.choice((1e-5, 1e-3, 0.1)),
                schedule=schedule, start_step=start, phase=phase, steps=steps, eval=evaluate,
                mask=tuple(rng.random() < 0.7 for _ in range(3)),
                scale=rng.choice((0.5, 1.7, 4.0)), offset=rng.choice((0.0, 0.4, -3.0)))


def make_layout(values: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """`values` (float64, contiguous) as a tensor of the same shape in layout `kind`."""
    shape, rank = tuple(values.shape), values.dim()
    if kind == "channels_last" and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        return values.contiguous(memory_format=fmt)
    if kind == "slice":  # every other channel of a wider tensor
        big = torch.zeros((shape[0], shape[1] * 2) + shape[2:], dtype=values.dtype)
        big[:, ::2] = values
        return big[:, ::2]
    if kind == "stride":  # a step on the last dimension
        big = torch.zeros(shape[:-1] + (shape[-1] * 3,), dtype=values.dtype)
        big[..., ::3] = values
        return big[..., ::3]
    if kind == "offset":  # dense, but the storage starts one element in (misaligned vectors)
        flat = torch.zeros(values.numel() + 1, dtype=values.dtype)
        flat[1:] = values.reshape(-1)
        return flat[1:].view(shape)
    if kind in ("transpose", "permute"):
        if kind == "transpose":  # the two outer dimensions swapped in memory
            perm = list(range(rank))
            perm[0], perm[-1] = perm[-1], perm[0]
        else:
            perm = torch.randperm(rank, generator=gen).tolist()
        inverse = [perm.index(i) for i in range(rank)]
        return values.permute(perm).contiguous().permute(inverse)
    return values.contiguous()


class Params:
    """weight, bias, running buffers and counter of one backend (or of the oracle, in float64)."""

    def __init__(self, case: Case, base: Dict[str, torch.Tensor], dtype: torch.dtype):
        self.weight = base["weight"].to(dtype, copy=True) if case.weight else None
        self.bias = base["bias"].to(dtype, copy=True) if case.bias else None
        self.running_mean = base["running_mean"].to(dtype, copy=True) if case.running else None
        self.running_var = base["running_var"].to(dtype, copy=True) if case.running else None
        self.num_batches_tracked = (torch.tensor(case.start_step, dtype=torch.long)
                                    if case.counter else None)


def _base_params(C: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    def rand(lo, hi):
        # Rounded to float32, so the float64 oracle starts from exactly the same values.
        return (torch.rand(C, generator=gen, dtype=torch.float64) * (hi - lo) + lo).float().double()

    p = dict(weight=rand(-1.5, 1.5), bias=rand(-1, 1), running_mean=rand(-1, 1),
             running_var=rand(0.2, 3))
    # Far from the batch statistics, so that d and r are clipped once the schedule allows.
    p["running_mean"][0] = 3.0
    p["running_var"][-1] = 30.0
    return p


def _bounds(step: Optional[int], s: Dict[str, float]) -> Tuple[float, float]:
    # The schedule as README states it, written independently of reference.clip_bounds.
    if step is None:
        return s["r_max"], s["d_max"]

    def fraction(ramp):
        t = step - s["warmup_steps"]
        return 0.0 if t < 0 else (1.0 if ramp <= 0 else min(t / ramp, 1.0))

    return (1.0 + (s["r_max"] - 1.0) * fraction(s["r_max_ramp_steps"]),
            s["d_max"] * fraction(s["d_max_ramp_steps"]))


def oracle_step(case: Case, p: "Params", x: torch.Tensor, dy: torch.Tensor, training: bool):
    """The README's math in float64, on its own (not batchrenorm_cuda.reference): output,
    gradients per the mask, and the buffer update in place."""
    leaves = [t.detach().clone().requires_grad_(want) if t is not None else None
              for t, want in ((x, case.mask[0]), (p.weight, case.mask[1]),
                              (p.bias, case.mask[2]))]
    xr, w, b = leaves
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = (0,) + tuple(range(2, x.dim()))
    if training:
        m = x.numel() // x.shape[1]
        mu = xr.mean(dims)
        var = ((xr - mu.view(shape)) ** 2).mean(dims)
        sigma_b = (var + case.eps).sqrt()
        y = (xr - mu.view(shape)) / sigma_b.view(shape)
        if p.running_mean is not None:
            step = None if p.num_batches_tracked is None else int(p.num_batches_tracked)
            r_max, d_max = _bounds(step, case.schedule)
            sigma = (p.running_var + case.eps).sqrt()
            r = (sigma_b.detach() / sigma).clamp(1 / r_max, r_max)
            d = ((mu.detach() - p.running_mean) / sigma).clamp(-d_max, d_max)
            y = y * r.view(shape) + d.view(shape)
            factor = case.momentum if case.momentum is not None else 1.0 / (step + 1)
            p.running_mean.mul_(1 - factor).add_(factor * mu.detach())
            p.running_var.mul_(1 - factor).add_(factor * var.detach() * m / (m - 1))
            if p.num_batches_tracked is not None:
                p.num_batches_tracked.add_(1)
    else:
        y = (xr - p.running_mean.view(shape)) / (p.running_var + case.eps).sqrt().view(shape)
    if w is not None:
        y = y * w.view(shape)
    if b is not None:
        y = y + b.view(shape)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, dy) if wanted else ())
    grads = [next(got) if (t is not None and t.requires_grad) else None for t in leaves]
    return y.detach(), grads


def run_backend(case: Case, backend: str, params: Params, x: torch.Tensor, dy: torch.Tensor,
                training: bool, emulation_ns: Optional[str] = None):
    """One step: output, (dx, dweight, dbias) per the mask (None when not asked)."""
    x = x.detach()  # a new leaf with the same strides (a clone would lose non-dense layouts)
    wants = [(x, case.mask[0]), (params.weight, case.mask[1]), (params.bias, case.mask[2])]
    leaves = []
    for t, want in wants:
        if t is not None and want:
            t.requires_grad_(True)
            leaves.append(t)
    s = case.schedule
    ctx = fused_ops_namespace(emulation_ns) if emulation_ns else contextlib.nullcontext()
    with ctx:
        y = _batch_renorm(x, params.running_mean, params.running_var, params.weight, params.bias,
                          training, case.momentum, case.eps, s["r_max"], s["d_max"],
                          num_batches_tracked=params.num_batches_tracked,
                          warmup_steps=s["warmup_steps"], r_max_ramp_steps=s["r_max_ramp_steps"],
                          d_max_ramp_steps=s["d_max_ramp_steps"],
                          backend="reference" if backend == "reference" else "fused")
        grads = [None, None, None]
        if leaves:
            got = torch.autograd.grad(y, leaves, dy)
            it = iter(got)
            grads = [next(it) if (t is not None and want) else None for t, want in wants]
    for t in leaves:
        t.requires_grad_(False)
    return y.detach(), grads


def _dx_scale(x64: torch.Tensor, oracle: Params, case: Case, training: bool) -> float:
    # dx = weight * r * invstd * (...): its rounding error grows with that per-channel scale.
    dims = (0,) + tuple(range(2, x64.dim()))
    var = x64.var(dims, correction=0) if training else oracle.running_var
    w = oracle.weight.abs() if oracle.weight is not None else torch.ones_like(var)
    r = case.schedule["r_max"] if (training and case.running) else 1.0
    return max(1.0, float((w * r / (var + case.eps).sqrt()).max()))


def run_case(case: Case, emulated: bool) -> List[str]:
    """Every mismatch of the case, as 'backend step what: detail' lines ([] if none)."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(case.seed)
    base = _base_params(case.shape[1], gen)
    sdt = reference.stat_dtype(dtype)
    backends = ["reference", "fused"] + (["cuda_emulated"] if emulated else [])
    states = {b: Params(case, base, sdt) for b in backends}
    oracle = Params(case, base, torch.float64)
    tol = tolerance(dtype)
    problems = []
    modes = [True] * case.steps + ([False] if case.eval else [])
    for step, training in enumerate(modes):
        raw = torch.randn(case.shape, generator=gen, dtype=torch.float64)
        x64 = (raw * case.scale + case.offset).to(dtype).double()
        g64 = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(dtype).double()
        x = make_layout(x64, case.layout, gen).to(dtype)
        dy = make_layout(g64, case.grad_layout, gen).to(dtype)
        x_before = x.clone()
        dx_scale = _dx_scale(x64, oracle, case, training)
        y_o, grads_o = oracle_step(case, oracle, x64, g64, training)
        m = x.numel() // x.shape[1]
        grad_tol = grad_tolerance(dtype, m)
        for b in backends:
            where = f"{b} step {step} ({'train' if training else 'eval'})"
            try:
                y, grads = run_backend(case, b, states[b], x, dy, training,
                                       EMULATED_NAMESPACE if b == "cuda_emulated" else None)
            except Exception as error:  # noqa: BLE001 - a valid case must not raise
                problems.append(f"{where} raised {type(error).__name__}: {str(error)[:300]}")
                continue
            if y.dtype != dtype:
                problems.append(f"{where} output dtype {y.dtype}, expected {dtype}")
            if b != "reference" and case.layout in ("contiguous", "channels_last"):
                if not y.is_contiguous(memory_format=memory_format_of(x)):
                    problems.append(f"{where} output layout {y.stride()} for input {x.stride()}")
            checks = [("output", y, y_o, tol),
                      ("grad_input", grads[0], grads_o[0],
                       dict(tol, atol=tol["atol"] * dx_scale)),
                      ("grad_weight", grads[1], grads_o[1], grad_tol),
                      ("grad_bias", grads[2], grads_o[2], grad_tol)]
            st = states[b]
            for name in ("running_mean", "running_var"):
                if getattr(st, name) is not None:
                    checks.append((name, getattr(st, name), getattr(oracle, name),
                                   buffer_tolerance(dtype)))
            for name, got, want, tol_of in checks:
                if (got is None) != (want is None):
                    problems.append(f"{where} {name}: {'missing' if got is None else 'unexpected'}")
                elif got is not None:
                    err = mismatch(got, want, **tol_of)
                    if err:
                        problems.append(f"{where} {name}: {err}")
            if st.num_batches_tracked is not None and not torch.equal(
                    st.num_batches_tracked, oracle.num_batches_tracked):
                problems.append(f"{where} num_batches_tracked {int(st.num_batches_tracked)} vs "
                                f"{int(oracle.num_batches_tracked)}")
            if not torch.equal(x, x_before):
                problems.append(f"{where} modified its input")
    return problems


# ---- the campaign --------------------------------------------------------------------------

def _load_emulation() -> bool:
    try:
        import cuda_emulation

        module = cuda_emulation.load()
    except Exception as error:  # noqa: BLE001 - no toolkit headers or Boost.Fiber
        print(f"fuzz: emulated CUDA kernels not built ({error}); running without them",
              file=sys.stderr)
        return False
    module.set_device(16, 2)
    # The in-order schedule and one random one per launch (the tests run three): half the cost,
    # and the seed changes from case to case, so the campaign covers many schedules.
    _EMULATION[0] = module
    return True


_EMULATION: List[object] = [None]


def _worker(args) -> Tuple[List[Tuple[int, List[str]]], Dict[str, int], float]:
    seeds, emulated, deadline = args
    torch.set_num_threads(1)
    if emulated and _EMULATION[0] is None:
        emulated = _load_emulation()
    results, counts = [], {}
    start = time.time()
    for seed in seeds:
        if time.time() > deadline:
            break
        case = draw_case(seed)
        numel = torch.Size(case.shape).numel()
        on_emulator = emulated and numel <= EMULATED_MAX_NUMEL
        if on_emulator:
            _EMULATION[0].set_random_schedules([seed % 1_000_000 + 1])
        problems = run_case(case, on_emulator)
        for key in (f"dtype {case.dtype}", f"layout {case.layout}", f"rank {len(case.shape)}",
                    f"phase {case.phase}", "emulated" if on_emulator else "host only",
                    "momentum None" if case.momentum is None else "momentum float",
                    "affine" if case.weight or case.bias else "not affine",
                    "running stats" if case.running else "no running stats",
                    f"mask {''.join('x' if m else '-' for m in case.mask)}"):
            counts[key] = counts.get(key, 0) + 1
        counts["steps"] = counts.get("steps", 0) + case.steps + int(case.eval)
        results.append((seed, problems))
    return results, counts, time.time() - start


def campaign(cases: int, seed: int, jobs: int, time_limit: float, emulated: bool = True) -> int:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    t0 = time.time()
    deadline = t0 + time_limit
    seeds = [seed * 1_000_000 + i for i in range(cases)]
    chunks = [seeds[i::jobs * 8] for i in range(jobs * 8)]
    results, counts, failures = [], {}, 0
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for res, cnt, _ in pool.map(_worker, [(c, emulated, deadline) for c in chunks]):
            results += res
            for k, v in cnt.items():
                counts[k] = counts.get(k, 0) + v
    for s, problems in sorted(results):
        if problems:
            failures += 1
            case = draw_case(s)
            print(f"MISMATCH seed {s}: {problems[0]}\n  repro: {case.repro()}")
    wall = time.time() - t0
    n_emu = counts.get("emulated", 0)
    backends = 3 if n_emu else 2
    print(f"\nfuzz: {len(results)} cases ({counts.get('steps', 0)} steps) in {wall:.0f} s on "
          f"{jobs} processes; backends reference, fused CPU" + (", emulated CUDA" if n_emu else "")
          + f" vs the float64 oracle; {n_emu} cases on all {backends}")
    print("fuzz: coverage " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())
                                        if k != "steps"))
    print(f"fuzz: {failures} cases with mismatches, {len(results) - failures} clean")
    if len(results) < cases:
        print(f"fuzz: time limit reached after {len(results)} of {cases} cases")
    return 1 if failures or len(results) < cases else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=1080.0, help="seconds")
    parser.add_argument("--no-emulation", action="store_true")
    parser.add_argument("--repro", type=int, help="run one case, by its seed, and describe it")
    args = parser.parse_args(argv)
    if args.repro is not None:
        case = draw_case(args.repro)
        emulated = not args.no_emulation and _load_emulation()
        if emulated:
            _EMULATION[0].set_random_schedules([args.repro % 1_000_000 + 1])
        print(json.dumps(dataclasses.asdict(case)))
        problems = run_case(case, emulated and torch.Size(case.shape).numel() <= EMULATED_MAX_NUMEL)
        print("\n".join(problems) or "no mismatch")
        return 1 if problems else 0
    return campaign(args.cases, args.seed, args.jobs, args.time_limit, not args.no_emulation)


if __name__ == "__main__":
    sys.exit(main())
