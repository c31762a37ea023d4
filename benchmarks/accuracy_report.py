"""The accuracy experiment's Markdown table and curves plot (benchmarks/accuracy.py)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

LAYER_LABELS = {"bn": "BatchNorm", "brn": "Batch Renorm"}


def label(variant: str) -> str:
    return LAYER_LABELS.get(variant, f"`{variant}`")


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


def recovery(rows: dict, setting: str, variant: str = "brn") -> Dict[str, float]:
    """BatchNorm's loss against the i.i.d. control, a Batch Renorm variant's gain over
    BatchNorm, and the share of the loss that gain is (None when BatchNorm lost nothing)."""
    bn, brn = pct(rows[setting]["bn"]).mean(), pct(rows[setting][variant]).mean()
    ctrl = control_of(rows)
    loss = pct(rows[ctrl]["bn"]).mean() - bn if ctrl else float("nan")
    gain = brn - bn
    return dict(bn_loss=loss, gain=gain, share=gain / loss if loss > 0 else None)


# The rule that chose the defaults (benchmarks/NOTES.md, issue 20), written before the runs.
NO_REGRET_POINTS = 0.5   # i.i.d. controls: within this many points of BatchNorm,
                         # or within the larger sample std of the two
LOSS_TO_RECOVER = 3.0    # settings where BatchNorm loses at least this much ...
MIN_SHARE = 0.5          # ... must keep at least this share of it


def rule_checks(table: dict, variant: str) -> List[dict]:
    """Every check of the rule for one variant: the i.i.d. controls and each setting where
    BatchNorm loses >= LOSS_TO_RECOVER points."""
    checks = []
    for d, rows in table.items():
        ctrl = control_of(rows)
        if ctrl is None:
            continue
        for s in rows:
            if s == ctrl:
                bn, v = pct(rows[s]["bn"]), pct(rows[s][variant])
                spread = max(float(x.std(ddof=1)) if len(x) > 1 else 0.0 for x in (bn, v))
                allowed = max(NO_REGRET_POINTS, spread)
                loss = bn.mean() - v.mean()
                checks.append(dict(dataset=d, setting=s, kind="no regret", value=loss,
                                   limit=allowed, passed=bool(loss <= allowed)))
                continue
            rec = recovery(rows, s, variant)
            if rec["bn_loss"] >= LOSS_TO_RECOVER:
                checks.append(dict(dataset=d, setting=s, kind="recovery", value=rec["share"],
                                   limit=MIN_SHARE, passed=bool(rec["share"] >= MIN_SHARE)))
    return checks


def decide(table: dict, candidates: Sequence[str]) -> dict:
    """The rule's decision among the candidates: all checks passed first, then (if several
    pass) the larger smallest recovery share; if none passes, fewer failed checks, then the
    smaller worst i.i.d. loss."""
    scored = []
    for c in candidates:
        checks = rule_checks(table, c)
        failed = sum(not k["passed"] for k in checks)
        shares = [k["value"] for k in checks if k["kind"] == "recovery"] or [0.0]
        worst_iid = max([k["value"] for k in checks if k["kind"] == "no regret"] or [0.0])
        scored.append(((failed, -min(shares), worst_iid), c, checks))
    scored.sort(key=lambda t: t[0])
    return dict(choice=scored[0][1], rule_met=scored[0][0][0] == 0,
                checks={c: checks for _, c, checks in scored})


def rule_section(table: dict, meta: dict, candidates: Sequence[str],
                 setting_labels: Dict[str, str]) -> List[str]:
    verdict = decide(table, candidates)
    lines = ["## The rule that chose the defaults", "",
             f"Written before these runs (benchmarks/NOTES.md, issue 20): on every i.i.d. "
             f"control a candidate stays within max({NO_REGRET_POINTS} point, the larger seed "
             f"std) of BatchNorm, and in every setting where BatchNorm loses >= "
             f"{LOSS_TO_RECOVER:g} points it keeps >= {MIN_SHARE:.0%} of the loss.", "",
             "| candidate | data set | check | measured | limit | passed |",
             "|---|---|---|---|---|---|"]
    for c in candidates:
        for k in verdict["checks"][c]:
            measured = (f"{k['value']:+.1f} points below BatchNorm" if k["kind"] == "no regret"
                        else f"{100 * k['value']:.0f} % recovered")
            limit = (f"<= {k['limit']:.1f}" if k["kind"] == "no regret"
                     else f">= {100 * k['limit']:.0f} %")
            lines.append(f"| `{c}` | {k['dataset']} | {k['kind']}: "
                         f"{setting_labels[k['setting']]} | {measured} | {limit} "
                         f"| {'yes' if k['passed'] else '**no**'} |")
    default = next((c for c in candidates if meta["ran_as"].get(c) == meta["ran_as"].get("brn")),
                   None)
    lines += ["", f"Decision: `{verdict['choice']}` "
              + ("passes every check." if verdict["rule_met"] else
                 "fails the fewest checks; **the rule is not met by any candidate**.")
              + (f" The modules' defaults are `{default}`." if default else
                 " The modules' defaults are none of the candidates.")
              + ("" if verdict["rule_met"] or default == verdict["choice"] else
                 " A tie-break by the number of failures is not a reason to change them "
                 "(benchmarks/NOTES.md, issue 20, round 7)."), ""]
    return lines


def markdown(table: dict, extra: dict, meta: dict, setting_labels: Dict[str, str]) -> str:
    seeds = meta["seeds"]
    lines = ["# Batch Renorm vs BatchNorm: small and non-i.i.d. minibatches", "",
             "Test accuracy (%), population statistics (`model.eval()`), mean ± std (sample "
             f"std) over {len(seeds)} seed(s) {list(seeds)}. Regenerate with `make accuracy`; "
             "configuration in `accuracy_curves.json` (`meta`).", ""] + PAPER
    candidates = [v for v in meta["variants"] if v.startswith("brn_")]
    own = ", ".join(f"{v}: momentum {meta['variants'][v]['momentum']}" for v in ("bn", "brn")
                    if v in meta["variants"])
    aliases = "".join(f"`{v}` is the same run as `{r}`; " for v, r in meta["ran_as"].items()
                      if v != r)
    lines += [f"`bn` is nn.BatchNorm1d and `brn` BatchRenorm1d, each with its module's defaults "
              f"({own}), Batch Renorm's schedule from `brn.schedule_for(steps)`; {aliases}"
              "each `brn_<name>` candidate names its settings (NOTES.md, issue 20).", ""]
    for d, rows in table.items():
        ctrl = control_of(rows)
        lines += [f"## {meta['datasets'][d]['label']}: {meta['steps'][d]} steps", "",
                  "| setting | BatchNorm | Batch Renorm | BatchNorm's loss vs i.i.d. "
                  "| Batch Renorm - BatchNorm | share of the loss recovered | "
                  + " | ".join(f"`{c}`" for c in candidates) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(candidates)]
        for s, cell in rows.items():
            rec = recovery(rows, s)
            loss = "(control)" if s == ctrl else ("n/a" if ctrl is None
                                                  else f"{rec['bn_loss']:.1f}")
            share = ("" if s == ctrl or rec["share"] is None else f"{100 * rec['share']:.0f} %")
            lines.append(f"| {setting_labels[s]} | {fmt(cell['bn'])} | {fmt(cell['brn'])} "
                         f"| {loss} | {rec['gain']:+.1f} | {share} | "
                         + " | ".join(fmt(cell[c]) for c in candidates) + " |")
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
    if candidates:
        lines += rule_section(table, meta, candidates, setting_labels)
    sch = meta["schedule"]
    lines += [f"Hardware: {meta['machine']}; wall time {meta['wall_seconds']:.0f} s "
              f"(CPU time per worker {meta.get('cpu_seconds_per_worker', float('nan')):.0f} s); "
              f"backend {meta['backend']}; torch {meta['torch']}.",
              f"Batch Renorm: r_max {meta['r_max']:g}, d_max {meta['d_max']:g} (a candidate "
              f"that names other bounds has them: `meta.variants`); "
              + "; ".join(f"{d}: warm-up {v['warmup_steps']}, r_max reached at "
                          f"{v['warmup_steps'] + v['r_max_ramp_steps']}, d_max at "
                          f"{v['warmup_steps'] + v['d_max_ramp_steps']} steps"
                          for d, v in sch.items()) + ".",
              f"Both layers: SGD lr {meta['optimizer']['lr']} "
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
    # One line per distinct run: a candidate equal to the defaults is drawn once, as brn.
    shown, runs = [], set()
    for v, run in meta["ran_as"].items():
        if run not in runs:
            runs.add(run)
            shown.append(v)
    palette = ["tab:blue", "tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown",
               "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    colours = {v: palette[i % len(palette)] for i, v in enumerate(shown)}
    for i, d in enumerate(datasets):
        for j, s in enumerate(curves[d]):
            ax = axes[i][j]
            for v in shown:
                if v not in curves[d][s]:
                    continue
                node = curves[d][s][v]
                same = [u for u, run in meta["ran_as"].items()
                        if run == meta["ran_as"][v] and u != v]
                name = label(v) + (f" (= {', '.join(same)})" if same else "")
                acc = pct(node["acc"])
                mean = acc.mean(0)
                std = acc.std(0, ddof=1) if len(acc) > 1 else np.zeros_like(mean)
                ax.plot(node["steps"], mean, color=colours[v], linewidth=1,
                        label=f"{name} {fmt(table[d][s][v])}")
                ax.fill_between(node["steps"], mean - std, mean + std, color=colours[v],
                                alpha=0.2, linewidth=0)
            sch = meta["schedule"][d]  # where Batch Renorm's correction is switched on
            ax.axvline(sch["warmup_steps"], color="grey", linestyle=":", linewidth=1)
            ax.axvline(sch["warmup_steps"] + sch["r_max_ramp_steps"], color="grey",
                       linestyle="--", linewidth=1)
            ax.set_title(f"{d}: {setting_labels[s]}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=5, loc="lower right")
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
