"""The accuracy experiment (benchmarks/accuracy.py, accuracy_tasks.py): its microbatch wrapper,
batch samplers, data sets and models, and a smoke run."""
import json

import pytest
import torch
from torch import nn

import batchrenorm_cuda as brn
from batchrenorm_cuda._testing import TOLERANCES

pytest.importorskip("sklearn")

@pytest.fixture(scope="module")
def accuracy(load_benchmark):
    return load_benchmark("accuracy.py")


def _tol(dtype=torch.float32):
    return TOLERANCES[dtype]


@pytest.mark.parametrize("shape,group", [((32, 5, 7), 4), ((32, 5, 7), 2), ((16, 3, 4, 4), 4)])
def test_microbatch_batchnorm_matches_a_loop_over_groups(accuracy, shape, group):
    # BatchNorm has no r, d: the wrapper must equal running the layer on each group in turn,
    # outputs, gradients and running statistics alike.
    torch.manual_seed(0)
    cls = nn.BatchNorm1d if len(shape) == 3 else nn.BatchNorm2d
    ref, layer = cls(shape[1], momentum=0.1), cls(shape[1], momentum=0.1)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    layer.load_state_dict(ref.state_dict())
    wrapped = accuracy.tasks.MicroBatch(layer, group)
    x = torch.randn(shape) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(shape)
    y_ref = torch.cat([ref(chunk) for chunk in x1.split(group)])
    y = wrapped(x2)
    (y_ref * dy).sum().backward()
    (y * dy).sum().backward()
    tol = _tol()
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(layer.running_var, ref.running_var, **tol)
    assert int(layer.num_batches_tracked) == 1


def test_microbatch_batchrenorm_normalises_each_group_against_the_step_start_buffers(accuracy):
    # Every group's r and d read the running statistics as they were at the start of the step;
    # the buffers end as after one update per group; the schedule counter advances by one.
    torch.manual_seed(1)
    c, group = 6, 4
    layer = brn.BatchRenorm1d(c, momentum=0.05, r_max=3.0, d_max=5.0, warmup_steps=0,
                              r_max_ramp_steps=0, d_max_ramp_steps=0)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    start = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(32, c, 9) * 2 + 0.5
    y = accuracy.tasks.MicroBatch(layer, group)(x)

    expected, rm, rv = [], start["running_mean"].clone(), start["running_var"].clone()
    for chunk in x.split(group):
        m0, v0 = start["running_mean"].clone(), start["running_var"].clone()
        expected.append(brn.batch_renorm(chunk, m0, v0, start["weight"], start["bias"], True,
                                         0.05, layer.eps, 3.0, 5.0))
        rm = 0.95 * rm + (m0 - 0.95 * start["running_mean"])  # m0 = 0.95*start + 0.05*mean_k
        rv = 0.95 * rv + (v0 - 0.95 * start["running_var"])
    tol = _tol()
    torch.testing.assert_close(y, torch.cat(expected), **tol)
    torch.testing.assert_close(layer.running_mean, rm, **tol)
    torch.testing.assert_close(layer.running_var, rv, **tol)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("classes_per_batch", [16, 4, 2])
def test_noniid_batches_hold_k_classes_of_equal_count(accuracy, classes_per_batch):
    labels = torch.arange(100).repeat(20).numpy()
    idx = accuracy.tasks.batch_indices(labels, 50, seed=0, classes_per_batch=classes_per_batch)
    assert idx.shape == (50, 32)
    for row in idx:
        classes, counts = torch.unique(torch.as_tensor(labels[row]), return_counts=True)
        assert len(classes) == classes_per_batch
        assert counts.tolist() == [32 // classes_per_batch] * classes_per_batch
    with pytest.raises(ValueError, match="classes_per_batch"):
        accuracy.tasks.batch_indices(labels, 5, seed=0, classes_per_batch=5)


def test_iid_batches_draw_each_epoch_without_replacement(accuracy):
    labels = torch.arange(10).repeat(40).numpy()
    iid = accuracy.tasks.batch_indices(labels, 30, seed=0)
    assert len(set(iid[:12].ravel().tolist())) == 12 * 32


@pytest.mark.parametrize("loader", ["make_signals", "make_tabular"])
def test_the_tasks_have_100_classes_and_are_reproducible(accuracy, loader):
    make = getattr(accuracy.tasks, loader)
    x_tr, y_tr, x_te, y_te = make()
    assert torch.unique(y_tr).numel() == 100 and torch.unique(y_te).numel() == 100
    assert torch.bincount(y_tr).min() == torch.bincount(y_tr).max()  # balanced classes
    assert x_tr.dtype == torch.float32 and torch.isfinite(x_tr).all()
    # Standardised with the training set's statistics.
    assert abs(float(x_tr.mean())) < 1e-3 and abs(float(x_tr.std()) - 1.0) < 0.05
    again = make()
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)


