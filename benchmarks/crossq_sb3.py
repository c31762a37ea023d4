"""sb3-contrib's CrossQ with its own BatchRenorm1d and with ours swapped in (make rl).

CrossQ (Bhatt et al., ICLR 2024) is SAC without target networks and with Batch Renorm after
every hidden layer of the critic and the actor; sb3-contrib ships it with a pure-PyTorch
BatchRenorm1d (sb3_contrib.common.torch_layers). This script trains the same agent two ways,
on the same seeds, and compares returns and the time of a gradient step:

  sb3_contrib  sb3_contrib.CrossQ unchanged;
  ours         the same, with batchrenorm_cuda.BatchRenorm1d swapped in by the recipe below.

The recipe (use_our_batchrenorm): sb3-contrib's policies build their layers from the module
global `sb3_contrib.crossq.policies.BatchRenorm1d` and switch them between train and eval with
`isinstance(module, BatchRenorm1d)` on the same global, at every call. So replacing that one
global with a subclass of ours that takes sb3's constructor arguments gives our layers that sb3
builds and switches like its own. The global must stay replaced as long as the model is used
(set_bn_training_mode reads it at each gradient step), and set before the model is built.

    class SB3BatchRenorm1d(batchrenorm_cuda.BatchRenorm1d):
        def __init__(self, num_features, eps=1e-3, momentum=0.01, affine=True,
                     warmup_steps=100_000):
            super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                             r_max=3.0, d_max=5.0, warmup_steps=warmup_steps + 1,
                             r_max_ramp_steps=0, d_max_ramp_steps=0)
    sb3_contrib.crossq.policies.BatchRenorm1d = SB3BatchRenorm1d

Why each argument: sb3's layer is BatchNorm while its step counter (before the step) is
<= warmup_steps, and renormalises with r_max = 3, d_max = 5 at once from then on (no ramp);
ours renormalises from num_batches_tracked >= warmup_steps, hence warmup_steps + 1 and ramps
of 0 (check_layer_parity checks the switch lands on the same call). eps 1e-3 and momentum 0.01
are sb3's defaults, passed through. What stays different (README, "Other Batch Renorm
layers", has the measurements): sb3 normalises with the unbiased batch variance x.var(0)
(ours, like nn.BatchNorm, with the biased one; both update running_var with the unbiased
one), so its BatchNorm steps are ours
times sqrt((m-1)/m) (0.999 at CrossQ's joint batch m = 512); its renorm step computes
(x - (mu - d*sqrt(var)/r)) / sqrt(var/r^2 + eps), i.e. eps enters scaled by r^2, and the d term
d*sqrt(var)/r is not detached, so it carries a gradient through var (ours: r (x - mu) /
sqrt(var_b + eps) + d, r and d constants). Running statistics and eval agree to rounding.

Measured per run: the final return (mean of deterministic evaluation episodes), a learning
curve (evaluation every eval_every timesteps, BUDGETS), wall and CPU time inside model.train()
divided by the gradient steps, and the running statistics of the first critic layer. The two
variants of one seed run side by side, each in its own process with one torch thread, so that
both see the same load. Outputs in benchmarks/results/: crossq.json, crossq_meta.json,
crossq.png, crossq.md.

    python benchmarks/crossq_sb3.py            # the full run (make rl), about 30 min on 2 cores
    python benchmarks/crossq_sb3.py --smoke    # < 1 min, written to a temporary folder
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch

import batchrenorm_cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from crossq_report import VARIANTS, summarise, write_markdown, write_plot  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Per-environment budgets of the full run. Chosen so that the whole run (2 environments x 3
# seeds x 2 variants, two processes at a time) takes about 30 minutes on 2 idle cores; the
# renorm warm-up is a fraction of the gradient steps so that most of each run is renorm.
BUDGETS = {
    "Pendulum-v1": dict(timesteps=6_000, learning_starts=500, renorm_warmup_steps=1_000,
                        eval_every=500, eval_episodes=5, final_episodes=10),
    "HalfCheetah-v5": dict(timesteps=20_000, learning_starts=1_000, renorm_warmup_steps=3_000,
                           eval_every=2_000, eval_episodes=3, final_episodes=10),
}
SMOKE_BUDGET = dict(timesteps=300, learning_starts=100, renorm_warmup_steps=50,
                    eval_every=150, eval_episodes=1, final_episodes=1)
# Everything else is sb3-contrib's default CrossQ (lr 1e-3, batch 256, policy_delay 3, Adam
# betas (0.5, 0.999), eps 1e-3, momentum 0.01), except the critic/actor widths: sb3's default
# critic is 2 x [1024, 1024], about 10 GFLOP a gradient step, 0.15 s on one CPU core, which
# would leave ~2k updates a run in this budget. [256, 256] for both (the CrossQ paper's
# narrower variant) is ~15x cheaper; the same for both variants.
NET_ARCH = {"pi": [256, 256], "qf": [256, 256]}
BATCH_SIZE = 256


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

class SB3BatchRenorm1d(batchrenorm_cuda.BatchRenorm1d):
    """batchrenorm_cuda.BatchRenorm1d with sb3-contrib's constructor and schedule.

    sb3: BatchNorm while steps-before-the-call <= warmup_steps, then r_max=3, d_max=5 at once.
    Ours renormalises from num_batches_tracked >= warmup_steps: hence + 1, and no ramps.
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 affine: bool = True, warmup_steps: int = 100_000) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         r_max=3.0, d_max=5.0, warmup_steps=warmup_steps + 1,
                         r_max_ramp_steps=0, d_max_ramp_steps=0)


