"""The other PyTorch Batch Renorm layers our users have, next to ours: adapters for
bench_modules.py, and a check of what each one computes against batchrenorm_cuda.reference.

    python benchmarks/peers.py --check [--warmup 50] [--steps 150] [--out PATH]

Peers: sb3-contrib's `sb3_contrib.common.torch_layers.BatchRenorm1d` and torchrl's
`torchrl.modules.BatchRenorm1d` (torchrl/modules/models/batchrenorm.py). A peer that does not
import is reported as skipped, with the reason.

The check drives a peer, our reference (`reference.batch_renorm`, the peer's eps, momentum,
r_max, d_max, its warm-up as `warmup_steps`, no ramps) and our BatchRenorm1d with the same
inputs, a (N, C) float32 batch per step whose channels' scales and means drift (and jitter), so
that r and d clip at both ends. Per step it records r and d as the peer effectively applies them
(per channel, the least-squares line of its output, weight 1 and bias 0, against the batch-
normalised input x_hat = (x - mu_B) / sqrt(var_B + eps): slope r, intercept d), whether they
lie within the step's bounds (clip_bounds) and the final ones, their signs, the output's and
grad_input's distance from the reference, the running buffers against the reference's, and how
far r and d are from the documented model of the peer (`MODELS`): that is what
tests/test_peers.py asserts, so a peer that changes its arithmetic fails it. Variants: each
peer with its defaults, sb3 also with eps = 1e-5 (separating its eps effects from the rest),
torchrl also with smooth=True (compared with our bounds ramped over the same warm-up); and what
each does with (N, C, L) input. Writes results/peers_check.{json,md} (per-step records, and per
phase: steps 1..W, W+1, W+2..2W, 2W+1..).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import batchrenorm_cuda as brn  # noqa: E402
from batchrenorm_cuda import reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name -> where it lives, its distribution, its defaults (eps, momentum, r_max, d_max, warm-up),
# and the names of its running mean / running var / step counter buffers.
PEERS = {
    "sb3": dict(module="sb3_contrib.common.torch_layers", cls="BatchRenorm1d",
                dist="sb3_contrib", eps=1e-3, momentum=0.01, r_max=3.0, d_max=5.0,
                warmup=100_000, buffers=("ra_mean", "ra_var", "steps")),
    "torchrl": dict(module="torchrl.modules", cls="BatchRenorm1d", dist="torchrl", eps=1e-5,
                    momentum=0.01, r_max=3.0, d_max=5.0, warmup=10_000,
                    buffers=("running_mean", "running_var", "num_batches_tracked")),
}


def load(name: str):
    """(class, version) of a peer; raises ImportError (or whatever its import raises)."""
    spec = PEERS[name]
    cls = getattr(importlib.import_module(spec["module"]), spec["cls"])
    return cls, getattr(importlib.import_module(spec["dist"]), "__version__", "unknown")


def available() -> Tuple[Dict[str, dict], Dict[str, str]]:
    """({name: {class, version}}, {name: why it is skipped})."""
    found, skipped = {}, {}
    for name, spec in PEERS.items():
        try:
            cls, version = load(name)
        except Exception as error:  # noqa: BLE001 - any import failure skips the peer
            skipped[name] = f"{spec['module']}.{spec['cls']} not importable: {error!r}"
            continue
        found[name] = dict(cls=cls, version=version, qualname=f"{spec['module']}.{spec['cls']}")
    return found, skipped


def make(name: str, C: int, eps: float, momentum: float, r_max: float, d_max: float,
         warmup: int, smooth: bool = False):
    cls, _ = load(name)
    if name == "sb3":  # r_max / d_max are attributes there, not arguments
        m = cls(C, eps=eps, momentum=momentum, warmup_steps=warmup)
        m.rmax, m.dmax = r_max, d_max
        return m
    return cls(C, momentum=momentum, eps=eps, max_r=r_max, max_d=d_max, warmup_steps=warmup,
               smooth=smooth)


def buffers(name: str, m) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(getattr(m, b) for b in PEERS[name]["buffers"])


# --- benchmark adapters -----------------------------------------------------------------------

def bench_module(name: str, C: int):
    """A peer with its default hyperparameters, in its renorm phase for the timed calls.

    sb3: warm-up 2, and 3 training steps (it renormalises once steps > warmup_steps). torchrl:
    its default warm-up (10000) with the counter set to it, so that its warm-up factor
    num_batches_tracked // warmup_steps is 1, the correct value, for the next 10000 calls; with
    a small warm-up the factor would grow with every timed call (see --check). Each then does
    its full renorm work per call."""
    spec = PEERS[name]
    hp = {k: spec[k] for k in ("eps", "momentum", "r_max", "d_max")}
    if name == "sb3":
        m = make(name, C, warmup=2, **hp)
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(8, C))
        assert int(m.steps) > m.warmup_steps
    else:
        m = make(name, C, warmup=spec["warmup"], **hp)
        m.num_batches_tracked.fill_(spec["warmup"])
        with torch.no_grad():
            m(torch.randn(8, C))
    return m


def bench_settings(name: str) -> dict:
    spec = PEERS[name]
    if name == "sb3":
        return dict(eps=spec["eps"], momentum=spec["momentum"], warmup_steps=2,
                    phase="renorm: 3 training steps before timing (steps > warmup_steps)")
    return dict(eps=spec["eps"], momentum=spec["momentum"], warmup_steps=spec["warmup"],
                phase="renorm: num_batches_tracked set to warmup_steps (warm-up factor 1)")


def compile_module(m, x: torch.Tensor):
    """torch.compile(m, fullgraph=True), or without fullgraph when that fails (sb3's
    `if self.steps > self.warmup_steps` is a data-dependent branch); returns (fn, fullgraph).
    One training call is made to compile."""
    fn = torch.compile(m, fullgraph=True)
    try:
        fn(x)
        return fn, True
    except Exception:  # noqa: BLE001 - torch._dynamo's Unsupported and friends
        fn = torch.compile(m)
        fn(x)
        return fn, False


# --- the check --------------------------------------------------------------------------------

def drifting_inputs(steps: int, N: int, C: int, seed: int = 0) -> List[torch.Tensor]:
    """(N, C) float32 batches whose channels drift, four kinds in turn (channel c % 4):
    0: the scale grows by exp(a t), a in [0.02, 0.06] per step (r clips at r_max);
    1: a scale in [2, 10] that drops 6x at a step in [steps / 6, 2 steps / 3] (r clips at
       1 / r_max for tens of steps after it);
    2: a mean drifting by up to 0.3 scales per step (d clips), scale in [0.5, 3];
    3: stationary, scale in [0.3, 3].
    Each with a mean within +-3 scales, 20 % per-step jitter of the scale (log-normal) and 30 %
    of the mean. var_B stays above 35 eps even for sb3's eps = 1e-3, so the differences
    measured are not those of near-constant channels."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(C, generator=g, dtype=torch.float64)  # noqa
    kind = torch.arange(C) % 4
    log_scale = torch.where(kind == 1, u(math.log(2), math.log(10)),
                            u(math.log(0.3), math.log(3)))
    rate = torch.where(kind == 0, u(0.02, 0.06), torch.zeros(C, dtype=torch.float64))
    shock_at = torch.where(kind == 1, u(steps / 6, 2 * steps / 3), torch.full((C,), 1e9))
    drift = torch.where(kind == 2, u(-0.3, 0.3), torch.zeros(C, dtype=torch.float64))
    mean0 = u(-3, 3)
    out = []
    for t in range(steps):
        jitter = 0.2 * torch.randn(C, generator=g, dtype=torch.float64)
        scale = torch.exp(log_scale + rate * t - math.log(6) * (t >= shock_at) + jitter)
        mean = scale * (mean0 + drift * t + 0.3 * torch.randn(C, generator=g,
                                                            dtype=torch.float64))
        z = torch.randn(N, C, generator=g, dtype=torch.float64)
        out.append((mean + scale * z).to(torch.float32))
    return out


