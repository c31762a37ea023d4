"""Does Batch Renorm recover what BatchNorm loses on small and non-i.i.d. minibatches?

Ioffe (2017), section 4, trains Inception-v3 on ImageNet with minibatches of 32 three ways:
drawn i.i.d.; with normalisation statistics from microbatches of 4; and non-i.i.d., 16 labels
x 2 images. BatchNorm loses 4 and 11 points; Batch Renorm recovers most of that. This script
asks the same questions on the CPU, of two 100-class tasks built offline (nothing downloaded),
each setting against its own i.i.d. control with the same model, data, budget and optimiser:

  signals100  a procedural 1-D signal task, 100 class templates (accuracy_tasks.make_signals),
              a 1-D ResNet with 12 normalisation layers;
              settings iid, micro4, micro2 (statistics per group of 4 or 2 examples, the
              gradient over all 32, the paper's microbatches) and classes4x8 (4 classes x 8
              examples per batch);
  tabular100  scikit-learn's make_classification, 100 classes, 64 features
              (accuracy_tasks.make_tabular), a residual MLP with 9 normalisation layers on
              (32, 256) activations;
              settings iid, classes16x2 (16 classes x 2 examples per batch, the paper's
              non-i.i.d. batches), classes4x8 (4 classes x 8, the harsher variant) and
              micro8 (microbatches of 8; groups of 2 would leave every feature at +-1).

Each setting runs nn.BatchNorm1d and BatchRenorm1d with the modules' defaults ("bn", "brn")
and the candidate defaults ("brn_<name>", VARIANTS), the rule between which is in
benchmarks/NOTES.md and in the report.

Every run is evaluated on the test set with the population statistics (model.eval(), as a
deployed model runs) during training and at the end; at the end also with batch statistics
(train-mode forward on test batches, the network's training-time function), on i.i.d. test
batches of 32 and on test batches built like the setting's training batches. The gap between
the two is the train/inference mismatch the paper names as BatchNorm's failure.

    python benchmarks/accuracy.py            # the full run (make accuracy), < 30 min on 2 cores
    python benchmarks/accuracy.py --smoke    # seconds, written to a temporary folder
    python benchmarks/accuracy.py --report-only   # the outputs again from accuracy_curves.json
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy_report  # noqa: E402
import accuracy_tasks as tasks  # noqa: E402
import batchrenorm_cuda as brn  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH = tasks.BATCH

# Fixed before any Batch Renorm run (from BatchNorm-only pilots that checked that BatchNorm
# does lose accuracy in these settings), and not changed after: see benchmarks/NOTES.md.
EXPERIMENTS: Dict[str, dict] = {
    "signals100": dict(
        label="Signals-100, 1-D ResNet (12 normalisation layers)",
        steps=1200, model="resnet1d",
        settings={"iid": {}, "micro4": dict(group=4), "micro2": dict(group=2),
                  "classes4x8": dict(classes_per_batch=4)}),
    "tabular100": dict(
        label="make_classification-100, residual MLP (9 normalisation layers)",
        steps=1000, model="residual_mlp",
        settings={"iid": {}, "classes16x2": dict(classes_per_batch=16),
                  "classes4x8": dict(classes_per_batch=4), "micro8": dict(group=8)}),
}
SETTING_LABELS = {
    "iid": "batch 32, i.i.d.",
    "micro4": "microbatches of 4",
    "micro2": "microbatches of 2",
    "micro8": "microbatches of 8",
    "classes16x2": "non-i.i.d., 16 classes x 2",
    "classes4x8": "non-i.i.d., 4 classes x 8",
}
LOADERS = {"signals100": tasks.make_signals, "tabular100": tasks.make_tabular}

# The layers compared. "bn" and "brn" are nn.BatchNorm1d and BatchRenorm1d with the modules'
# own defaults (read from their signatures when the experiment runs); each "brn_<name>" is a
# candidate default that overrides what it names (benchmarks/NOTES.md, issue 20, has the rule
# that chose between them, written before they ran). A candidate equal to the defaults is the
# same run as "brn": it runs once and is reported under both names.
# "brn"'s schedule is brn.schedule_for(steps) with its defaults; the candidates name theirs in full
# (warmup_windows 0: the paper's fractions alone), so that each keeps its meaning when a default
# changes.
VARIANTS: Dict[str, dict] = {
    "bn": dict(layer="bn"),
    "brn": dict(layer="brn"),
    # Round 1: the paper's rate and nn.BatchNorm's, the schedule scaled to the run.
    "brn_momentum0.01": dict(layer="brn", momentum=0.01, warmup_windows=0),
    "brn_momentum0.1": dict(layer="brn", momentum=0.1, warmup_windows=0),
    # Round 2: the warm-up spans >= 3 averaging windows (3 / momentum steps), ramps after it.
    "brn_warmup3w": dict(layer="brn", momentum=0.01, warmup_windows=3),
    "brn_warmup3w_noramp": dict(layer="brn", momentum=0.01, warmup_windows=3, ramps=False),
    # Round 3: which correction costs the i.i.d. ResNet, r or d? (bn_limit: neither, a control)
    "brn_bn_limit": dict(layer="brn", momentum=0.01, warmup_windows=3, r_max=1.0, d_max=0.0),
    "brn_r_only": dict(layer="brn", momentum=0.01, warmup_windows=3, d_max=0.0),
    "brn_d_only": dict(layer="brn", momentum=0.01, warmup_windows=3, r_max=1.0),
    # Round 7: the running average starts as a cumulative mean (no initial bias to wait for),
    # so the warm-up can be the paper's fraction (or one averaging window).
    "brn_cumstart": dict(layer="brn", momentum=0.01, warmup_windows=0, cumulative_start=True),
    "brn_cumstart_1w": dict(layer="brn", momentum=0.01, warmup_windows=1,
                            cumulative_start=True),
}
CANDIDATES = tuple(v for v in VARIANTS if v.startswith("brn_"))
R_MAX, D_MAX = 3.0, 5.0
OPTIM = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)  # cosine decay to 0

FULL = dict(seeds=(0, 1, 2, 3, 4), evals=10, steps=None)
SMOKE = dict(seeds=(0,), evals=2, steps=20)


_DATA_CACHE: Dict[str, tuple] = {}


def data_of(dataset: str):
    if dataset not in _DATA_CACHE:
        _DATA_CACHE[dataset] = LOADERS[dataset]()
    return _DATA_CACHE[dataset]


def default_momentum(layer: str) -> Optional[float]:
    module = nn.BatchNorm1d if layer == "bn" else brn.BatchRenorm1d
    return inspect.signature(module).parameters["momentum"].default


def configuration(variant: str) -> dict:
    """What a variant runs: its layer and every argument the experiment sets."""
    v = VARIANTS[variant]
    config = dict(layer=v["layer"], momentum=v.get("momentum", default_momentum(v["layer"])))
    if v["layer"] == "bn":
        return config
    windows = inspect.signature(brn.schedule_for).parameters["warmup_windows"].default
    return dict(config, warmup_windows=v.get("warmup_windows", windows),
                ramps=v.get("ramps", True), r_max=v.get("r_max", R_MAX),
                d_max=v.get("d_max", D_MAX),
                # Named only when set, so that the runs recorded before round 7 keep matching.
                **({"cumulative_start": True} if v.get("cumulative_start") else {}))


def schedule_of(variant: str, steps: int) -> Dict[str, int]:
    """A Batch Renorm variant's schedule: brn.schedule_for (the paper's, scaled to the run, the
    warm-up >= warmup_windows averaging windows); ramps=False switches the final bounds on when
    the warm-up ends."""
    c = configuration(variant)
    schedule = brn.schedule_for(steps, c["momentum"], c["warmup_windows"])
    if not c["ramps"]:
        schedule.update(r_max_ramp_steps=0, d_max_ramp_steps=0)
    return schedule


def schedules_of(steps: Dict[str, int], variants: Sequence[str]) -> dict:
    """The meta's schedule (the defaults', which the plots mark) and every variant's."""
    return dict(schedule={d: schedule_of("brn", n) for d, n in steps.items()},
                schedules={v: {d: schedule_of(v, n) for d, n in steps.items()}
                           for v in variants if v != "bn"})


