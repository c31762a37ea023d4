"""Does Batch Renorm help where the paper says it does? A laptop-sized reproduction.

Ioffe (2017), section 4, trains Inception-v3 on ImageNet three ways: minibatches of 32 drawn
i.i.d.; minibatches of 32 whose normalisation statistics come from microbatches of 4; and
non-i.i.d. minibatches of 16 labels x 2 images. BatchNorm loses accuracy in the last two,
Batch Renorm much less. This script asks the same three questions of two small data sets that
are built offline, with nothing downloaded:

  mnist1d  MNIST-1D (the `mnist1d` package's procedural generator, standard 4000/1000 split),
           a 3-layer 1-D CNN with BatchNorm1d or BatchRenorm1d;
  digits   scikit-learn's bundled 8x8 digits (1797 images, fixed stratified 75/25 split),
           a 3-layer 2-D CNN with BatchNorm2d or BatchRenorm2d.

Settings (every step sees 32 training examples and takes the gradient over all 32):
  iid        batches of 32 drawn without replacement, a fresh permutation each epoch;
  micro4     the same batches, but every normalisation layer normalises each group of 4
             consecutive examples with that group's own statistics (the paper's microbatches);
             the running statistics are updated once per group, as each microbatch updates
             them in the paper, and the r_max/d_max schedule advances once per step;
  micro2     as micro4 with groups of 2;
  noniid     each batch holds 2 classes x 16 examples (the classes drawn at random per step).

Evaluation is test accuracy in model.eval(), that is with the population (running) statistics,
as a deployed model would run. BatchNorm and Batch Renorm get the same model, initialisation,
data order, optimiser, learning-rate schedule, step budget and momentum; only the layer differs.

    python benchmarks/accuracy.py            # the full run (make accuracy), ~10 min on 2 cores
    python benchmarks/accuracy.py --smoke    # a few seconds, written to a temporary folder
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import batchrenorm_cuda as brn

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DATASETS = ("mnist1d", "digits")
SETTINGS = ("iid", "micro4", "micro2", "noniid")
LAYERS = ("bn", "brn")
SETTING_LABELS = {
    "iid": "batch 32, i.i.d.",
    "micro4": "batch 32, microbatches of 4",
    "micro2": "batch 32, microbatches of 2",
    "noniid": "batch 32, non-i.i.d. (2 classes x 16)",
}
LAYER_LABELS = {"bn": "BatchNorm", "brn": "Batch Renorm"}
DATASET_LABELS = {"mnist1d": "MNIST-1D (1-D CNN)", "digits": "sklearn digits 8x8 (2-D CNN)"}

BATCH = 32
NONIID_CLASSES = 2
# One moving-average rate for both layers (see docs/accuracy.md): 0.01 averages over ~100
# updates, short next to every run here (>= 1500 steps, up to 16 updates per step), and smooth
# enough that the population statistics are not themselves the noise we are measuring.
MOMENTUM = 0.01
R_MAX, D_MAX = 3.0, 5.0
# The paper's schedule (warm-up 5k steps, r_max 1 -> 3 reached at 40k, d_max 0 -> 5 at 25k)
# laid over a 100k-step reference and scaled to the run: fractions of the step budget.
WARMUP_FRAC, R_MAX_AT_FRAC, D_MAX_AT_FRAC = 0.05, 0.40, 0.25

FULL = dict(steps={"mnist1d": 3000, "digits": 1000}, seeds=(0, 1, 2), evals=20)
SMOKE = dict(steps={"mnist1d": 60, "digits": 60}, seeds=(0,), evals=3)
OPTIM = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)  # cosine decay to 0


def schedule_for(steps: int) -> Dict[str, int]:
    warmup = int(round(WARMUP_FRAC * steps))
    return dict(warmup_steps=warmup,
                r_max_ramp_steps=int(round(R_MAX_AT_FRAC * steps)) - warmup,
                d_max_ramp_steps=int(round(D_MAX_AT_FRAC * steps)) - warmup)


# ----------------------------------------------------------------------------------- data


def load_mnist1d():
    # make_dataset is the package's procedural generator (it seeds numpy itself and never
    # touches the network; only get_dataset would download the pickled copy).
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    data = make_dataset(get_dataset_args())
    np.random.set_state(state)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)  # (N, 1, 40)
    i = lambda a: torch.as_tensor(a, dtype=torch.long)
    return f(data["x"]), i(data["y"]), f(data["x_test"]), i(data["y_test"])


def load_digits():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    # Standardise with the training set's statistics only.
    mean, std = x_tr.mean(), x_tr.std()
    t = lambda a: torch.as_tensor((a - mean) / std, dtype=torch.float32)
    i = lambda a: torch.as_tensor(a, dtype=torch.long)
    return t(x_tr), i(y_tr), t(x_te), i(y_te)


LOADERS = {"mnist1d": load_mnist1d, "digits": load_digits}


def batch_indices(setting: str, labels: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """(steps, 32) training indices; the same for BatchNorm and Batch Renorm at one seed."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    out = np.empty((steps, BATCH), dtype=np.int64)
    if setting != "noniid":
        per_epoch = n // BATCH
        for s in range(0, steps, per_epoch):
            perm = rng.permutation(n)[: per_epoch * BATCH].reshape(per_epoch, BATCH)
            out[s: s + per_epoch] = perm[: steps - s]
        return out
    classes = np.unique(labels)
    per_class = BATCH // NONIID_CLASSES
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    queues = {c: rng.permutation(pools[c]) for c in classes}
    for s in range(steps):
        chosen = rng.choice(classes, size=NONIID_CLASSES, replace=False)
        rows = []
        for c in chosen:
            if len(queues[c]) < per_class:  # each class cycles through its own permutation
                queues[c] = np.concatenate([queues[c], rng.permutation(pools[c])])
            rows.append(queues[c][:per_class])
            queues[c] = queues[c][per_class:]
        out[s] = np.concatenate(rows)
    return out


