"""The benchmark script runs end to end (--smoke, CPU, in-process) and writes the documented
results schema. Performance itself is not tested."""
import json
from pathlib import Path

import pytest
import torch

import batchrenorm_cuda

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


TOP_KEYS = {"device", "torch", "cuda", "csrc_tree", "threads", "copy_gbps", "timestamp",
            "rows", "loadavg_start", "loadavg_end", "skipped", "errors"}
ROW_KEYS = {"shape", "layout", "dtype", "impl", "mode", "device_ms", "wall_ms", "gbps",
            "backend", "p20_ms", "p80_ms", "reps"}


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory, load_benchmark):
    bench = load_benchmark("bench_batchrenorm.py")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--smoke", "--device", "cpu", "--no-progress", "--out", str(out),
                    "--impls", "brn_fused,bn_native,brn_reference", "--default-allocator"])
    finally:
        torch.set_num_threads(threads)
    return bench, out, json.loads(out.read_text())


def test_smoke_writes_json_markdown_and_plot(smoke_result):
    bench, out, result = smoke_result
    assert TOP_KEYS <= set(result)
    assert result["cuda"] is None and result["copy_gbps"] is None
    assert result["threads"] >= 1 and result["device"]
    assert result["errors"] == []
    assert out.with_suffix(".md").read_text().startswith("# Batch Renorm benchmark")
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_smoke_rows(smoke_result):
    bench, _, result = smoke_result
    impls = ["bn_native", "brn_reference"]
    if batchrenorm_cuda.extension_available("cpu"):
        impls.append("brn_fused")
    else:
        assert "brn_fused" in result["skipped"]
    rows = result["rows"]
    expected = {(impl, mode, layout, tuple(n_chw))
                for impl in impls for mode in ("fwd", "bwd", "fwd+bwd")
                for layout in ("nchw", "channels_last")
                for n_chw in [(n,) + s for n in bench.SMOKE_BATCH_SIZES
                              for s in bench.SMOKE_SHAPES]}
    assert {(r["impl"], r["mode"], r["layout"], tuple(r["shape"])) for r in rows} == expected
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["dtype"] == "float32"
        assert r["device_ms"] > 0 and r["wall_ms"] > 0
        assert r["p20_ms"] <= r["device_ms"] <= r["p80_ms"]
        assert r["reps"] == 3
        numel = 1
        for d in r["shape"]:
            numel *= d
        passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[r["mode"]]
        assert r["gbps"] == pytest.approx(passes * numel * 4 / (r["device_ms"] * 1e-3) / 1e9)
    backends = {r["impl"]: r["backend"] for r in rows}
    assert backends["bn_native"] == "native" and backends["brn_reference"] == "reference"


def test_summary_ratios_against_native(smoke_result):
    bench, _, result = smoke_result
    table = bench.summary_table(result["rows"], "bn_native")
    assert {row[0] for row in table} >= {"brn_reference"}
    for impl, mode, count, gmean, best, worst in table:
        assert int(count) == 4
        assert float(best) <= float(gmean) <= float(worst.split()[0])


def test_harness_quantiles_and_bytes(load_benchmark):
    harness = load_benchmark("harness.py")
    t = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median_ms == 3.0 and t.p20_ms < 3.0 < t.p80_ms and t.reps == 5
    assert harness.minimal_bytes(10, 2, "fwd+bwd") == 100
    assert harness.geomean([2.0, 8.0]) == pytest.approx(4.0)
    # Paired per round: (2/1, 4/4, 6/2) -> median 2, where the medians' ratio is 4/2.
    assert harness.paired_ratio({"samples_ms": [2, 4, 6]}, {"samples_ms": [1, 4, 2]}) == 2
    assert harness.paired_ratio({"device_ms": 1.0}, {"device_ms": 2.0}) is None


def test_module_benchmark_runs_and_writes_its_results(tmp_path, load_benchmark):
    bench = load_benchmark("bench_modules.py")
    out = tmp_path / "modules.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--threads", "1", "--no-compile", "--rep-ms", "2",
                             "--min-reps", "3", "--default-allocator", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ratio"] > 0 for r in rows)
    assert {r["kind"] for r in rows} == {"norm", "block"}
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    assert "1t eager geomean" in result["summary"]


def test_whole_networks_train_eager(load_benchmark):
    # bench_modules.py --networks: every network's BatchRenorm variant really is converted and
    # takes a finite training step (the timed step is exactly this callable).
    # Each label's step takes its turn through its instances (placements), one per call.
    networks = load_benchmark("networks.py")
    for name in networks.NETWORKS:
        steps = networks.training_steps(name, compiled=False, placements=2)
        assert set(steps) == {"brn", "bn", "bn_copy"}
        for label, step in steps.items():
            for _ in range(2):
                assert torch.isfinite(step()), (name, label)
            for model in step.models:
                renorm = [m for m in model.modules()
                          if isinstance(m, batchrenorm_cuda.modules._BatchRenorm)]
                norms = renorm or [m for m in model.modules()
                                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
                assert bool(renorm) == (label == "brn"), (name, label)
                assert all(int(m.num_batches_tracked) == 1 for m in norms), (name, label)


def test_network_rows_carry_the_control(load_benchmark):
    # A whole network's row: ours / nn.BatchNorm, and the A/A control (nn.BatchNorm / a copy of
    # itself) from the same interleaved rounds, summarised per thread count and mode.
    bench = load_benchmark("bench_modules.py")
    cfg = bench.harness.TimerConfig(warmup_ms=0.0, reps=3)
    row = bench.run_network("crossq critic 512x512", False, cfg, placements=2)
    row["threads"] = 1
    assert row["placements"] == 2 and row["reps"] == 3
    assert row["ratio"] > 0 and row["control_ratio"] > 0
    summary = bench.summary([row])
    assert summary["1t eager networks A/A geomean"] == row["control_ratio"]


def test_cpu_runs_keep_freed_memory(tmp_path):
    # By default a CPU run tells glibc to keep freed memory (so page faults on fresh outputs do
    # not decide ratios) and says so in its results. In a child process: the setting is
    # process-wide, and the in-process smoke runs above pass --default-allocator.
    import platform
    import subprocess
    import sys
    out = tmp_path / "alloc.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_batchrenorm as b; "
            "b.main(['--smoke', '--device', 'cpu', '--no-progress', '--no-plot', "
            "'--impls', 'bn_native', '--modes', 'fwd', '--out', sys.argv[2]])")
    subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), str(out)], check=True,
                   capture_output=True, timeout=600)
    allocator = json.loads(out.read_text())["cpu_allocator"]
    if platform.libc_ver()[0] == "glibc":
        assert allocator.startswith("glibc, freed memory kept"), allocator
    assert f"CPU allocator: {allocator}." in out.with_suffix(".md").read_text()