def runs_of(variants: Sequence[str]) -> Dict[str, List[str]]:
    """{variant that runs: [every variant it stands for]}: one run per distinct configuration."""
    runs: Dict[str, List[str]] = {}
    for v in variants:
        same = next((r for r in runs if configuration(r) == configuration(v)), None)
        runs.setdefault(same or v, []).append(v)
    return runs


def make_model(dataset: str, variant: str, setting: str, steps: int) -> nn.Module:
    exp, config = EXPERIMENTS[dataset], configuration(variant)
    renorm = ({} if config["layer"] == "bn" else
              dict(r_max=config["r_max"], d_max=config["d_max"], **schedule_of(variant, steps)))
    norm = tasks.NormFactory(config["layer"], exp["settings"][setting].get("group"),
                             config["momentum"], renorm, config.get("cumulative_start", False))
    x_tr, y_tr, _, _ = data_of(dataset)
    classes = int(y_tr.max()) + 1
    if exp["model"] == "resnet1d":
        return tasks.resnet1d(norm, classes)
    return tasks.residual_mlp(norm, x_tr.shape[1], classes)


# ------------------------------------------------------------------------------- training


@torch.no_grad()
def accuracy_population(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


@torch.no_grad()
def accuracy_batch_stats(model: nn.Module, x: Tensor, y: Tensor, as_trained: bool,
                         classes_per_batch: Optional[int] = None) -> float:
    """Test accuracy of the training-mode function: every test batch of 32 normalised with its
    own statistics. as_trained: the batches are built like the training batches (classes per
    batch, and per-group statistics for the microbatch settings); otherwise they are i.i.d.
    and every layer normalises over all 32. A copy runs it, so the model's running statistics
    stay as they are."""
    net = copy.deepcopy(model).train()
    if not as_trained:
        classes_per_batch = None
        for m in net.modules():
            if isinstance(m, tasks.MicroBatch):
                m.group = BATCH  # a group of the whole batch: plain batch statistics
    steps = len(y) // BATCH
    idx = tasks.batch_indices(y.numpy(), steps, seed=12345, classes_per_batch=classes_per_batch)
    hits = sum((net(x[b]).argmax(1) == y[b]).sum().item() for b in torch.as_tensor(idx))
    return hits / idx.size


def train_one(task: dict) -> dict:
    """One (dataset, setting, layer, seed) run; returns its accuracy curve and final figures."""
    torch.set_num_threads(1)
    dataset, setting, layer, seed = task["dataset"], task["setting"], task["layer"], task["seed"]
    steps, evals = task["steps"], task["evals"]
    x_tr, y_tr, x_te, y_te = data_of(dataset)
    cpb = EXPERIMENTS[dataset]["settings"][setting].get("classes_per_batch")
    # Initialisation and batch order depend on the seed only, so BatchNorm and Batch Renorm
    # start from the same weights and see the same batches.
    torch.manual_seed(seed)
    model = make_model(dataset, layer, setting, steps)
    idx = torch.as_tensor(tasks.batch_indices(y_tr.numpy(), steps, seed, cpb))
    opt = torch.optim.SGD(model.parameters(), **OPTIM)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss()
    eval_at = sorted({int(round(steps * (k + 1) / evals)) for k in range(evals)})
    curve_steps, curve_acc = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for step in range(1, steps + 1):
        b = idx[step - 1]
        loss = loss_fn(model(x_tr[b]), y_tr[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step in eval_at:
            curve_steps.append(step)
            curve_acc.append(accuracy_population(model, x_te, y_te))
    # CPU time as well as wall time: on a machine shared with other jobs the wall time
    # measures the neighbours, the CPU time what a run costs.
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return dict(task, curve_steps=curve_steps, curve_acc=curve_acc, final=curve_acc[-1],
                batch_stats_iid=accuracy_batch_stats(model, x_te, y_te, as_trained=False),
                batch_stats_setting=accuracy_batch_stats(model, x_te, y_te, as_trained=True,
                                                         classes_per_batch=cpb),
                train_acc=accuracy_population(model, x_tr, y_tr),
                final_loss=float(loss.detach()), seconds=seconds, cpu_seconds=cpu_seconds)


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_tasks(todo: List[dict], jobs: int, progress: bool = True) -> List[dict]:
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a convenience, not a requirement
        tqdm = None
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress,
               file=sys.stderr) if tqdm else None
    results = []

    def done(r):
        results.append(r)
        if bar is not None:
            bar.set_postfix_str(f"{r['dataset']}/{r['setting']}/{r['layer']}/s{r['seed']}"
                                f" acc={r['final']:.3f}")
            bar.update(1)

    if jobs <= 1:
        for t in todo:
            done(train_one(t))
    else:
        ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
        with ctx.Pool(jobs, initializer=_worker_init) as pool:
            for r in pool.imap_unordered(train_one, todo):
                done(r)
    if bar is not None:
        bar.close()
    return results


def expand(results: List[dict], runs: Dict[str, List[str]]) -> List[dict]:
    """Every run's record under each variant name it stands for, in table order."""
    out = [dict(r, layer=name, ran_as=r["layer"]) for r in results for name in runs[r["layer"]]]
    datasets, variants = list(EXPERIMENTS), list(VARIANTS)
    key = lambda r: (datasets.index(r["dataset"]),
                     list(EXPERIMENTS[r["dataset"]]["settings"]).index(r["setting"]),
                     variants.index(r["layer"]), r["seed"])
    return sorted(out, key=key)


# -------------------------------------------------------------------------------- outputs


def nested(results: List[dict], field: str) -> dict:
    """{dataset: {setting: {layer: [per seed]}}} of one per-run figure, in run order."""
    out: dict = {}
    for r in results:
        out.setdefault(r["dataset"], {}).setdefault(r["setting"], {}).setdefault(
            r["layer"], []).append(round(r[field], 6))
    return out


def curves_of(results: List[dict]) -> dict:
    out: dict = {}
    for r in results:
        node = out.setdefault(r["dataset"], {}).setdefault(r["setting"], {}).setdefault(
            r["layer"], {"steps": r["curve_steps"], "seeds": [], "acc": []})
        node["seeds"].append(r["seed"])
        node["acc"].append([round(a, 6) for a in r["curve_acc"]])
    return out


def backend_in_use() -> str:
    try:
        from batchrenorm_cuda._common import use_fused
        x = torch.randn(4, 2, 3)
        return "fused (CPU kernel)" if use_fused(x, "auto", "accuracy") else "reference"
    except Exception as e:  # the experiment does not depend on it; record what happened
        return f"unknown ({type(e).__name__})"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny step counts and one seed; writes to a temporary folder "
                        "unless --out-dir is given")
    p.add_argument("--out-dir", default=None, help=f"where to write (default {RESULTS_DIR})")
    p.add_argument("--datasets", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--settings", nargs="+", default=None,
                   help="a subset of the settings (default: every setting of each data set)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="the layers to run (default: all; the report needs bn and brn)")
    p.add_argument("--steps", type=int, default=None, help="override every data set's steps")
    p.add_argument("--length", type=int, default=1,
                   help="multiply each data set's steps (NOTES.md, issue 20, rounds 4-5: is a "
                        "result a property of short runs?)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one thread each (default: min(2, cores))")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rewrite the outputs in --out-dir from its "
                        "accuracy_curves.json, with brn taken from the run that has the "
                        "modules' current defaults")
    p.add_argument("--merge", nargs="+", default=(), metavar="DIR",
                   help="with --report-only: add the variants recorded in these folders' "
                        "accuracy_curves.json that --out-dir lacks (same data sets, settings, "
                        "seeds and steps; a run is a pure function of configuration and seed)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    if args.report_only:
        return report_again(args.out_dir or RESULTS_DIR, args)
    cfg = SMOKE if args.smoke else FULL
    seeds = tuple(args.seeds) if args.seeds else cfg["seeds"]
    steps = {d: args.length * (args.steps or cfg["steps"] or EXPERIMENTS[d]["steps"])
             for d in args.datasets}
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="accuracy_smoke_") if args.smoke
                               else RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)

    settings = {d: [s for s in EXPERIMENTS[d]["settings"]
                    if args.settings is None or s in args.settings] for d in args.datasets}
    known = {s for d in args.datasets for s in EXPERIMENTS[d]["settings"]}
    unknown = set(args.settings or ()) - known
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)} for data sets {args.datasets}")
    runs = runs_of(args.variants)
    todo = [dict(dataset=d, setting=s, layer=run, seed=seed, steps=steps[d], evals=cfg["evals"])
            for d in args.datasets for s in settings[d] for seed in seeds for run in runs]
    # Longest runs first, so that the pool's last worker does not finish alone.
    cost = {"signals100": 3.0, "tabular100": 1.0}
    todo.sort(key=lambda t: -t["steps"] * cost[t["dataset"]])
    for d in args.datasets:  # build the data once in the parent; forked workers inherit it
        data_of(d)
    t0 = time.perf_counter()
    ran = run_tasks(todo, args.jobs, progress=not args.quiet)
    wall = time.perf_counter() - t0
    results = expand(ran, runs)

    table = nested(results, "final")
    meta = dict(
        paper="Ioffe 2017, Batch Renormalization, section 4",
        datasets={d: dict(label=EXPERIMENTS[d]["label"], settings=EXPERIMENTS[d]["settings"])
                  for d in args.datasets},
        seeds=list(seeds), steps=steps, batch=BATCH, r_max=R_MAX,
        variants={v: configuration(v) for v in args.variants},
        ran_as={v: r for r, names in runs.items() for v in names},
        d_max=D_MAX, **schedules_of(steps, args.variants),
        schedule_rule="brn.schedule_for(steps, momentum, warmup_windows): warm-up 5 %, r_max "
                      "reached at 40 %, d_max at 25 % of the steps (the paper's 5k / 40k / 25k "
                      "over a 100k-step reference), the warm-up >= warmup_windows / momentum "
                      "steps with the ramps' lengths kept",
        optimizer=dict(OPTIM, name="SGD", lr_schedule="cosine to 0"),
        evaluation="test accuracy; population statistics (model.eval()) unless named "
                   "batch_stats_*: training-mode forward on test batches of 32, i.i.d. "
                   "(batch_stats_iid) or built like the setting's training batches "
                   "(batch_stats_setting)",
        backend=backend_in_use(), torch=torch.__version__, python=platform.python_version(),
        machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.jobs} worker(s) "
                "x 1 thread",
        wall_seconds=round(wall, 1), smoke=args.smoke,
        # What the runs would take on an otherwise idle machine: their CPU time over the workers.
        cpu_seconds_per_worker=round(sum(r["cpu_seconds"] for r in ran) / args.jobs, 1),
        run_seconds_wall_cpu={f"{r['dataset']}/{r['setting']}/{r['layer']}/{r['seed']}":
                     [round(r["seconds"], 2), round(r["cpu_seconds"], 2)] for r in ran},
    )
    extra = {f: nested(results, f) for f in EXTRA_FIELDS}
    return write_outputs(out_dir, table, extra, curves_of(results), meta, args)