# --------------------------------------------------------------------------------- models


class MicroBatch(nn.Module):
    """Normalise each group of `group` consecutive examples with that group's own statistics.

    All groups of a step are normalised in one call, by laying them side by side as channels:
    (N, C, *) -> (group, N/group * C, *), so each "channel" holds one group's values of one
    channel. Every group therefore reads the running statistics as they stood at the start of
    the step (for Batch Renorm's r and d), as the paper's concurrent microbatches read the shared
    moving averages. The running statistics then end up exactly as if each group had updated
    them in turn (G updates with momentum m: the buffers decay by (1-m)^G and group k's
    statistics enter with weight m(1-m)^(G-1-k)). The step counter, which drives Batch Renorm's
    r_max/d_max schedule, advances once per step, as the paper's schedule counts training steps.
    In eval the wrapped layer runs unchanged, on its population statistics.
    """

    def __init__(self, layer: nn.Module, group: int) -> None:
        super().__init__()
        self.layer = layer
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        n, c = x.shape[0], x.shape[1]
        if not self.training or n % self.group or n == self.group:
            return layer(x)
        g, groups, rest = self.group, n // self.group, x.shape[2:]
        wide = x.reshape(groups, g, c, *rest).transpose(0, 1).reshape(g, groups * c, *rest)
        m = layer.momentum
        rm = layer.running_mean.repeat(groups)
        rv = layer.running_var.repeat(groups)
        w, b = layer.weight.repeat(groups), layer.bias.repeat(groups)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            out = nn.functional.batch_norm(wide, rm, rv, w, b, True, m, layer.eps)
        else:
            r_max, d_max = layer.clip_bounds()
            out = brn.batch_renorm(wide, rm, rv, w, b, True, m, layer.eps, r_max, d_max)
        with torch.no_grad():
            # rm (per group k) = (1-m) * old + m * stat_k; replay the G updates in order.
            decay = (1.0 - m) ** torch.arange(groups - 1, -1, -1, dtype=rm.dtype)
            for buf, new in ((layer.running_mean, rm), (layer.running_var, rv)):
                contrib = new.view(groups, c) - (1.0 - m) * buf
                buf.mul_((1.0 - m) ** groups).add_((decay[:, None] * contrib).sum(0))
            layer.num_batches_tracked.add_(1)
        return out.reshape(g, groups, c, *rest).transpose(0, 1).reshape(n, c, *rest)


