"""benchmarks/crossq_sb3.py (make rl): the recipe that swaps our BatchRenorm1d into
sb3-contrib's CrossQ, and a smoke run of the benchmark. Skipped without the RL packages
(make rl-deps installs them)."""
import json

import pytest
import torch

pytest.importorskip("sb3_contrib", reason="sb3-contrib not installed (make rl-deps)")
pytest.importorskip("gymnasium", reason="gymnasium not installed (make rl-deps)")

import batchrenorm_cuda as brn  # noqa: E402

@pytest.fixture(scope="module")
def crossq(load_benchmark):
    return load_benchmark("crossq_sb3.py")


def _model(**kwargs):
    from sb3_contrib import CrossQ
    return CrossQ("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", learning_starts=20,
                  buffer_size=200, batch_size=16,
                  policy_kwargs=dict(net_arch=[16, 16], renorm_warmup_steps=5), **kwargs)


def test_recipe_builds_and_switches_our_layers(crossq):
    import sb3_contrib.crossq.policies as policies
    from sb3_contrib.common.torch_layers import BatchRenorm1d as Theirs

    with crossq.use_our_batchrenorm():
        model = _model()
        counts = crossq.check_recipe(model, "ours")
        assert counts == {"actor": 3, "critic": 6}  # BRN before each Linear (+ actor's last)
        layers = [m for m in model.critic.modules() if isinstance(m, brn.BatchRenorm1d)]
        assert len(layers) == 6 and not any(isinstance(m, Theirs) for m in model.critic.modules())
        first = layers[0]
        assert (first.eps, first.momentum, first.r_max, first.d_max) == (1e-3, 0.01, 3.0, 5.0)
        assert (first.warmup_steps, first.r_max_ramp_steps, first.d_max_ramp_steps) == (6, 0, 0)
        for mode in (True, False):
            model.critic.set_bn_training_mode(mode)
            assert all(m.training is mode for m in layers)
        model.learn(60)
        # Train-mode calls: one per gradient step for the critic, one per policy update for
        # the actor; everything else (target actions, actor loss, rollouts) ran in eval mode.
        steps = crossq.check_step_counts(model, "ours")
        assert steps["critic"] == [model._n_updates] * 6 and model._n_updates > 5
    assert policies.BatchRenorm1d is Theirs  # restored
    # Why the patch must outlive construction: sb3 looks the global up at each switch.
    model.critic.set_bn_training_mode(True)
    assert not any(m.training for m in layers)


def test_warmup_switch_matches_sb3(crossq):
    parity = crossq.check_layer_parity(warmup=3, steps=7)
    assert parity["first_renorm_call_sb3"] == parity["first_renorm_call_ours"] == 5
    # What remains is the unbiased batch variance and eps placement: ~1e-3 relative.
    assert max(r["max_rel_dy"] for r in parity["per_call"]) < 1e-2
    assert max(r["max_abs_running_var"] for r in parity["per_call"]) < 1e-5
    assert parity["eval_max_abs_diff"] < 1e-5


def test_smoke_run_writes_results(crossq, tmp_path):
    threads = torch.get_num_threads()
    out = crossq.main(["--smoke", "--envs", "Pendulum-v1", "--jobs", "1", "--timesteps", "150",
                       "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads
    data = json.loads((tmp_path / "crossq.json").read_text())
    assert set(data) == {"Pendulum-v1"}
    assert set(data["Pendulum-v1"]) == {"sb3_contrib", "ours"}
    for variant in ("sb3_contrib", "ours"):
        v = data["Pendulum-v1"][variant]
        assert len(v["returns"]) == 1 and all(isinstance(r, float) for r in v["returns"])
        assert v["sec_per_update"] > 0
        assert v["layer_counts"] == {"actor": 3, "critic": 6}
        assert all(s["running_mean_finite"] and s["running_var_finite"]
                   for s in v["first_critic_layer"])
    meta = json.loads((tmp_path / "crossq_meta.json").read_text())
    assert meta["layer_parity"]["switch_matches"] and meta["versions"]["sb3_contrib"]
    assert (tmp_path / "crossq.md").stat().st_size > 0 and (tmp_path / "crossq.png").exists()
    assert out["out_dir"] == str(tmp_path)