@pytest.mark.parametrize("dataset,setting", [("signals100", "micro2"),
                                             ("tabular100", "classes4x8")])
@pytest.mark.parametrize("layer", ["bn", "brn"])
def test_models_are_deep_and_differ_only_in_the_norm_layer(accuracy, dataset, setting, layer):
    torch.manual_seed(0)
    model = accuracy.make_model(dataset, layer, setting, steps=100)
    assert accuracy.tasks.count_norm_layers(model) >= 8
    torch.manual_seed(0)
    other = accuracy.make_model(dataset, "brn" if layer == "bn" else "bn", setting, steps=100)
    a = {k: v for k, v in model.state_dict().items() if "running" not in k and "num_" not in k}
    b = {k: v for k, v in other.state_dict().items() if "running" not in k and "num_" not in k}
    assert a.keys() == b.keys()
    for k in a:  # same initial weights: the seed, not the layer, decides them
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_smoke_run_writes_the_schema(accuracy, tmp_path):
    out = accuracy.main(["--smoke", "--out-dir", str(tmp_path), "--jobs", "1", "--quiet"])
    with open(tmp_path / "accuracy.json") as f:
        table = json.load(f)
    assert set(table) == {"signals100", "tabular100"}
    assert set(table["signals100"]) == {"iid", "micro4", "micro2", "classes4x8"}
    assert set(table["tabular100"]) == {"iid", "classes16x2", "classes4x8", "micro8"}
    for dataset, rows in table.items():
        assert sum("iid" in s for s in rows) == 1  # exactly one i.i.d. control per data set
        for setting, cell in rows.items():
            assert set(cell) == set(accuracy.VARIANTS)
            for layer, accs in cell.items():
                assert len(accs) == 1
                assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs)
    with open(tmp_path / "accuracy_curves.json") as f:
        curves = json.load(f)
    assert curves["meta"]["smoke"] is True
    for field in ("batch_stats_iid", "batch_stats_setting", "train_acc"):
        assert set(curves[field]) == set(table)
    node = curves["curves"]["signals100"]["micro2"]["brn"]
    assert node["steps"][-1] == 20 and len(node["acc"][0]) == len(node["steps"])
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    md = (tmp_path / "accuracy.md").read_text()
    assert "| setting | BatchNorm | Batch Renorm |" in md and "share of the loss" in md
    assert out["table"] == table


def test_a_candidate_equal_to_the_defaults_is_the_same_run(accuracy, tmp_path):
    """brn is run once under the modules' defaults; the candidate with the same configuration is
    reported with the same numbers, and --report-only after a change of default maps brn to
    the run that now has the defaults (no retraining)."""
    out = accuracy.main(["--smoke", "--out-dir", str(tmp_path), "--jobs", "1", "--quiet",
                         "--datasets", "tabular100", "--settings", "iid", "--no-plot"])
    meta, cell = out["meta"], out["table"]["tabular100"]["iid"]
    assert meta["variants"]["bn"]["momentum"] == 0.1  # nn.BatchNorm1d's own default
    alias = next(v for v in accuracy.CANDIDATES if meta["ran_as"][v] == "brn")
    assert cell[alias] == cell["brn"]
    other = next(v for v in accuracy.CANDIDATES if meta["ran_as"][v] != "brn")
    assert cell[other] != cell["brn"]  # a different configuration trains differently

    before = (tmp_path / "accuracy.md").read_text()
    accuracy.main(["--report-only", "--out-dir", str(tmp_path), "--quiet", "--no-plot"])
    assert (tmp_path / "accuracy.md").read_text() == before

    original = accuracy.VARIANTS["brn"]
    accuracy.VARIANTS["brn"] = dict(accuracy.VARIANTS[other])  # as if the defaults became it
    try:
        again = accuracy.main(["--report-only", "--out-dir", str(tmp_path), "--quiet",
                               "--no-plot"])
    finally:
        accuracy.VARIANTS["brn"] = original
    assert again["table"]["tabular100"]["iid"]["brn"] == cell[other]
    assert again["meta"]["ran_as"]["brn"] == "brn" and again["meta"]["ran_as"][other] == "brn"