def make_norm(layer: str, dim: int, channels: int, group: Optional[int], steps: int) -> nn.Module:
    if layer == "bn":
        norm = (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(channels, momentum=MOMENTUM)
    else:
        cls = brn.BatchRenorm1d if dim == 1 else brn.BatchRenorm2d
        norm = cls(channels, momentum=MOMENTUM, r_max=R_MAX, d_max=D_MAX, **schedule_for(steps))
    return MicroBatch(norm, group) if group else norm


def make_model(dataset: str, layer: str, group: Optional[int], steps: int) -> nn.Module:
    if dataset == "mnist1d":  # (N, 1, 40) -> 40 -> 20 -> 10 positions
        c = 32
        n = lambda ch: make_norm(layer, 1, ch, group, steps)
        return nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2, bias=False), n(c), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1, bias=False), n(c), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1, bias=False), n(c), nn.ReLU(),
            nn.Flatten(), nn.Linear(c * 10, 10))
    c = 32  # digits: (N, 1, 8, 8) -> 8x8 -> 4x4 -> 2x2
    n = lambda ch: make_norm(layer, 2, ch, group, steps)
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False), n(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), n(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), n(2 * c), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * c * 4, 10))


GROUPS = {"iid": None, "micro4": 4, "micro2": 2, "noniid": None}


# ------------------------------------------------------------------------------- training

_DATA_CACHE: Dict[str, tuple] = {}


def _data(dataset: str):
    if dataset not in _DATA_CACHE:
        _DATA_CACHE[dataset] = LOADERS[dataset]()
    return _DATA_CACHE[dataset]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_one(task: dict) -> dict:
    """One (dataset, setting, layer, seed) run; returns its accuracy curve."""
    torch.set_num_threads(1)
    dataset, setting, layer, seed = task["dataset"], task["setting"], task["layer"], task["seed"]
    steps, evals = task["steps"], task["evals"]
    x_tr, y_tr, x_te, y_te = _data(dataset)
    # The model's initialisation and the batch order depend on the seed only, so BatchNorm and
    # Batch Renorm start from the same weights and see the same batches.
    torch.manual_seed(seed)
    model = make_model(dataset, layer, GROUPS[setting], steps)
    idx = torch.as_tensor(batch_indices(setting, y_tr.numpy(), steps, seed))
    opt = torch.optim.SGD(model.parameters(), **OPTIM)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss()
    eval_at = sorted({int(round(steps * (k + 1) / evals)) for k in range(evals)})
    curve_steps, curve_acc = [], []
    t0 = time.perf_counter()
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
            curve_acc.append(evaluate(model, x_te, y_te))
    return dict(task, curve_steps=curve_steps, curve_acc=curve_acc, final=curve_acc[-1],
                final_loss=float(loss.detach()), seconds=time.perf_counter() - t0)


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_tasks(tasks: List[dict], jobs: int, progress: bool = True) -> List[dict]:
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a convenience, not a requirement
        tqdm = None
    bar = tqdm(total=len(tasks), desc="runs", unit="run", disable=not progress,
               file=sys.stderr) if tqdm else None
    results = []

    def done(r):
        results.append(r)
        if bar is not None:
            bar.set_postfix_str(f"{r['dataset']}/{r['setting']}/{r['layer']}/s{r['seed']}"
                                f" acc={r['final']:.3f}")
            bar.update(1)

    if jobs <= 1:
        for t in tasks:
            done(train_one(t))
    else:
        ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
        with ctx.Pool(jobs, initializer=_worker_init) as pool:
            for r in pool.imap_unordered(train_one, tasks):
                done(r)
    if bar is not None:
        bar.close()
    key = lambda r: (DATASETS.index(r["dataset"]), SETTINGS.index(r["setting"]),
                     LAYERS.index(r["layer"]), r["seed"])
    return sorted(results, key=key)


# -------------------------------------------------------------------------------- outputs


def summarise(results: List[dict], datasets, settings) -> dict:
    table = {d: {s: {l: [] for l in LAYERS} for s in settings} for d in datasets}
    for r in results:
        table[r["dataset"]][r["setting"]][r["layer"]].append(round(r["final"], 6))
    return table