@contextlib.contextmanager
def use_our_batchrenorm(layer_cls=SB3BatchRenorm1d):
    """Within the block, sb3-contrib's CrossQ builds and switches our layers. Keep the block
    open while the model trains: set_bn_training_mode looks the global up at every call."""
    import sb3_contrib.crossq.policies as crossq_policies

    saved = crossq_policies.BatchRenorm1d
    crossq_policies.BatchRenorm1d = layer_cls
    try:
        yield
    finally:
        crossq_policies.BatchRenorm1d = saved


def variant_context(variant: str):
    if variant == "ours":
        return use_our_batchrenorm()
    if variant == "sb3_contrib":
        return contextlib.nullcontext()
    raise ValueError(f"unknown variant {variant!r}")


def _layer_classes(variant: str):
    from sb3_contrib.common.torch_layers import BatchRenorm1d as Theirs
    return (SB3BatchRenorm1d, Theirs) if variant == "ours" else (Theirs, SB3BatchRenorm1d)


def _steps(layer) -> int:
    counter = layer.num_batches_tracked if hasattr(layer, "num_batches_tracked") else layer.steps
    return int(counter)


def _running_stats(layer):
    if hasattr(layer, "running_mean"):
        return layer.running_mean, layer.running_var
    return layer.ra_mean, layer.ra_var


def check_recipe(model, variant: str) -> Dict[str, int]:
    """The layers in the actor and the critic are the variant's (and none of the other's), and
    sb3's set_bn_training_mode switches every one of them both ways. Returns the counts."""
    want, other = _layer_classes(variant)
    counts = {}
    for name, net in (("actor", model.actor), ("critic", model.critic)):
        mods = list(net.modules())
        ours = [m for m in mods if isinstance(m, want)]
        assert ours, f"{variant}: no {want.__name__} in the {name}"
        assert not any(isinstance(m, other) for m in mods), f"{variant}: a foreign layer in {name}"
        was = [m.training for m in ours]
        for mode in (True, False, True):
            net.set_bn_training_mode(mode)
            assert all(m.training is mode for m in ours), (
                f"{variant}: set_bn_training_mode({mode}) did not reach every layer of {name}")
        for m, t in zip(ours, was):
            m.train(t)
        counts[name] = len(ours)
    return counts