@pytest.mark.parametrize("group", [None, 4])
def test_cumulative_start_averages_the_first_steps_then_decays(accuracy, group):
    """brn_cumstart's running average: the plain mean of the steps so far until 1 / momentum
    steps, then the exponential average at momentum (with or without the microbatch wrapper)."""
    norm = accuracy.tasks.NormFactory("brn", group, 0.25, dict(warmup_steps=100),
                                      cumulative_start=True)(3)
    layer = norm.layer if group else norm
    torch.manual_seed(0)
    batches = [torch.randn(8, 3) * 2 + k for k in range(6)]
    for x in batches:
        norm(x)
    means = torch.stack([x.mean(0) for x in batches])
    expected = means[:4].mean(0)  # t = 0..3: rates 1, 1/2, 1/3, 1/4 give the plain mean
    for m in means[4:]:
        expected = 0.75 * expected + 0.25 * m  # then momentum 0.25
    if group is None:
        torch.testing.assert_close(layer.running_mean, expected, **_tol())
    assert layer.momentum == 0.25 and int(layer.num_batches_tracked) == 6


def test_merge_adds_another_runs_candidates_as_if_run_together(accuracy, tmp_path):
    common = ["--smoke", "--jobs", "1", "--quiet", "--no-plot", "--datasets", "tabular100",
              "--settings", "iid"]
    both, first, second = (tmp_path / name for name in ("both", "first", "second"))
    together = accuracy.main(common + ["--out-dir", str(both), "--variants", "bn", "brn",
                                       "brn_cumstart"])
    accuracy.main(common + ["--out-dir", str(first), "--variants", "bn", "brn"])
    accuracy.main(common + ["--out-dir", str(second), "--variants", "bn", "brn",
                            "brn_cumstart"])
    merged = accuracy.main(["--report-only", "--out-dir", str(first), "--merge", str(second),
                            "--quiet", "--no-plot"])
    assert merged["table"] == together["table"]
    assert merged["meta"]["merged_from"] == ["second"]
    assert merged["meta"]["variants"]["brn_cumstart"]["cumulative_start"] is True
    other = tmp_path / "other"
    accuracy.main(common + ["--out-dir", str(other), "--variants", "bn", "brn",
                            "brn_r_only", "--seeds", "1"])
    with pytest.raises(SystemExit, match="seeds differ"):
        accuracy.main(["--report-only", "--out-dir", str(first), "--merge", str(other),
                       "--quiet", "--no-plot"])


def test_the_rule_passes_and_fails(accuracy):
    report = accuracy.accuracy_report
    # BatchNorm: 80 i.i.d., 70 with microbatches (a 10-point loss to recover).
    table = {"d": {"iid": {"bn": [0.80, 0.80], "brn_a": [0.799, 0.797], "brn_b": [0.78, 0.78]},
                   "micro4": {"bn": [0.70, 0.70], "brn_a": [0.72, 0.72], "brn_b": [0.77, 0.77]}}}
    a, b = report.rule_checks(table, "brn_a"), report.rule_checks(table, "brn_b")
    assert [k["kind"] for k in a] == ["no regret", "recovery"]
    assert [k["passed"] for k in a] == [True, False]  # 0.2 below is fine; 20 % recovered is not
    assert [k["passed"] for k in b] == [False, True]  # 2 points below; 70 % recovered
    verdict = report.decide(table, ["brn_a", "brn_b"])
    assert not verdict["rule_met"]
    table["d"]["iid"]["brn_b"] = [0.81, 0.79]  # now inside BatchNorm's spread
    verdict = report.decide(table, ["brn_a", "brn_b"])
    assert verdict["rule_met"] and verdict["choice"] == "brn_b"