EXTRA_FIELDS = ("batch_stats_iid", "batch_stats_setting", "train_acc")


def write_outputs(out_dir: str, table: dict, extra: dict, curves: dict, meta: dict,
                  args: argparse.Namespace) -> dict:
    with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out_dir, "accuracy_curves.json"), "w") as f:
        json.dump(dict(meta=meta, curves=curves, **extra), f, indent=1)
    md = accuracy_report.markdown(table, extra, meta, SETTING_LABELS)
    with open(os.path.join(out_dir, "accuracy.md"), "w") as f:
        f.write(md)
    if not args.no_plot:
        accuracy_report.plot(curves, table, meta, SETTING_LABELS,
                             os.path.join(out_dir, "accuracy.png"))
    if not args.quiet:
        print(md)
        print(f"wrote {out_dir}")
    return dict(table=table, extra=extra, meta=meta, out_dir=out_dir)


def merge_runs(saved: dict, other_dir: str) -> None:
    """Adds to `saved` (an accuracy_curves.json) the variants recorded in other_dir's that it
    lacks. The two must have run the same cells (data sets, settings, seeds, steps); the wall and
    CPU times become the sums, what `make accuracy` would take for all of them."""
    with open(os.path.join(other_dir, "accuracy_curves.json")) as f:
        other = json.load(f)
    mine, theirs = saved["meta"], other["meta"]
    for key in ("seeds", "steps", "datasets"):
        if mine[key] != theirs[key]:
            raise SystemExit(f"--merge {other_dir}: its {key} differ from the run's")
    new = [v for v in theirs["variants"] if v not in mine["variants"]]
    if not new:
        return
    for field in ("curves",) + EXTRA_FIELDS:
        for d, rows in other[field].items():
            for s, cell in rows.items():
                saved[field][d][s].update({v: cell[v] for v in new})
    mine["variants"].update({v: theirs["variants"][v] for v in new})
    mine["run_seconds_wall_cpu"].update(
        {k: t for k, t in theirs["run_seconds_wall_cpu"].items() if k.split("/")[2] in new})
    cpu = {k: t[1] for k, t in theirs["run_seconds_wall_cpu"].items()}
    share = sum(t for k, t in cpu.items() if k.split("/")[2] in new) / max(sum(cpu.values()), 1e-9)
    for key in ("wall_seconds", "cpu_seconds_per_worker"):  # the new variants' share of theirs
        mine[key] = round(mine[key] + share * theirs[key], 1)
    mine["merged_from"] = mine.get("merged_from", []) + [os.path.basename(other_dir)]