def check_step_counts(model, variant: str) -> Dict[str, List[int]]:
    """After training, each critic layer was run in train mode exactly once per gradient step
    (the joint forward) and each actor layer once per delayed policy update: proof that the
    eval-mode calls (target actions, the actor's loss through the critic, rollouts,
    evaluation) really ran in eval mode."""
    want, _ = _layer_classes(variant)
    n = model._n_updates
    expected = {"critic": n, "actor": n // model.policy_delay}
    got = {}
    for name, net in (("actor", model.actor), ("critic", model.critic)):
        got[name] = [_steps(m) for m in net.modules() if isinstance(m, want)]
        assert all(s == expected[name] for s in got[name]), (
            f"{variant}: {name} layers ran {got[name]} training steps, expected {expected[name]}")
    return got


def check_layer_parity(warmup: int = 3, steps: int = 8, channels: int = 64, batch: int = 512,
                       seed: int = 0) -> Dict[str, object]:
    """sb3's layer and ours (through the recipe), fed the same batches: the step at which each
    starts renormalising, and how far apart their outputs, input gradients and buffers are.

    The switch is located with a probe batch whose statistics are far from the running ones,
    so that renorm's correction is large: ours must switch on the same call as sb3's."""
    from sb3_contrib.common.torch_layers import BatchRenorm1d as Theirs

    g = torch.Generator().manual_seed(seed)
    theirs, ours = Theirs(channels, warmup_steps=warmup), SB3BatchRenorm1d(channels,
                                                                          warmup_steps=warmup)
    rows = []
    for step in range(steps):
        x = torch.randn(batch, channels, generator=g) * (0.2 + step) + 0.5 * step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = theirs(x1), ours(x2)
        dy = torch.randn(y1.shape, generator=g)
        y1.backward(dy)
        y2.backward(dy)
        y1, y2 = y1.detach(), y2.detach()
        # Renorm active on this call? BatchNorm output has mean 0, std ~1 per channel; with
        # these drifting batches renorm's d shifts it by O(1).
        shift1, shift2 = float(y1.mean(0).abs().max()), float(y2.mean(0).abs().max())
        rows.append(dict(
            call=step + 1, theirs_renorm=shift1 > 0.5, ours_renorm=shift2 > 0.5,
            max_abs_dy=float((y1 - y2).abs().max()),
            max_rel_dy=float(((y1 - y2).abs().max() / y1.abs().max())),
            max_abs_dx=float((x1.grad - x2.grad).abs().max()),
            max_abs_running_mean=float((theirs.ra_mean - ours.running_mean).abs().max()),
            max_abs_running_var=float((theirs.ra_var - ours.running_var).abs().max())))
    theirs.eval()
    ours.eval()
    x = torch.randn(batch, channels, generator=g) * 3
    with torch.no_grad():
        eval_diff = float((theirs(x) - ours(x)).abs().max())
    first = {k: next((r["call"] for r in rows if r[k]), None) for k in ("theirs_renorm",
                                                                         "ours_renorm")}
    return dict(warmup_steps=warmup, channels=channels, batch=batch,
                first_renorm_call_sb3=first["theirs_renorm"],
                first_renorm_call_ours=first["ours_renorm"],
                switch_matches=first["theirs_renorm"] == first["ours_renorm"] == warmup + 2,
                eval_max_abs_diff=eval_diff, per_call=rows)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

_PROGRESS = None  # a multiprocessing queue of timestep increments, set in the workers


def _init_worker(progress_queue) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    torch.set_num_threads(1)


def _report_progress(n: int) -> None:
    if _PROGRESS is not None and n:
        try:
            _PROGRESS.put_nowait(n)
        except Exception:  # noqa: BLE001 - progress is best effort
            pass


def run_one(task: Dict) -> Dict:
    """Train one (env, seed, variant) and measure it."""
    import gymnasium as gym
    from sb3_contrib import CrossQ
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    torch.set_num_threads(1)
    env_id, seed, variant, budget = task["env_id"], task["seed"], task["variant"], task["budget"]
    load_start = os.getloadavg()[0]
    wall_start = time.perf_counter()
    with variant_context(variant):
        # MuJoCo writes its compiler warnings (HalfCheetah's settotalmass) to MUJOCO_LOG.TXT
        # in the working directory: build the environments in a scratch one.
        with tempfile.TemporaryDirectory() as scratch, _chdir(scratch):
            env = gym.make(env_id)
            eval_env = Monitor(gym.make(env_id))
        eval_env.reset(seed=10_000 + seed)
        model = CrossQ(
            "MlpPolicy", env, seed=seed, device="cpu", verbose=0,
            learning_starts=budget["learning_starts"], buffer_size=budget["timesteps"],
            batch_size=BATCH_SIZE,
            policy_kwargs=dict(net_arch=task["net_arch"],
                               renorm_warmup_steps=budget["renorm_warmup_steps"]))
        layer_counts = check_recipe(model, variant)

        timing = dict(wall=0.0, cpu=0.0, updates=0, calls=0)
        train = model.train

        def timed_train(gradient_steps: int, batch_size: int = 64) -> None:
            before = model._n_updates
            c0, t0 = time.thread_time(), time.perf_counter()
            train(gradient_steps, batch_size)
            timing["wall"] += time.perf_counter() - t0
            timing["cpu"] += time.thread_time() - c0
            timing["updates"] += model._n_updates - before
            timing["calls"] += 1

        model.train = timed_train  # learn() calls self.train(...)

        curve: List[List[float]] = []

        def evaluate(episodes: int):
            rewards, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes,
                                         deterministic=True, return_episode_rewards=True)
            return [float(r) for r in rewards]

        class Curve(BaseCallback):
            def __init__(self):
                super().__init__()
                self.reported = 0

            def _on_step(self) -> bool:
                t = self.num_timesteps
                if t % budget["eval_every"] == 0 and t < budget["timesteps"]:
                    rewards = evaluate(budget["eval_episodes"])
                    curve.append([t, float(np.mean(rewards))])
                if t - self.reported >= 250:
                    _report_progress(t - self.reported)
                    self.reported = t
                return True

            def _on_training_end(self) -> None:
                _report_progress(self.num_timesteps - self.reported)

        model.learn(total_timesteps=budget["timesteps"], callback=Curve())
        final = evaluate(budget["final_episodes"])
        curve.append([budget["timesteps"], float(np.mean(final))])
        step_counts = check_step_counts(model, variant)
        first = next(m for m in model.critic.modules() if isinstance(m, _layer_classes(variant)[0]))
        mean, var = _running_stats(first)
        bn_stats = dict(
            running_mean_finite=bool(torch.isfinite(mean).all()),
            running_var_finite=bool(torch.isfinite(var).all()),
            running_var_positive=bool((var > 0).all()),
            running_mean_abs_mean=float(mean.abs().mean()), running_var_mean=float(var.mean()),
            steps=_steps(first))
        assert bn_stats["running_mean_finite"] and bn_stats["running_var_finite"], bn_stats
        env.close()
        eval_env.close()
    updates = max(timing["updates"], 1)
    return dict(
        env_id=env_id, seed=seed, variant=variant, final_return=float(np.mean(final)),
        final_episode_returns=final, curve=curve, gradient_steps=timing["updates"],
        sec_per_update=timing["wall"] / updates, cpu_sec_per_update=timing["cpu"] / updates,
        train_wall_s=timing["wall"], run_wall_s=time.perf_counter() - wall_start,
        load_start=load_start, load_end=os.getloadavg()[0], layer_counts=layer_counts,
        step_counts=step_counts, first_critic_layer=bn_stats, pid=os.getpid())