def curves_of(results: List[dict]) -> dict:
    out: dict = {}
    for r in results:
        node = out.setdefault(r["dataset"], {}).setdefault(r["setting"], {}).setdefault(
            r["layer"], {"steps": r["curve_steps"], "seeds": [], "acc": []})
        node["seeds"].append(r["seed"])
        node["acc"].append([round(a, 6) for a in r["curve_acc"]])
    return out


def fmt(values: Sequence[float]) -> str:
    v = 100.0 * np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def markdown(table: dict, meta: dict) -> str:
    lines = ["# Batch Renorm vs BatchNorm: small and non-i.i.d. minibatches", "",
             "Test accuracy (%) with population statistics (model.eval()), mean ± std over "
             f"{len(meta['seeds'])} seed(s) {list(meta['seeds'])}. Regenerate with "
             "`make accuracy`; configuration in `accuracy_curves.json` (`meta`).", ""]
    lines += ["Paper (Ioffe 2017, Inception-v3 on ImageNet, top-1 %) for comparison:", "",
              "| setting | BatchNorm | Batch Renorm |", "|---|---|---|",
              "| minibatch 32, i.i.d. | 78.3 | 78.5 |",
              "| microbatches of 4 | 74.2 | 76.5 |",
              "| non-i.i.d., 16 labels x 2 images | 67.0 | 78.5 |", ""]
    for d, rows in table.items():
        lines += [f"## {DATASET_LABELS[d]}: {meta['steps'][d]} steps", "",
                  "| setting | BatchNorm | Batch Renorm | difference (BRN - BN) |",
                  "|---|---|---|---|"]
        for s, cell in rows.items():
            diff = 100.0 * (np.mean(cell["brn"]) - np.mean(cell["bn"]))
            lines.append(f"| {SETTING_LABELS[s]} | {fmt(cell['bn'])} | {fmt(cell['brn'])} "
                         f"| {diff:+.1f} |")
        lines.append("")
    sch = meta["schedule"]
    lines += [f"Hardware: {meta['machine']}; wall time {meta['wall_seconds']:.0f} s; "
              f"backend {meta['backend']}; torch {meta['torch']}.",
              f"Batch Renorm: r_max {R_MAX:g}, d_max {D_MAX:g}; per data set "
              + "; ".join(f"{d}: warm-up {v['warmup_steps']}, r_max reached at "
                          f"{v['warmup_steps'] + v['r_max_ramp_steps']}, d_max at "
                          f"{v['warmup_steps'] + v['d_max_ramp_steps']}"
                          for d, v in sch.items()) + " steps.",
              f"Both layers: momentum {MOMENTUM}, SGD lr {OPTIM['lr']} (Nesterov 0.9, weight "
              f"decay {OPTIM['weight_decay']}), cosine decay to 0, batch {BATCH}.", ""]
    return "\n".join(lines)


