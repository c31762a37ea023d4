"""The work the CUDA kernels do, counted on the emulated H100 (issue 19): launches per op, and
the global memory each op reads and writes where its tensors fit on chip
(batchrenorm_cuda._testing: fits_on_chip, traffic_limit: the rule, written once, that
benchmarks/gpu_model.py reports too).

Every case runs under the in-order schedule only (the other emulated tests cover the schedules).
`make test` runs a representative subset, the cases up to SUBSET_ELEMENTS elements;
BRN_TRAFFIC_ALL=1 runs every ResNet-50 shape at N <= 8 and every RL shape;
benchmarks/gpu_model.py counts all of them and N up to 32.
"""
import json
import os

import pytest
import torch

from batchrenorm_cuda._testing import (RESNET50_SHAPES, RL_SHAPES, fits_on_chip, on_chip_bytes,
                                      traffic_limit)

import cuda_emulation

pytestmark = pytest.mark.cuda_emulation

DTYPES = (torch.float32, torch.bfloat16)
# Each (shape, layout): ResNet-50's BN layers at the small per-GPU batches of issue 19, both
# layouts; the RL critics' (N, C) activations, read as rows.
CASES = [((n, *chw), layout) for chw in RESNET50_SHAPES for n in (1, 2, 4, 8)
         for layout in ("contiguous", "channels_last")] + [(s, "rows") for s in RL_SHAPES]
# The subset of make test: 43 of the 78 cases (86 tests), about 70 s of CPU time for the
# 3-phase kernels (all of them: about 200 s, too much for make test's budget).
SUBSET_ELEMENTS = 1 << 19


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _selected():
    if os.environ.get("BRN_TRAFFIC_ALL", "0") == "1":
        return CASES
    return [c for c in CASES if _numel(c[0]) <= SUBSET_ELEMENTS]


def _id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + "-" + layout


@pytest.fixture
def h100(cuda_emulation):
    cuda_emulation.set_device_h100()
    yield cuda_emulation
    cuda_emulation.set_device(16, 2)


def _describe(records):
    return "; ".join(f"{r['kernel']} grid {r['grid'][0]} cooperative {r['cooperative']} "
                     f"syncs {r['grid_syncs']} read {r['bytes_read']} written {r['bytes_written']}"
                     for r in records)


def _check_op(op, records, read_bytes, written_bytes, channels, fits):
    """One launch; and, when the tensors fit on chip, each read and written once."""
    assert len(records) == 1, f"{op}: {len(records)} launches, expected 1: {_describe(records)}"
    (r,) = records
    assert r["ok"], f"{op}: the launch failed: {_describe(records)}"
    if not fits:
        return
    read, written = r["bytes_read"], r["bytes_written"]
    assert read <= traffic_limit(read_bytes, channels), (
        f"{op}: read {read} bytes = {read / read_bytes:.2f} x the {read_bytes} bytes of its "
        f"input tensors, expected at most {traffic_limit(read_bytes, channels):.0f} "
        f"(each read once): {_describe(records)}")
    assert written <= traffic_limit(written_bytes, channels), (
        f"{op}: wrote {written} bytes = {written / written_bytes:.2f} x the {written_bytes} "
        f"bytes of its output, expected at most {traffic_limit(written_bytes, channels):.0f} "
        f"(written once): {_describe(records)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", _selected(), ids=_id)
def test_one_launch_per_op_and_each_tensor_moved_once(h100, case, dtype):
    shape, layout = case
    counted = cuda_emulation.count_train_step(h100, shape, layout, dtype)
    device = h100.device_properties()
    nbytes, C = counted["tensor_bytes"], counted["channels"]
    # forward_train: reads x, writes y.
    _check_op("forward_train", counted["forward_train"], nbytes, nbytes, C,
              fits_on_chip(nbytes, device))
    # backward: reads x and dy, writes dx (the two together must fit).
    _check_op("backward", counted["backward"], 2 * nbytes, nbytes, C,
              fits_on_chip(2 * nbytes, device))
    # backward_relu: reads x, dy and the ReLU output, writes dx; it keeps what backward keeps
    # on chip (the masked dy and x), so it must fit where backward does.
    _check_op("backward_relu", counted["backward_relu"], 3 * nbytes, nbytes, C,
              fits_on_chip(2 * nbytes, device))


def test_the_on_chip_rule_on_the_h100(h100):
    # 132 SMs x (64K 4-byte registers + 228 KiB shared memory).
    assert on_chip_bytes(h100.device_properties()) == 132 * (256 + 228) * 1024
    # ResNet-50's largest layer at N = 8 in fp32 (25.7 MB) fits; at N = 16 it does not.
    assert fits_on_chip(8 * 64 * 112 * 112 * 4, h100.device_properties())
    assert not fits_on_chip(16 * 64 * 112 * 112 * 4, h100.device_properties())


