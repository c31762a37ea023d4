"""crossq_sb3.py's results: the per-environment summary, its Markdown table and the learning
curves plot."""
from __future__ import annotations

import statistics
from typing import Dict, List

import numpy as np

VARIANTS = ("sb3_contrib", "ours")


def _mean_std(xs: List[float]):
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summarise(runs: List[Dict], envs: List[str], seeds: List[int]) -> Dict:
    out: Dict[str, Dict] = {}
    for env_id in envs:
        out[env_id] = {}
        for variant in VARIANTS:
            rs = sorted((r for r in runs if r["env_id"] == env_id and r["variant"] == variant),
                        key=lambda r: r["seed"])
            if not rs:
                continue
            out[env_id][variant] = dict(
                returns=[r["final_return"] for r in rs],
                sec_per_update=float(statistics.median(r["sec_per_update"] for r in rs)),
                seeds=[r["seed"] for r in rs],
                sec_per_update_per_seed=[r["sec_per_update"] for r in rs],
                cpu_sec_per_update=float(statistics.median(r["cpu_sec_per_update"] for r in rs)),
                cpu_sec_per_update_per_seed=[r["cpu_sec_per_update"] for r in rs],
                gradient_steps=[r["gradient_steps"] for r in rs],
                curves=[r["curve"] for r in rs],
                first_critic_layer=[r["first_critic_layer"] for r in rs],
                layer_counts=rs[0]["layer_counts"],
                run_wall_s=[r["run_wall_s"] for r in rs],
                load=[[r["load_start"], r["load_end"]] for r in rs])
    return out


def write_markdown(path: str, summary: Dict, meta: Dict) -> None:
    lines = ["# CrossQ (sb3-contrib): its BatchRenorm1d vs ours", "",
             f"CPU: {meta['cpu']}; {meta['jobs']} runs at a time, 1 torch thread each; "
             f"torch {meta['versions']['torch']}, sb3-contrib {meta['versions']['sb3_contrib']}, "
             f"gymnasium {meta['versions']['gymnasium']}, mujoco {meta['versions']['mujoco']}. "
             f"Wall time {meta['wall_s'] / 60:.1f} min, load average "
             f"{meta['load_start']:.1f} -> {meta['load_end']:.1f}"
             + (f" (during: median {meta['load_during']['median']:.1f}, max "
                f"{meta['load_during']['max']:.1f})" if meta.get("load_during") else "")
             + ".", "",
             "Final return: mean of deterministic evaluation episodes at the end, mean ± std "
             "over seeds. sec/update: median over seeds of the wall time inside model.train() "
             "per gradient step (CPU time in parentheses).", "",
             "| env | variant | timesteps | seeds | final return | sec/update (cpu) | ours / sb3 |",
             "|---|---|---|---|---|---|---|"]
    for env_id, by_variant in summary.items():
        base = by_variant.get("sb3_contrib", {}).get("sec_per_update")
        for variant, s in by_variant.items():
            m, sd = _mean_std(s["returns"])
            ratio = f"{s['sec_per_update'] / base:.3f}" if base and variant == "ours" else ""
            lines.append(
                f"| {env_id} | {variant} | {meta['budgets'][env_id]['timesteps']} | "
                f"{len(s['returns'])} | {m:.1f} ± {sd:.1f} | {s['sec_per_update'] * 1e3:.2f} ms "
                f"({s['cpu_sec_per_update'] * 1e3:.2f} ms) | {ratio} |")
    lines += ["", "Per seed (final return sb3_contrib / ours, sec/update ratio ours/sb3):", ""]
    for env_id, by_variant in summary.items():
        if len(by_variant) < 2:
            continue
        a, b = by_variant["sb3_contrib"], by_variant["ours"]
        cells = [f"seed {s}: {ra:.1f} / {rb:.1f}, {tb / ta:.3f}" for s, ra, rb, ta, tb in
                 zip(a["seeds"], a["returns"], b["returns"], a["sec_per_update_per_seed"],
                     b["sec_per_update_per_seed"])]
        lines.append(f"- {env_id}: " + "; ".join(cells))
    p = meta["layer_parity"]
    lines += ["", f"Layer parity (check_layer_parity, warmup_steps={p['warmup_steps']}, "
              f"batch {p['batch']}x{p['channels']}): first renorm call sb3 "
              f"{p['first_renorm_call_sb3']}, ours {p['first_renorm_call_ours']}; max |dy| "
              f"{max(r['max_abs_dy'] for r in p['per_call']):.2e} (relative "
              f"{max(r['max_rel_dy'] for r in p['per_call']):.1e}), eval "
              f"{p['eval_max_abs_diff']:.1e}.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, summary: Dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(summary)
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    colors = {"sb3_contrib": "tab:blue", "ours": "tab:orange"}
    for ax, env_id in zip(axes[0], envs):
        for variant, s in summary[env_id].items():
            curves = s["curves"]
            steps = sorted({int(t) for c in curves for t, _ in c})
            vals = np.array([[dict((int(t), v) for t, v in c).get(x, np.nan) for x in steps]
                             for c in curves], dtype=float)
            mean = np.nanmean(vals, 0)
            ax.plot(steps, mean, color=colors[variant], label=f"{variant} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0),
                                color=colors[variant], alpha=0.2)
        ax.set_title(env_id)
        ax.set_xlabel("timesteps")
        ax.set_ylabel("eval return (deterministic)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("CrossQ (sb3-contrib): mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