def report_again(out_dir: str, args: argparse.Namespace) -> dict:
    """Rewrite the outputs from a finished run's accuracy_curves.json, with "brn" (and every
    alias) taken from the run whose configuration the modules' defaults have *now*: after a
    default changes, the runs need not be repeated, since a run is a pure function of its
    configuration and seed. Fails if no recorded run has that configuration."""
    with open(os.path.join(out_dir, "accuracy_curves.json")) as f:
        saved = json.load(f)
    for other in args.merge:
        merge_runs(saved, other)
    meta, recorded = saved["meta"], saved["meta"]["variants"]
    source = {}
    for v in recorded:
        want = configuration(v)
        source[v] = next((u for u, c in recorded.items()
                          if all(c.get(k) == value for k, value in want.items())), None)
        if source[v] is None:
            raise SystemExit(f"--report-only: no recorded run has {v}'s configuration "
                             f"{configuration(v)}; run the experiment again")
    pick = lambda node: {d: {s: {v: cell[source[v]] for v in recorded} for s, cell in rows.items()}
                         for d, rows in node.items()}
    curves = pick(saved["curves"])
    table = {d: {s: {v: [round(a[-1], 6) for a in node["acc"]] for v, node in cell.items()}
                 for s, cell in rows.items()} for d, rows in curves.items()}
    meta = dict(meta, **schedules_of(meta["steps"], list(recorded)),
                variants={v: configuration(v) for v in recorded},
                ran_as={v: next(r for r, names in runs_of(list(recorded)).items() if v in names)
                        for v in recorded})
    extra = {f: pick(saved[f]) for f in EXTRA_FIELDS}
    return write_outputs(out_dir, table, extra, curves, meta, args)


if __name__ == "__main__":
    main()
