"""Module-level benchmark: what a user who swaps nn.BatchNorm for BatchRenorm pays.

The whole module's training step (forward + backward, through autograd, the Python module code
included), BatchRenormNd against nn.BatchNormNd, on the shapes our users run: RL critics' (N, C)
activations (CrossQ: N in {256, 512}, C in {64, 256, 2048}), tiny conv maps, and ResNet-50's
channels_last layers at N <= 16. Each alone ("norm") and in a block (Linear or Conv -> norm ->
ReLU), eager and under torch.compile. Warm-up off (the bounds are the final ones), as in issue
11's measurements; the step counter still advances.

The peers (benchmarks/peers.py: sb3-contrib's and torchrl's BatchRenorm1d, when importable) are
timed with ours and nn.BatchNorm1d in the same interleaved rounds at the RL shapes, the layer
alone, eager and compiled, each past its warm-up so that it does its full renorm work; their
versions are in the JSON's "peers" (a peer that does not import is listed in "peers_skipped").

    python benchmarks/bench_modules.py [--threads 1,2] [--quick] [--no-compile] [--no-networks]
                                       [--networks-only] [--out PATH]

Whole networks (benchmarks/networks.py): a training step with the loss and the optimizer step
of issue 22's 4-layer CNN (SGD with momentum), a ResNet-18-style stack at batch 2 and 8, and a
CrossQ critic (Adam), converted with convert_batchnorm's defaults, eager and torch.compile'd.

Timing is benchmarks/harness.py's measure_many: the two models' samples interleaved on the CPU,
so a load that comes and goes hits both alike. The ratio brn / bn is what to read: the median of
the per-round ratios (harness.paired_ratio); the JSON also has the ratio of the medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import networks  # noqa: E402
import peers  # noqa: E402

import batchrenorm_cuda as brn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OFF = dict(warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)

# (name, shape, layout, kinds): kinds are "norm" (the layer alone) and "block".
RL = [(f"rl {n}x{c}", (n, c), "contiguous") for n in (256, 512) for c in (64, 256, 2048)]
CONV = [("tiny 2x64x8x8", (2, 64, 8, 8), "contiguous"),
        ("tiny 8x32x16x16", (8, 32, 16, 16), "contiguous"),
        ("r50 4x256x14x14", (4, 256, 14, 14), "channels_last"),
        ("r50 2x64x56x56", (2, 64, 56, 56), "channels_last"),
        ("r50 16x512x7x7", (16, 512, 7, 7), "channels_last"),
        ("r50 16x2048x7x7", (16, 2048, 7, 7), "channels_last")]
# torch.compile: blocks only, a few shapes (each compile costs tens of seconds here).
COMPILED = ("rl 512x256", "rl 256x2048", "tiny 8x32x16x16", "r50 4x256x14x14")
QUICK = ("rl 512x256", "rl 256x64", "tiny 2x64x8x8", "r50 4x256x14x14")


def _norms(rank: int, C: int):
    if rank == 2:
        return brn.BatchRenorm1d(C, **OFF), nn.BatchNorm1d(C)
    return brn.BatchRenorm2d(C, **OFF), nn.BatchNorm2d(C)


def _models(shape, kind: str):
    """(Batch Renorm model, BatchNorm model) with the same initial weights."""
    C = shape[1]
    renorm, bn = _norms(len(shape), C)
    if kind == "norm":
        return renorm, bn
    torch.manual_seed(0)
    layer = nn.Linear(C, C) if len(shape) == 2 else nn.Conv2d(C, C, 3, padding=1)
    twin = copy.deepcopy(layer)  # the same initial weights
    return nn.Sequential(layer, renorm, nn.ReLU()), nn.Sequential(twin, bn, nn.ReLU())


def _input(shape, layout: str) -> torch.Tensor:
    x = torch.randn(shape) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _record(row: Dict[str, object], timings: Dict[str, dict]) -> None:
    """Each timed implementation's median and quantiles (or its error) into the row, and
    brn / bn. The ratio is the median of the per-round ratios: a block's time is mostly its
    matmul, whose time on a shared VM moves by +-25 % between rounds; pairing the two calls of
    each round cancels that. ratio_of_medians is the plain brn_ms / bn_ms."""
    for label, t in timings.items():
        if "error" in t:
            row[f"{label}_error"] = t["error"]
        else:
            row[f"{label}_ms"], row[f"{label}_p20_ms"], row[f"{label}_p80_ms"] = (
                t["device_ms"], t["p20_ms"], t["p80_ms"])
            row["reps"] = t["reps"]
    if "brn_ms" in row and "bn_ms" in row:
        row["ratio"] = harness.paired_ratio(timings["brn"], timings["bn"])
        row["ratio_of_medians"] = row["brn_ms"] / row["bn_ms"]


def run_case(name, shape, layout, kind, compiled: bool, cfg, peer_names=()) -> Dict[str, object]:
    renorm, bn = _models(shape, kind)
    if layout == "channels_last":
        renorm, bn = (m.to(memory_format=torch.channels_last) for m in (renorm, bn))
    x = _input(shape, layout)
    if compiled:
        # Each case compiles new models of the same code: without a reset, Dynamo's recompile
        # limit is soon reached and it falls back to eager.
        torch._dynamo.reset()
    entries = {}
    for label, model in (("brn", renorm), ("bn", bn)):
        fn = torch.compile(model, fullgraph=True) if compiled else model
        entries[label] = ((lambda fn=fn: fn(x)), [x, *model.parameters()], nullcontext)
    row = dict(case=name, shape=list(shape), layout=layout, kind=kind,
               mode="compiled" if compiled else "eager")
    # The peers: the 2-D layer alone, in its renorm phase (peers.bench_module).
    for label in (peer_names if kind == "norm" and len(shape) == 2 else ()):
        try:
            model = peers.bench_module(label, shape[1])
            fn = model
            if compiled:
                fn, row[f"{label}_fullgraph"] = peers.compile_module(model, x)
            entries[label] = ((lambda fn=fn: fn(x)), [x, *model.parameters()], nullcontext)
        except Exception as error:  # noqa: BLE001 - a peer must not lose the case
            row[f"{label}_error"] = repr(error)
    grad = torch.randn_like(renorm(x))
    timings = harness.measure_many(entries, grad, "fwd+bwd", cfg)
    _record(row, timings)
    for label in peer_names:
        if f"{label}_ms" in row and "bn_ms" in row:  # peer / nn.BatchNorm1d, peer / ours
            row[f"{label}_ratio"] = harness.paired_ratio(timings[label], timings["bn"])
            if "brn_ms" in row:
                row[f"{label}_vs_brn"] = harness.paired_ratio(timings[label], timings["brn"])
    return row


def run_network(name: str, compiled: bool, cfg, placements: int) -> Dict[str, object]:
    """One whole network's training step (forward, loss, backward, optimizer step), BatchRenorm
    against nn.BatchNorm, interleaved like the blocks, each over `placements` instances; with the
    A/A control (nn.BatchNorm against a copy of itself: networks.instances says why)."""
    if compiled:
        torch._dynamo.reset()
    steps = networks.training_steps(name, compiled, placements)
    for step in steps.values():  # each instance's first step, before the harness's warm-up
        for _ in range(placements):
            step()
    # mode "fwd" of the harness times the callable as it is: here the whole training step.
    entries = {label: (step, [], nullcontext) for label, step in steps.items()}
    timings = harness.measure_many(entries, torch.empty(0), "fwd", cfg)
    row = dict(case=name, shape=[], layout="", kind="network",
               mode="compiled" if compiled else "eager")
    _record(row, {label: timings[label] for label in ("brn", "bn")})
    row["placements"] = placements
    if "samples_ms" in timings.get("bn_copy", {}):
        row["control_ratio"] = harness.paired_ratio(timings["bn_copy"], timings["bn"])
    return row


def work(quick: bool, compile_: bool):
    for name, shape, layout in RL + CONV:
        if quick and name not in QUICK:
            continue
        kinds = ("norm", "block") if len(shape) == 2 or name.startswith("tiny") else ("norm",)
        for kind in kinds:
            yield name, shape, layout, kind, False
        if compile_ and name in COMPILED and not quick:
            yield name, shape, layout, "block", True
        if compile_ and len(shape) == 2 and not quick:  # the layer alone, with the peers
            yield name, shape, layout, "norm", True


def summary(rows: List[Dict[str, object]]) -> Dict[str, float]:
    out = {}
    for threads in sorted({r["threads"] for r in rows}):
        for mode in ("eager", "compiled"):
            for label, networks_only in (("", False), (" networks", True)):
                ratios = [r["ratio"] for r in rows
                          if r["threads"] == threads and r["mode"] == mode and "ratio" in r
                          and (r["kind"] == "network") == networks_only]
                if ratios:
                    out[f"{threads}t {mode}{label} geomean"] = harness.geomean(ratios)
                    out[f"{threads}t {mode}{label} worst"] = max(ratios)
            controls = [r["control_ratio"] for r in rows if "control_ratio" in r
                        and r["threads"] == threads and r["mode"] == mode]
            if controls:  # how far nn.BatchNorm / itself strays: the resolution of the above
                out[f"{threads}t {mode} networks A/A geomean"] = harness.geomean(controls)
                out[f"{threads}t {mode} networks A/A farthest"] = max(
                    controls, key=lambda c: abs(c - 1.0))
            # The RL layers alone, each implementation / nn.BatchNorm1d (peers where present).
            rl = [r for r in rows if r["threads"] == threads and r["mode"] == mode
                  and r["kind"] == "norm" and len(r["shape"]) == 2]
            for impl, key in [("brn", "ratio")] + [(p, f"{p}_ratio") for p in peers.PEERS]:
                ratios = [r[key] for r in rl if key in r]
                if ratios:
                    out[f"{threads}t {mode} rl norm {impl}/bn geomean"] = harness.geomean(ratios)
    return out


def markdown(result) -> str:
    names = list(result.get("peers", {}))
    lines = ["| threads | case | layout | kind | mode | brn ms | bn ms | brn / bn | A/A |"
             + "".join(f" {p} / bn |" for p in names),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for r in result["rows"]:
        ratio = (f"{r['ratio']:.2f}" if "ratio" in r
                 else r.get("error", r.get("brn_error", r.get("bn_error"))))
        control = f"{r['control_ratio']:.3f}" if "control_ratio" in r else ""
        cells = "".join(
            f" {r[f'{p}_ratio']:.2f}{'' if r.get(f'{p}_fullgraph', True) else ' (graph break)'} |"
            if f"{p}_ratio" in r else f" {'error' if f'{p}_error' in r else ''} |"
            for p in names)
        lines.append(f"| {r['threads']} | {r['case']} | {r['layout']} | {r['kind']} | "
                     f"{r['mode']} | {r.get('brn_ms', float('nan')):.3f} | "
                     f"{r.get('bn_ms', float('nan')):.3f} | {ratio} | {control} |{cells}")
    lines += ["", "| summary | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["summary"].items()]
    env = result["environment"]
    lines += ["", f"{env['device']}, torch {env['torch']}, csrc tree {env['csrc_tree']} "
              f"(uncommitted csrc edits: {env['csrc_dirty']}, diff {env['csrc_diff_sha1']}), "
              f"load average {result['loadavg_start']} -> {result['loadavg_end']}, CPU "
              f"allocator: {env.get('cpu_allocator', 'default')}"]
    lines += [f"\n{p}: {v['class']} {v['version']} ({v['settings']})"
              for p, v in result.get("peers", {}).items()]
    lines += [f"\n{p}: skipped, {why}" for p, why in result.get("peers_skipped", {}).items()]
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ratio" in r]
    labels = [f"{r['case']} {r['kind']} {r['mode']} {r['threads']}t" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["ratio"] for r in rows],
            color=["tab:orange" if r["mode"] == "compiled" else "tab:blue" for r in rows])
    for p, marker in zip(result.get("peers", {}), "x^sv"):
        at = [(i, r[f"{p}_ratio"]) for i, r in enumerate(rows) if f"{p}_ratio" in r]
        if at:
            ax.scatter([v for _, v in at], [i for i, _ in at], marker=marker, color="k", s=14,
                       zorder=3, label=f"{p} / nn.BatchNorm")
    if ax.get_legend_handles_labels()[0]:  # peers plotted (not in --networks-only runs)
        ax.legend(fontsize=6, loc="lower right")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("BatchRenorm / nn.BatchNorm, forward + backward time (lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--quick", action="store_true", help="four shapes, eager only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--no-networks", action="store_true", help="skip the whole networks")
    p.add_argument("--networks-only", action="store_true", help="only the whole networks")
    p.add_argument("--rep-ms", type=float, default=1000.0,
                   help="time budget of the samples per case (at least --min-reps rounds)")
    p.add_argument("--min-reps", type=int, default=15)
    p.add_argument("--placements", type=int, default=4,
                   help="instances of each whole network, taken in turn (networks.py says why)")
    p.add_argument("--network-rep-ms", type=float, default=10000.0,
                   help="time budget per whole network (at most 200 rounds): a single "
                        "instance pair resolved about +-1.5 %% with the blocks' 1 s")
    harness.add_allocator_argument(p)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default results/modules_cpu_<cpu>.json); .md and .png too")
    args = p.parse_args(argv)
    # Compile from scratch: Inductor's on-disk caches would serve code compiled by an earlier
    # build of our ops, since their key does not see a layout constraint registered from Python
    # (batchrenorm_cuda/_inductor.py).
    import torch._inductor.config as inductor_config
    inductor_config.force_disable_caches = True
    device = torch.device("cpu")
    cfg = harness.TimerConfig(rep_ms=args.rep_ms, min_reps=args.min_reps)
    network_cfg = harness.TimerConfig(rep_ms=args.network_rep_ms, min_reps=args.min_reps,
                                      max_reps=200)
    previous = torch.get_num_threads()
    found, skipped = peers.available()
    for name, why in skipped.items():
        print(f"peer {name} skipped: {why}", flush=True)
    result = dict(environment=dict(harness.environment(device),
                                   cpu_allocator=harness.cpu_allocator(args)),
                  loadavg_start=harness.loadavg(),
                  peers={name: {"class": info["qualname"], "version": info["version"],
                                "settings": peers.bench_settings(name)}
                         for name, info in found.items()},
                  peers_skipped=skipped, rows=[])
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            cases = [] if args.networks_only else list(work(args.quick, not args.no_compile))
            if not args.no_networks and not args.quick:
                cases += [(name, None, "", "network", compiled) for name in networks.NETWORKS
                          for compiled in ((False, True) if not args.no_compile else (False,))]
            for name, shape, layout, kind, compiled in cases:
                try:
                    row = (run_network(name, compiled, network_cfg, args.placements)
                           if kind == "network"
                           else run_case(name, shape, layout, kind, compiled, cfg,
                                         tuple(found)))
                except Exception as error:  # noqa: BLE001 - one case must not lose the run
                    row = dict(case=name, shape=list(shape or ()), layout=layout, kind=kind,
                               mode="compiled" if compiled else "eager", error=repr(error))
                row["threads"] = threads
                result["rows"].append(row)
                print(f"{threads}t {name:22s} {layout:13s} {kind:7s} "
                      f"{row['mode']:8s} {row.get('ratio', float('nan')):.2f}"
                      + "".join(f"  {p} {row[f'{p}_ratio']:.2f}" for p in found
                                if f"{p}_ratio" in row), flush=True)
    finally:
        torch.set_num_threads(previous)
    result["loadavg_end"] = harness.loadavg()
    result["summary"] = summary(result["rows"])
    slug = re.sub(r"[^a-z0-9]+", "-", harness.cpu_model_name().lower()).strip("-")
    out = args.out or RESULTS / f"modules_cpu_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    for k, v in result["summary"].items():
        print(f"{k}: {v:.3f}")
    return result


if __name__ == "__main__":
    main()