def fit_affine(y: torch.Tensor, x_hat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Per channel: y = r * x_hat + d by least squares (float64); (r, d, max residual)."""
    y, x_hat = y.double(), x_hat.double()
    xm, ym = x_hat.mean(0), y.mean(0)
    r = ((x_hat - xm) * (y - ym)).sum(0) / ((x_hat - xm) ** 2).sum(0)
    d = ym - r * xm
    return r, d, float((y - (r * x_hat + d)).abs().max())


def model_sb3(x, rm, rv, t, hp):
    """sb3-contrib 2.9.2 as we read it: the UNBIASED batch variance var_u, renorm only once
    steps > warmup_steps (one BatchNorm step more than the warm-up), no ramp, and the renorm
    folded into a (mean, var) pair normalised with +eps again:
    y = (x - mu + d sqrt(var_u) / r) / sqrt(var_u / r^2 + eps), r and d computed with var_u.
    Against x_hat it applies r_eff = sqrt(var_B + eps) / D and d_eff = d sqrt(var_u) / (r D),
    D = sqrt(var_u / r^2 + eps)."""
    x = x.double()
    N = x.shape[0]
    mean, var_b = x.mean(0), x.var(0, unbiased=False)
    var_u = var_b * N / (N - 1)
    rs = (rv.double() + hp["eps"]).sqrt()
    if t > hp["warmup"]:
        r = ((var_u + hp["eps"]).sqrt() / rs).clamp(1 / hp["r_max"], hp["r_max"])
        d = ((mean - rm.double()) / rs).clamp(-hp["d_max"], hp["d_max"])
    else:
        r, d = torch.ones_like(mean), torch.zeros_like(mean)
    D = (var_u / r ** 2 + hp["eps"]).sqrt()
    return (var_b + hp["eps"]).sqrt() / D, d * var_u.sqrt() / (r * D)


def model_torchrl(x, rm, rv, t, hp):
    """torchrl 0.14.1 as we read it: r and d clipped to the final bounds, then
    r = 1 + (r - 1) k, d = d k with k = num_batches_tracked // warmup_steps (smooth=False) or
    num_batches_tracked / warmup_steps (smooth=True). k is never capped
    (`self.num_batches_tracked.clamp_max(self.warmup_steps)` discards its result), so from step
    2 * warmup + 1 on, k = 2, 3, ...: r and d leave their bounds, and r < 0 where r < 1 - 1/k."""
    x = x.double()
    mean, var_b = x.mean(0), x.var(0, unbiased=False)
    rs = (rv.double() + hp["eps"]).sqrt()
    r = ((var_b + hp["eps"]).sqrt() / rs).clamp(1 / hp["r_max"], hp["r_max"])
    d = ((mean - rm.double()) / rs).clamp(-hp["d_max"], hp["d_max"])
    if hp["warmup"] > 0:
        k = t / hp["warmup"] if hp.get("smooth") else t // hp["warmup"]
        r, d = 1 + (r - 1) * k, d * k
    return r, d


MODELS = {"sb3": model_sb3, "torchrl": model_torchrl}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-6)).max())


def _mean_err(a: torch.Tensor, b: torch.Tensor, var: torch.Tensor) -> float:
    """max |a - b| in units of the running standard deviation."""
    return float(((a.double() - b.double()).abs() / var.double().sqrt()).max())


def check(name: str, warmup: int = 50, steps: Optional[int] = None, N: int = 256, C: int = 64,
          seed: int = 0, smooth: bool = False, eps: Optional[float] = None,
          tol: float = 1e-5) -> dict:
    """Run a peer, our reference and our BatchRenorm1d side by side; per-step records.
    eps=None: the peer's default."""
    spec = PEERS[name]
    steps = steps if steps is not None else 3 * warmup
    hp = dict(eps=spec["eps"] if eps is None else eps, momentum=spec["momentum"],
              r_max=spec["r_max"], d_max=spec["d_max"], warmup=warmup, smooth=smooth)
    peer = make(name, C, hp["eps"], hp["momentum"], hp["r_max"], hp["d_max"], warmup,
                **({"smooth": True} if smooth else {}))
    # Our schedule for the comparison: the peer's warm-up as BatchNorm steps, then the final
    # bounds at once; torchrl's smooth=True is meant as a linear ramp over its warm-up, so
    # there our bounds ramp over it from the first step.
    sched = (dict(warmup_steps=0, r_max_ramp_steps=warmup, d_max_ramp_steps=warmup) if smooth
             else dict(warmup_steps=warmup, r_max_ramp_steps=0, d_max_ramp_steps=0))
    ours = brn.BatchRenorm1d(C, eps=hp["eps"], momentum=hp["momentum"], r_max=hp["r_max"],
                             d_max=hp["d_max"], **sched)
    rm, rv = torch.zeros(C), torch.ones(C)
    nbt = torch.zeros((), dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 1)
    records = []
    for step, x in enumerate(drifting_inputs(steps, N, C, seed), start=1):
        t = int(nbt)
        p_rm, p_rv, _ = (b.clone() for b in buffers(name, peer))
        rb, db = reference.clip_bounds(nbt, hp["r_max"], hp["d_max"], **sched)
        rb, db = float(rb), float(db)
        mean, var_b = x.double().mean(0), x.double().var(0, unbiased=False)
        x_hat = (x.double() - mean) / (var_b + hp["eps"]).sqrt()
        dy = torch.randn(N, C, generator=g)
        outs, grads = {}, {}
        for label, fn in (
            ("ref", lambda xi: reference.batch_renorm(
                xi, rm, rv, None, None, True, hp["momentum"], hp["eps"], hp["r_max"],
                hp["d_max"], nbt, **sched)),
            ("ours", ours), ("peer", peer)):
            xi = x.clone().requires_grad_()
            out = fn(xi)
            grads[label], = torch.autograd.grad(out, xi, dy)
            outs[label] = out.detach()
        r_ref, d_ref, _ = fit_affine(outs["ref"], x_hat)
        r, d, resid = fit_affine(outs["peer"], x_hat)
        r_mod, d_mod = MODELS[name](x, p_rm, p_rv, t, hp)
        p_rm, p_rv, p_n = buffers(name, peer)
        lo, hi = 1 / hp["r_max"], hp["r_max"]
        # grad_input: per channel, max |difference| / max |reference|; the worst channel.
        gscale = grads["ref"].abs().amax(0).clamp_min(1e-30)
        gerr = lambda gx: float(((gx - grads["ref"]).abs().amax(0) / gscale).max())  # noqa
        records.append(dict(
            step=step, bounds=[rb, db],
            r_min=float(r.min()), r_max=float(r.max()), d_absmax=float(d.abs().max()),
            r_negative=int((r < 0).sum()),
            r_in_step_bounds=bool(((r >= (1 / rb) * (1 - tol)) & (r <= rb * (1 + tol))).all()),
            d_in_step_bounds=bool((d.abs() <= db + tol * max(db, 1.0)).all()),
            r_in_final_bounds=bool(((r >= lo * (1 - tol)) & (r <= hi * (1 + tol))).all()),
            d_in_final_bounds=bool((d.abs() <= hp["d_max"] * (1 + tol)).all()),
            ref_r_clipped_low=int(((r_ref - lo).abs() < 1e-6).sum()),
            ref_r_clipped_high=int(((r_ref - hi).abs() < 1e-6).sum()),
            ref_d_clipped=int(((d_ref.abs() - hp["d_max"]).abs() < 1e-5).sum()),
            r_vs_ref=float((r - r_ref).abs().max()), d_vs_ref=float((d - d_ref).abs().max()),
            r_vs_model=float((r - r_mod).abs().max()), d_vs_model=float((d - d_mod).abs().max()),
            fit_residual=resid,
            out_vs_ref=float((outs["peer"] - outs["ref"]).abs().max()),
            grad_vs_ref=gerr(grads["peer"]), min_var_over_eps=float(var_b.min()) / hp["eps"],
            mean_vs_ref=_mean_err(p_rm, rm, rv), var_vs_ref=_rel(p_rv, rv), counter=int(p_n),
            ours_out_vs_ref=float((outs["ours"] - outs["ref"]).abs().max()),
            ours_grad_vs_ref=gerr(grads["ours"]),
            ours_buffers_vs_ref=max(_mean_err(ours.running_mean, rm, rv),
                                    _rel(ours.running_var, rv)),
        ))
    peer.eval()
    xe = drifting_inputs(1, N, C, seed + 7)[0]
    eval_ref = reference.batch_renorm(xe, rm, rv, None, None, False, eps=hp["eps"])
    with torch.no_grad():
        eval_diff = float((peer(xe) - eval_ref).abs().max())
    return dict(peer=name, version=load(name)[1], hyperparameters=hp, schedule=sched, N=N, C=C,
                steps=steps, seed=seed, eval_out_vs_ref=eval_diff, records=records,
                summary=summarize(records, warmup, smooth))


def _phase(records, lo, hi):
    return [r for r in records if lo <= r["step"] <= hi]


def summarize(records: List[dict], W: int, smooth: bool = False) -> dict:
    """Per phase (steps 1..W, W+1, W+2..2W, 2W+1..): worst values; and the first steps at
    which r < 0 and at which r or d leave the final bounds."""
    last = records[-1]["step"]
    phases = {f"1-{W}": (1, W), f"{W + 1}": (W + 1, W + 1), f"{W + 2}-{2 * W}": (W + 2, 2 * W),
              f"{2 * W + 1}-{last}": (2 * W + 1, last)}
    out = {}
    for label, (lo, hi) in phases.items():
        rs = _phase(records, lo, hi)
        if not rs:
            continue
        out[label] = {k: max(r[k] for r in rs) for k in (
            "out_vs_ref", "grad_vs_ref", "r_vs_ref", "d_vs_ref", "r_vs_model", "d_vs_model",
            "mean_vs_ref", "var_vs_ref", "ours_out_vs_ref", "ours_grad_vs_ref",
            "ours_buffers_vs_ref", "fit_residual", "r_max", "d_absmax", "r_negative")}
        out[label]["r_min"] = min(r["r_min"] for r in rs)
        out[label]["min_var_over_eps"] = min(r["min_var_over_eps"] for r in rs)
        out[label]["ref_r_clipped_low"] = sum(r["ref_r_clipped_low"] for r in rs)
        out[label]["ref_r_clipped_high"] = sum(r["ref_r_clipped_high"] for r in rs)
        out[label]["ref_d_clipped"] = sum(r["ref_d_clipped"] for r in rs)
        out[label]["steps_r_out_of_step_bounds"] = sum(not r["r_in_step_bounds"] for r in rs)
    first = lambda key: next((r["step"] for r in records if key(r)), None)  # noqa: E731
    out["first_step_r_negative"] = first(lambda r: r["r_negative"] > 0)
    out["first_step_r_out_of_final_bounds"] = first(lambda r: not r["r_in_final_bounds"])
    out["first_step_d_out_of_final_bounds"] = first(lambda r: not r["d_in_final_bounds"])
    out["first_step_r_out_of_step_bounds"] = first(lambda r: not r["r_in_step_bounds"])
    return out


def three_d(name: str, N: int = 32, C: int = 8, L: int = 16) -> dict:
    """What the peer does with (N, C, L) input, which nn.BatchNorm1d and ours accept: the error
    it raises, or the factor its running_var update applied to var_B (ours and nn.BatchNorm:
    m / (m - 1), m = N * L values per channel)."""
    spec = PEERS[name]
    peer = make(name, C, spec["eps"], spec["momentum"], spec["r_max"], spec["d_max"], 0)
    x = torch.randn(N, C, L, generator=torch.Generator().manual_seed(0)) * 3 + 1
    try:
        with torch.no_grad():
            peer(x)
    except Exception as error:  # noqa: BLE001
        return dict(raises=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
    var_b = x.double().var((0, 2), unbiased=False)
    used = (buffers(name, peer)[1].double() - (1 - spec["momentum"])) / spec["momentum"] / var_b
    m = N * L
    return dict(var_factor=float(used.mean()), n_factor=N / (N - 1), m_factor=m / (m - 1),
                running_var_rel_error=float(used.mean()) / (m / (m - 1)) - 1)


def run_checks(warmup: int, steps: Optional[int]) -> dict:
    found, skipped = available()
    result = dict(torch=torch.__version__, skipped=skipped, checks={}, three_d={})
    for name in found:
        variants = ([(name, {}), (name + " smooth=True", dict(smooth=True))] if name == "torchrl"
                    else [(name, {}), (name + " eps=1e-5", dict(eps=1e-5))])
        for label, kw in variants:
            result["checks"][label] = check(name, warmup, steps, **kw)
        result["three_d"][name] = three_d(name)
    return result


def markdown(result: dict) -> str:
    lines = [f"torch {result['torch']}", ""]
    for name, reason in result["skipped"].items():
        lines.append(f"- {name}: skipped ({reason})")
    keys = ("out_vs_ref", "grad_vs_ref", "r_min", "r_max", "d_absmax", "r_negative",
            "steps_r_out_of_step_bounds", "r_vs_model", "d_vs_model", "mean_vs_ref",
            "var_vs_ref", "ours_out_vs_ref", "ours_grad_vs_ref", "ref_r_clipped_low",
            "ref_r_clipped_high",
            "ref_d_clipped", "min_var_over_eps")
    for label, c in result["checks"].items():
        s = c["summary"]
        lines += ["", f"### {label} {c['version']} (hyperparameters {c['hyperparameters']}, "
                  f"N={c['N']}, C={c['C']}, {c['steps']} steps; ours: {c['schedule']})", "",
                  "| steps | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for phase, v in s.items():
            if isinstance(v, dict):
                lines.append(f"| {phase} | " + " | ".join(
                    f"{v[k]:.3g}" if isinstance(v[k], float) else str(v[k]) for k in keys) + " |")
        lines += ["", ", ".join(f"{k}: {v}" for k, v in s.items() if not isinstance(v, dict))
                  + f", eval output vs reference: {c['eval_out_vs_ref']:.2g}"]
    lines += [""] + [f"- {n}, (N, C, L) input: {v}" for n, v in result["three_d"].items()]
    return "\n".join(lines) + "\n"


def _encode(o, ind: int = 0) -> str:
    """JSON with floats to 4 significant digits and one line per step record."""
    if isinstance(o, float):
        return json.dumps(float(f"{o:.4g}"))
    pad = " " * (ind + 1)
    if isinstance(o, dict) and o:
        sep = "," if "step" in o else ",\n" + pad
        body = sep.join(f"{json.dumps(k)}: {_encode(v, ind + 1)}" for k, v in o.items())
        return "{" + body + "}" if "step" in o else "{\n" + pad + body + "\n" + " " * ind + "}"
    if isinstance(o, list) and o and isinstance(o[0], dict):
        return "[\n" + ",\n".join(pad + _encode(v, ind + 1) for v in o) + "\n" + " " * ind + "]"
    if isinstance(o, list):
        return "[" + ", ".join(_encode(v, ind) for v in o) + "]"
    return json.dumps(o)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="run the correctness check")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=None, help="default 3 * warmup")
    p.add_argument("--out", type=Path, default=RESULTS / "peers_check.json")
    args = p.parse_args(argv)
    if not args.check:
        found, skipped = available()
        for name, info in found.items():
            print(f"{name}: {info['qualname']} {info['version']}")
        for name, reason in skipped.items():
            print(f"{name}: skipped, {reason}")
        return None
    result = run_checks(args.warmup, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_encode(result) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