# ---------------------------------------------------------------------------------------------
# Driver, outputs
# ---------------------------------------------------------------------------------------------

def _versions() -> Dict[str, str]:
    import gymnasium
    import mujoco
    import sb3_contrib
    import stable_baselines3

    return dict(python=platform.python_version(), torch=torch.__version__,
                batchrenorm_cuda=getattr(batchrenorm_cuda, "__version__", "?"),
                batchrenorm_cpu_kernels=str(batchrenorm_cuda.extension_available("cpu")),
                sb3_contrib=sb3_contrib.__version__,
                stable_baselines3=stable_baselines3.__version__,
                gymnasium=gymnasium.__version__, mujoco=mujoco.__version__, numpy=np.__version__)


@contextlib.contextmanager
def _chdir(path: str):
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_LOAD_SAMPLES: List[float] = []  # the 1-minute load average, sampled every ~10 s by _run_all


def _sample_load(last: List[float]) -> None:
    now = time.monotonic()
    if now - last[0] >= 10.0:
        last[0] = now
        _LOAD_SAMPLES.append(os.getloadavg()[0])


def _run_all(tasks: List[Dict], jobs: int) -> List[Dict]:
    """Run the tasks, pairs of (sb3_contrib, ours) with the same env and seed side by side."""
    from tqdm import tqdm

    _LOAD_SAMPLES.clear()
    last_sample = [-1e9]

    total = sum(t["budget"]["timesteps"] for t in tasks)
    results: List[Dict] = []
    bar = tqdm(total=total, unit="step", desc="crossq", dynamic_ncols=True, mininterval=2.0)
    if jobs <= 1:
        threads = torch.get_num_threads()
        _init_worker(None)
        try:
            for task in tasks:
                bar.set_postfix_str(f"{task['env_id']} s{task['seed']} {task['variant']}")
                results.append(run_one(task))
                bar.update(task["budget"]["timesteps"])
        finally:
            torch.set_num_threads(threads)
        bar.close()
        return results
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    groups = [tasks[i:i + jobs] for i in range(0, len(tasks), jobs)]
    # One OpenMP/MKL thread per worker from the start: the spawned workers import torch with
    # the environment they inherit.
    with _environ(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"), \
            ctx.Pool(jobs, initializer=_init_worker, initargs=(progress,)) as pool:
        for group in groups:
            bar.set_postfix_str(f"{group[0]['env_id']} seed {group[0]['seed']}")
            pending = [pool.apply_async(run_one, (t,)) for t in group]
            while not all(p.ready() for p in pending):
                _sample_load(last_sample)
                try:
                    bar.update(progress.get(timeout=1.0))
                except queue_mod.Empty:
                    pass
            results.extend(p.get() for p in pending)  # re-raises a worker's error
        while True:
            try:
                bar.update(progress.get_nowait())
            except queue_mod.Empty:
                break
    bar.n = total
    bar.close()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny budgets, one seed, written to a temporary folder (< 1 min)")
    p.add_argument("--envs", nargs="+", default=None, help=f"default: {' '.join(BUDGETS)}")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (0..N-1); default 3, 1 with --smoke")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed + seeds - 1 (default 0)")
    p.add_argument("--timesteps", type=int, default=None,
                   help="total timesteps per run, every env (default: per env, BUDGETS)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (smoke: a temp dir)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one pair)")
    p.add_argument("--net-arch", choices=("256", "sb3"), default="256",
                   help="256: [256, 256] actor and critic (default); sb3: sb3-contrib's default "
                        "(actor [256, 256], critic [1024, 1024])")
    return p.parse_args(argv)


