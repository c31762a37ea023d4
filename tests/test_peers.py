"""The other Batch Renorm layers our users have (benchmarks/peers.py) behave as the README says:
our layer agrees with the reference, and each peer's deviations from it are exactly the ones
documented. When a peer changes (fixes a bug, changes a default) a test here fails: update the
README's comparison table and peers.MODELS."""
import math

import pytest

W, N, C = 4, 128, 16  # warm-up, batch, channels: 3 W steps
TOL = 1e-5


@pytest.fixture(scope="module")
def peers(load_benchmark):
    return load_benchmark("peers.py")


def _run(peers, name):
    pytest.importorskip(peers.PEERS[name]["module"],
                        reason=f"{name} is not installed (make rl-deps installs it)")
    return peers.check(name, warmup=W, N=N, C=C)


def _common(result):
    """What holds for every peer: it is affine in x_hat per channel (so r and d describe it),
    r and d are those of its documented model, its running statistics are ours, and our
    BatchRenorm1d agrees with the reference."""
    for r in result["records"]:
        assert r["fit_residual"] < 1e-4, r
        assert r["r_vs_model"] < TOL and r["d_vs_model"] < 1e-4, r
        assert r["mean_vs_ref"] < TOL and r["var_vs_ref"] < TOL, r
        assert r["ours_out_vs_ref"] < 1e-5 and r["ours_grad_vs_ref"] < 1e-5, r
        assert r["ours_buffers_vs_ref"] < TOL, r
    assert result["eval_out_vs_ref"] < 1e-4


def test_torchrl_warmup_factor_grows_without_bound(peers):
    res = _run(peers, "torchrl")
    _common(res)
    recs = res["records"]
    for r in recs[:2 * W]:  # steps 1..2W: the reference's output, r and d within bounds
        assert r["out_vs_ref"] < 1e-4 and r["grad_vs_ref"] < 1e-5, r
        assert r["r_in_step_bounds"] and r["d_in_step_bounds"], r
    # ... also where r and d clip, so the agreement is not that of BatchNorm steps.
    assert all(r["ref_r_clipped_low"] + r["ref_r_clipped_high"] + r["ref_d_clipped"] > 0
               for r in recs[W:2 * W])
    # From step 2W + 1: factor 2, so r = 2 r - 1 (< 0 where r < 1/2) and d = 2 d.
    first = recs[2 * W]
    assert first["r_negative"] > 0 and first["r_min"] == pytest.approx(-1 / 3, abs=1e-4)
    assert not first["r_in_final_bounds"] and first["out_vs_ref"] > 1
    assert res["summary"]["first_step_r_negative"] == 2 * W + 1
    assert res["summary"]["first_step_r_out_of_final_bounds"] == 2 * W + 1
    # num_batches_tracked is not capped at warmup_steps (clamp_max's result is discarded).
    assert [r["counter"] for r in recs] == list(range(1, 3 * W + 1))


def test_torchrl_three_d_running_var_uses_batch_size(peers):
    pytest.importorskip("torchrl", reason="torchrl is not installed (make rl-deps installs it)")
    out = peers.three_d("torchrl")
    assert out["var_factor"] == pytest.approx(out["n_factor"], rel=1e-6)
    assert out["running_var_rel_error"] > 0.02


def test_sb3_unbiased_variance_late_switch_no_ramp(peers):
    res = _run(peers, "sb3")
    _common(res)
    recs = res["records"]
    bn_r = math.sqrt((N - 1) / N)  # unbiased variance: r_eff = sqrt((var_B+eps)/(var_u+eps))
    for r in recs[:W + 1]:  # steps 1..W+1 are BatchNorm steps, r_eff just below 1
        assert bn_r - 1e-3 < r["r_min"] <= r["r_max"] < 1 - 1 / (4 * N), r
        assert r["d_absmax"] < 1e-4, r
    assert not any(r["r_in_step_bounds"] for r in recs[:W])  # ours: r = 1 exactly there
    # Step W + 1: the reference renormalises (r or d clip), sb3 still does BatchNorm.
    late = recs[W]
    assert late["ref_r_clipped_low"] + late["ref_r_clipped_high"] + late["ref_d_clipped"] > 0
    assert late["out_vs_ref"] > 1
    # Step W + 2: the final bounds at once (no ramp), r_eff = r * sqrt((N-1)/N) when eps << var.
    assert recs[W + 1]["r_max"] == pytest.approx(3 * bn_r, rel=1e-3)
    renorm = recs[W + 1:]
    assert all(r["r_min"] > 0 and r["r_max"] < 3 and r["d_in_final_bounds"] for r in renorm)
    assert min(r["r_min"] for r in renorm) < 1 / 3 * (1 - 1e-3)  # below 1/r_max
    assert all(0.001 < r["out_vs_ref"] < 0.1 for r in renorm)


def test_sb3_rejects_three_d_input(peers):
    pytest.importorskip("sb3_contrib", reason="sb3-contrib is not installed (make rl-deps)")
    assert "raises" in peers.three_d("sb3")


def test_peer_adapters_reach_renorm_phase(peers):
    found, skipped = peers.available()
    if not found:
        pytest.skip(f"no peer importable: {skipped}")
    for name in found:
        m = peers.bench_module(name, 8)
        counter = peers.buffers(name, m)[2]
        assert int(counter) > (2 if name == "sb3" else m.warmup_steps - 1)
        if name == "torchrl":  # warm-up factor exactly 1 for the timed calls
            assert int(counter) // m.warmup_steps == 1


def test_bench_modules_times_peers_and_skips_missing_ones(tmp_path, monkeypatch,
                                                        load_benchmark):
    # bench_modules.py with one RL shape: the importable peers get ratio columns and their
    # versions in the JSON; a peer that does not import is reported and skipped, no crash.
    import json

    import torch

    bench = load_benchmark("bench_modules.py")
    monkeypatch.setattr(bench, "QUICK", ("rl 256x64",))
    monkeypatch.setitem(bench.peers.PEERS, "missing",
                        dict(bench.peers.PEERS["torchrl"], module="no_such_module_xyz"))
    out = tmp_path / "modules.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--threads", "1", "--no-compile", "--default-allocator",
                    "--rep-ms", "2", "--min-reps", "3", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert "missing" in result["peers_skipped"] and "missing" not in result["peers"]
    norm = next(r for r in result["rows"] if r["kind"] == "norm")
    for name, info in result["peers"].items():
        assert info["version"] and norm[f"{name}_ratio"] > 0
    assert "skipped" in out.with_suffix(".md").read_text()


def test_peers_write_a_nan_batch_into_their_buffers(peers):
    # Unlike ours (README, "Non-finite batches"), one NaN in a batch poisons the channel's
    # running statistics, as in nn.BatchNorm.
    import torch

    found, _ = peers.available()
    if not found:
        pytest.skip("no peer importable")
    for name in found:
        m = peers.bench_module(name, 4)
        x = torch.randn(16, 4)
        x[0, 1] = float("nan")
        with torch.no_grad():
            m(x)
        rm, rv, _ = peers.buffers(name, m)
        assert torch.isnan(rm[1]) and torch.isnan(rv[1]), name
        assert torch.isfinite(rm[[0, 2, 3]]).all() and torch.isfinite(rv[[0, 2, 3]]).all(), name