def plot(curves: dict, table: dict, path: str, schedule: Optional[dict] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(curves)
    settings = [s for s in SETTINGS if s in curves[datasets[0]]]
    fig, axes = plt.subplots(len(datasets), len(settings), squeeze=False,
                             figsize=(3.6 * len(settings), 3.1 * len(datasets)))
    colours = {"bn": "tab:blue", "brn": "tab:red"}
    for i, d in enumerate(datasets):
        for j, s in enumerate(settings):
            ax = axes[i][j]
            for l in LAYERS:
                node = curves[d][s][l]
                acc = 100.0 * np.asarray(node["acc"])
                mean = acc.mean(0)
                std = acc.std(0, ddof=1) if len(acc) > 1 else np.zeros_like(mean)
                ax.plot(node["steps"], mean, color=colours[l],
                        label=f"{LAYER_LABELS[l]} {fmt(table[d][s][l])}")
                ax.fill_between(node["steps"], mean - std, mean + std, color=colours[l],
                                alpha=0.2, linewidth=0)
            if schedule and d in schedule:  # where Batch Renorm's correction is switched on
                sch = schedule[d]
                ax.axvline(sch["warmup_steps"], color="grey", linestyle=":", linewidth=1)
                ax.axvline(sch["warmup_steps"] + sch["r_max_ramp_steps"], color="grey",
                           linestyle="--", linewidth=1)
            ax.set_title(f"{d}: {SETTING_LABELS[s]}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            if i == len(datasets) - 1:
                ax.set_xlabel("training step")
            if j == 0:
                ax.set_ylabel("test accuracy, eval mode (%)")
            # Scale to the last three quarters of the run, where the two layers part; the
            # first evaluations (all far lower) would flatten the end of every curve.
            k = len(curves[d][s]["bn"]["steps"]) // 4
            lo = min(100.0 * np.min(np.asarray(curves[d][s][l]["acc"])[:, k:]) for l in LAYERS)
            ax.set_ylim(max(0.0, lo - 3.0), 100.0)
    fig.suptitle("BatchNorm vs Batch Renorm: test accuracy with population statistics "
                 "(model.eval()), mean ± std over seeds\n"
                 "grey dotted: end of Batch Renorm warm-up; dashed: r_max reaches 3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def backend_in_use() -> str:
    try:
        x = torch.randn(4, 2, 3)
        from batchrenorm_cuda.functional import use_fused
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
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="override every data set's steps")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one thread each (default: min(2, cores))")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    cfg = SMOKE if args.smoke else FULL
    seeds = tuple(args.seeds) if args.seeds else cfg["seeds"]
    steps = {d: args.steps or cfg["steps"][d] for d in args.datasets}
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="accuracy_smoke_") if args.smoke
                               else RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)

    tasks = [dict(dataset=d, setting=s, layer=l, seed=seed, steps=steps[d], evals=cfg["evals"])
             for d in args.datasets for s in args.settings for seed in seeds for l in LAYERS]
    # Longest runs first so that the pool's last worker does not finish alone.
    tasks.sort(key=lambda t: -t["steps"] * (2 if t["setting"] == "micro2" else 1))
    for d in args.datasets:  # build the data once in the parent; forked workers inherit it
        _data(d)
    t0 = time.perf_counter()
    results = run_tasks(tasks, args.jobs, progress=not args.quiet)
    wall = time.perf_counter() - t0

    table = summarise(results, args.datasets, args.settings)
    meta = dict(
        paper="Ioffe 2017, Batch Renormalization, section 4",
        seeds=list(seeds), steps=steps, batch=BATCH, noniid_classes_per_batch=NONIID_CLASSES,
        microbatch_groups={s: GROUPS[s] for s in args.settings},
        momentum=MOMENTUM, r_max=R_MAX, d_max=D_MAX,
        schedule={d: schedule_for(n) for d, n in steps.items()},
        schedule_rule=f"warm-up {WARMUP_FRAC:.0%}, r_max reached at {R_MAX_AT_FRAC:.0%}, "
                      f"d_max reached at {D_MAX_AT_FRAC:.0%} of the steps (the paper's "
                      "5k / 40k / 25k over a 100k-step reference)",
        optimizer=dict(OPTIM, name="SGD", lr_schedule="cosine to 0"),
        evaluation="test accuracy, model.eval() (population statistics)",
        backend=backend_in_use(), torch=torch.__version__, python=platform.python_version(),
        machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.jobs} worker(s) "
                "x 1 thread",
        wall_seconds=round(wall, 1), smoke=args.smoke,
        run_seconds={f"{r['dataset']}/{r['setting']}/{r['layer']}/{r['seed']}":
                     round(r["seconds"], 2) for r in results},
    )
    with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out_dir, "accuracy_curves.json"), "w") as f:
        json.dump(dict(meta=meta, curves=curves_of(results)), f, indent=1)
    with open(os.path.join(out_dir, "accuracy.md"), "w") as f:
        f.write(markdown(table, meta))
    if not args.no_plot:
        plot(curves_of(results), table, os.path.join(out_dir, "accuracy.png"), meta["schedule"])
    if not args.quiet:
        print(markdown(table, meta))
        print(f"wrote {out_dir}")
    return dict(table=table, meta=meta, out_dir=out_dir)


if __name__ == "__main__":
    main()