def _budget_for(env_id: str, args) -> Dict:
    budget = dict(SMOKE_BUDGET if args.smoke else BUDGETS.get(env_id, BUDGETS["HalfCheetah-v5"]))
    if args.timesteps is not None:
        scale = args.timesteps / budget["timesteps"]
        budget["timesteps"] = args.timesteps
        for key in ("learning_starts", "renorm_warmup_steps", "eval_every"):
            budget[key] = max(1, int(round(budget[key] * scale)))
    return budget


def main(argv=None) -> Dict:
    args = parse_args(argv)
    envs = args.envs or list(BUDGETS)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="crossq_smoke_") if args.smoke
                               else RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    budgets = {e: _budget_for(e, args) for e in envs}
    parity = check_layer_parity()
    assert parity["switch_matches"], f"the recipe's warm-up does not match sb3's: {parity}"
    net_arch = NET_ARCH if args.net_arch == "256" else {"pi": [256, 256], "qf": [1024, 1024]}
    tasks = [dict(env_id=e, seed=s, variant=v, budget=budgets[e], net_arch=net_arch)
             for e in envs for s in seeds for v in VARIANTS]
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # Headless MuJoCo (only rendering would need it; make rl sets it too).
    with _environ(MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")):
        runs = _run_all(tasks, args.jobs)
    wall = time.perf_counter() - t0
    summary = summarise(runs, envs, seeds)
    meta = dict(
        started=started, wall_s=wall, load_start=load_start, load_end=os.getloadavg()[0],
        cpu=harness.cpu_model_name(), cores=os.cpu_count(), jobs=args.jobs, torch_threads_per_run=1,
        load_during=(dict(samples=len(_LOAD_SAMPLES), min=min(_LOAD_SAMPLES),
                          median=statistics.median(_LOAD_SAMPLES), max=max(_LOAD_SAMPLES))
                     if _LOAD_SAMPLES else None),
        smoke=args.smoke, versions=_versions(), seeds=seeds, budgets=budgets,
        hyperparameters=dict(
            algorithm="sb3_contrib.CrossQ", policy="MlpPolicy", net_arch=net_arch,
            batch_size=BATCH_SIZE, learning_rate=1e-3, policy_delay=3, gamma=0.99,
            adam_betas=[0.5, 0.999], batch_norm_eps=1e-3, batch_norm_momentum=0.01,
            r_max=3.0, d_max=5.0, train_freq=1, gradient_steps=1,
            ours_layer="SB3BatchRenorm1d(batchrenorm_cuda.BatchRenorm1d): warmup_steps + 1, "
                       "r_max_ramp_steps=0, d_max_ramp_steps=0"),
        layer_parity={k: v for k, v in parity.items()},
        git_head=_git_head(), argv=sys.argv[1:] if argv is None else list(argv),
        runs=[{k: v for k, v in r.items() if k != "curve"} for r in runs])
    with open(os.path.join(out_dir, "crossq.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "crossq_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    write_markdown(os.path.join(out_dir, "crossq.md"), summary, meta)
    write_plot(os.path.join(out_dir, "crossq.png"), summary)
    print(open(os.path.join(out_dir, "crossq.md")).read())
    print(f"written to {out_dir}")
    return dict(summary=summary, meta=meta, out_dir=out_dir)


def _git_head() -> Optional[str]:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