def test_the_eval_op_reads_x_once_and_writes_y_once(h100):
    # An elementwise launch on a tensor whose per-CTA coefficient table is small next to it.
    x = torch.randn(8, 4, 32, 32)
    weight, bias = torch.rand(4) + 0.5, torch.rand(4)
    mean, var = torch.rand(4), torch.rand(4) + 0.5
    with cuda_emulation.launch_log(h100) as records:
        y = torch.ops.batchrenorm_emulated_cuda.forward_eval(x, weight, bias, mean, var, 1e-5)
    _check_op("forward_eval", records, x.nbytes, y.nbytes, 4, True)
    assert records[0]["bytes_read"] >= x.nbytes and records[0]["bytes_written"] >= y.nbytes
    assert records[0]["op"] == "batchrenorm::forward_eval"
    assert records[0]["kernel"].startswith("elementwise_kernel<float")


def test_the_log_counts_bytes_per_cta_and_grid_syncs_exactly(h100):
    # selftest_kernels.cu's count_traffic: per CTA 8448 bytes read (a repeat since the last
    # barrier once, however far apart; again after it), 128 written; grid_sync: one grid.sync()
    # of 2 CTAs.
    out = torch.empty(2176)
    h100.reset_launch_log()
    assert h100.run_selftest("count_traffic", out) == ""
    assert h100.run_selftest("grid_sync", out) == ""
    traffic, sync = h100.launch_log()
    assert (traffic["kernel"], traffic["ctas"], traffic["bytes_read"], traffic["bytes_written"],
            traffic["max_cta_bytes"], traffic["grid_syncs"], traffic["cooperative"]) == (
        "count_traffic", 2, 2 * 8448, 256, 8448 + 128, 0, False), traffic
    assert (sync["kernel"], sync["grid_syncs"], sync["cooperative"], sync["seed"]) == (
        "grid_sync_kernel", 1, True, 0), sync


def test_every_schedule_of_a_launch_is_logged_under_its_seed(h100):
    x = torch.randn(2, 8, 16, 16)
    with cuda_emulation.random_schedules(h100, [5]):
        h100.reset_launch_log()
        torch.ops.batchrenorm_emulated_cuda.batch_stats(x)
        log = h100.launch_log()
    assert [r["seed"] for r in log] == [0, 5]
    assert log[0]["bytes_read"] == log[1]["bytes_read"] >= x.nbytes
    assert log[0]["op"] == "batchrenorm::batch_stats"


def test_the_h100_attributes_and_occupancy(h100):
    props = h100.device_properties()
    assert (props["sms"], props["registers_per_sm"], props["shared_per_sm"],
            props["shared_per_block_optin"], props["max_threads_per_sm"],
            props["max_ctas_per_sm"], props["l2_bytes"]) == (
        132, 65536, 228 * 1024, 227 * 1024, 2048, 32, 50 * 1024 * 1024)
    with pytest.raises(ValueError, match="shared_per_block_optin"):
        h100.set_device_properties(shared_per_block_optin=300 * 1024, shared_per_sm=400 * 1024)
    # 256 threads at 128 registers: 2 CTAs per SM (the register file), 100 KiB of dynamic
    # shared memory on top of the assumed 16 KiB static: 1; 1024 threads do not fit at all.
    assert h100.occupancy(256) == 2
    assert h100.occupancy(256, 40 * 1024) == 2
    assert h100.occupancy(1024) == 0
    h100.set_device_properties(assumed_registers_per_thread=32)
    assert h100.occupancy(256) == 8 and h100.occupancy(256, 48 * 1024) == 3


def test_dynamic_shared_memory_beyond_48_kib_needs_the_opt_in(h100):
    out = torch.empty(128)
    fault = h100.run_selftest("dynamic_shared_default", out)
    assert "102400 bytes of dynamic shared memory > the kernel's limit of 49152" in fault, fault
    assert h100.run_selftest("dynamic_shared_optin", out) == ""
    assert torch.equal(out[:32], torch.full((32,), 800.0))


def test_gpu_model_runs_end_to_end_and_writes_the_documented_record(h100, tmp_path,
                                                                    load_benchmark):
    gpu_model = load_benchmark("gpu_model.py")
    gpu_model.main(["--smoke", "--jobs", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_model_h100_smoke.json").read_text())
    assert len(rows) == 9 and {r["op"] for r in rows} == {"forward_train", "backward",
                                                          "backward_relu"}
    for r in rows:
        assert {"op", "shape", "layout", "dtype", "launches", "grid_syncs", "ctas", "bytes_read",
                "bytes_written", "tensor_bytes", "fits_on_chip", "modeled_us",
                "native_modeled_us", "floor_us"} <= set(r)
        assert r["bytes_read"] >= r["tensor_bytes"] and r["modeled_us"] > 0
        assert r["native_modeled_us"] > 0 and r["floor_us"] > 0
        # The JSON reprices to what it says (the calibration's path).
        assert gpu_model.price(r)[:2] == (r["modeled_us"], r["native_modeled_us"])
    assert "modelled, not measured" in (tmp_path / "gpu_model_h100_smoke.md").read_text()
    assert (tmp_path / "gpu_model_h100_smoke.png").stat().st_size > 10_000
