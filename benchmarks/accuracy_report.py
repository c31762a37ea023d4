"""The accuracy experiment's Markdown table and curves plot (benchmarks/accuracy.py)."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

LAYER_LABELS = {"bn": "BatchNorm", "brn": "Batch Renorm"}
PAPER = ["Paper (Ioffe 2017, Inception-v3 on ImageNet, top-1 %), for comparison:", "",
         "| setting | BatchNorm | Batch Renorm |", "|---|---|---|",
         "| minibatch 32, i.i.d. | 78.3 | 78.5 |",
         "| microbatches of 4 | 74.2 | 76.5 |",
         "| non-i.i.d., 16 labels x 2 images | 67.0 | 78.5 |", ""]


def pct(values: Sequence[float]) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=np.float64)


def fmt(values: Sequence[float]) -> str:
    v = pct(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def control_of(rows: dict):
    """The i.i.d. control's setting name, or None when a partial run left it out."""
    return next((s for s in rows if "iid" in s), None)


def recovery(rows: dict, setting: str) -> Dict[str, float]:
    """BatchNorm's loss against the i.i.d. control, Batch Renorm's gain over BatchNorm, and the
    share of the loss that gain is (None when BatchNorm lost nothing to recover)."""
    bn, brn = pct(rows[setting]["bn"]).mean(), pct(rows[setting]["brn"]).mean()
    ctrl = control_of(rows)
    loss = pct(rows[ctrl]["bn"]).mean() - bn if ctrl else float("nan")
    gain = brn - bn
    return dict(bn_loss=loss, gain=gain, share=gain / loss if loss > 0 else None)


def markdown(table: dict, extra: dict, meta: dict, setting_labels: Dict[str, str]) -> str:
    seeds = meta["seeds"]
    lines = ["# Batch Renorm vs BatchNorm: small and non-i.i.d. minibatches", "",
             "Test accuracy (%), population statistics (`model.eval()`), mean ± std (sample "
             f"std) over {len(seeds)} seed(s) {list(seeds)}. Regenerate with `make accuracy`; "
             "configuration in `accuracy_curves.json` (`meta`).", ""] + PAPER
    for d, rows in table.items():
        ctrl = control_of(rows)
        lines += [f"## {meta['datasets'][d]['label']}: {meta['steps'][d]} steps", "",
                  "| setting | BatchNorm | Batch Renorm | BatchNorm's loss vs i.i.d. "
                  "| Batch Renorm - BatchNorm | share of the loss recovered |",
                  "|---|---|---|---|---|---|"]
        for s, cell in rows.items():
            rec = recovery(rows, s)
            loss = "(control)" if s == ctrl else ("n/a" if ctrl is None
                                                  else f"{rec['bn_loss']:.1f}")
            share = ("" if s == ctrl or rec["share"] is None else f"{100 * rec['share']:.0f} %")
            lines.append(f"| {setting_labels[s]} | {fmt(cell['bn'])} | {fmt(cell['brn'])} "
                         f"| {loss} | {rec['gain']:+.1f} | {share} |")
        lines += ["", "The train/inference mismatch: the same final models, evaluated with "
                  "batch statistics (training-mode forward on test batches of 32, built like "
                  "the setting's training batches, or i.i.d.) and with population statistics:",
                  "", "| setting | BatchNorm, population | BatchNorm, batch stats (setting's "
                  "batches) | BatchNorm, batch stats (i.i.d. batches) | Batch Renorm, "
                  "population | Batch Renorm, batch stats (setting's batches) |",
                  "|---|---|---|---|---|---|"]
        for s, cell in rows.items():
            bs, bi = extra["batch_stats_setting"][d][s], extra["batch_stats_iid"][d][s]
            lines.append(f"| {setting_labels[s]} | {fmt(cell['bn'])} | {fmt(bs['bn'])} "
                         f"| {fmt(bi['bn'])} | {fmt(cell['brn'])} | {fmt(bs['brn'])} |")
        lines.append("")
    sch = meta["schedule"]
    lines += [f"Hardware: {meta['machine']}; wall time {meta['wall_seconds']:.0f} s "
              f"(CPU time per worker {meta.get('cpu_seconds_per_worker', float('nan')):.0f} s); "
              f"backend {meta['backend']}; torch {meta['torch']}.",
              f"Batch Renorm: r_max {meta['r_max']:g}, d_max {meta['d_max']:g}; "
              + "; ".join(f"{d}: warm-up {v['warmup_steps']}, r_max reached at "
                          f"{v['warmup_steps'] + v['r_max_ramp_steps']}, d_max at "
                          f"{v['warmup_steps'] + v['d_max_ramp_steps']} steps"
                          for d, v in sch.items()) + ".",
              f"Both layers: momentum {meta['momentum']}, SGD lr {meta['optimizer']['lr']} "
              f"(Nesterov {meta['optimizer']['momentum']}, weight decay "
              f"{meta['optimizer']['weight_decay']}), cosine decay to 0, batch {meta['batch']}.",
              ""]
    return "\n".join(lines)


def plot(curves: dict, table: dict, meta: dict, setting_labels: Dict[str, str],
         path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(curves)
    cols = max(len(curves[d]) for d in datasets)
    fig, axes = plt.subplots(len(datasets), cols, squeeze=False,
                             figsize=(3.8 * cols, 3.2 * len(datasets)))
    colours = {"bn": "tab:blue", "brn": "tab:red"}
    for i, d in enumerate(datasets):
        for j, s in enumerate(curves[d]):
            ax = axes[i][j]
            for l in LAYER_LABELS:
                node = curves[d][s][l]
                acc = pct(node["acc"])
                mean = acc.mean(0)
                std = acc.std(0, ddof=1) if len(acc) > 1 else np.zeros_like(mean)
                ax.plot(node["steps"], mean, color=colours[l],
                        label=f"{LAYER_LABELS[l]} {fmt(table[d][s][l])}")
                ax.fill_between(node["steps"], mean - std, mean + std, color=colours[l],
                                alpha=0.2, linewidth=0)
            sch = meta["schedule"][d]  # where Batch Renorm's correction is switched on
            ax.axvline(sch["warmup_steps"], color="grey", linestyle=":", linewidth=1)
            ax.axvline(sch["warmup_steps"] + sch["r_max_ramp_steps"], color="grey",
                       linestyle="--", linewidth=1)
            ax.set_title(f"{d}: {setting_labels[s]}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            ax.set_ylim(0.0, 100.0)
            if i == len(datasets) - 1:
                ax.set_xlabel("training step")
            if j == 0:
                ax.set_ylabel("test accuracy, eval mode (%)")
        for j in range(len(curves[d]), cols):
            axes[i][j].axis("off")
    fig.suptitle("BatchNorm vs Batch Renorm: test accuracy with population statistics "
                 "(model.eval()), mean ± std over seeds\n"
                 "grey dotted: end of Batch Renorm warm-up; dashed: r_max reaches 3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
