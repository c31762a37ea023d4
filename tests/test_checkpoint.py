"""Checkpoints: the schedule's hyperparameters travel with the state_dict, and training resumed
in a fresh process from a mid-schedule checkpoint is bit-identical to the uninterrupted run
(BatchRenorm2d in one process, SyncBatchRenorm over 2 gloo processes)."""
import io
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import batchrenorm_cuda as brn

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEDULE = dict(r_max=2.0, d_max=1.0, warmup_steps=100, r_max_ramp_steps=10, d_max_ramp_steps=5)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only (the default): the metadata must pass it


def test_schedule_is_restored_from_the_checkpoint():
    # The case: a model built with other defaults and loaded at step 102 used (1, 0)
    # where the checkpoint's model used its ramped bounds.
    trained = brn.BatchRenorm2d(4, **SCHEDULE)
    trained.num_batches_tracked.fill_(102)
    fresh = brn.BatchRenorm2d(4)
    with pytest.warns(UserWarning, match=r"replaces the constructor's: r_max 3.0 -> 2.0"):
        fresh.load_state_dict(_roundtrip(trained.state_dict()))
    assert {k: getattr(fresh, k) for k in SCHEDULE} == SCHEDULE
    assert fresh.clip_bounds() == trained.clip_bounds() == (1.2, 0.4)


def test_same_schedule_loads_silently():
    a, b = brn.BatchRenorm2d(4, **SCHEDULE), brn.BatchRenorm2d(4, **SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.load_state_dict(_roundtrip(a.state_dict()))


def test_checkpoints_without_the_schedule_still_load():
    # Older checkpoints, nn.BatchNorm's, and plain dict copies (which drop the metadata) keep
    # the constructor's schedule; the keys are nn.BatchNorm's, both ways, strictly.
    layer = brn.BatchRenorm2d(4, **SCHEDULE)
    for state in (nn.BatchNorm2d(4).state_dict(), dict(brn.BatchRenorm2d(4).state_dict())):
        layer.load_state_dict(state)
        assert {k: getattr(layer, k) for k in SCHEDULE} == SCHEDULE
    nn.BatchNorm2d(4).load_state_dict(_roundtrip(layer.state_dict()))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), brn.BatchRenorm2d(4, **SCHEDULE))
    other = nn.Sequential(nn.Conv2d(3, 4, 1), brn.BatchRenorm2d(4))
    with pytest.warns(UserWarning, match="'1'"):  # named by its place in the model
        other.load_state_dict(_roundtrip(model.state_dict()))
    assert other[1].warmup_steps == 100


def test_an_invalid_schedule_in_a_checkpoint_is_an_error():
    state = brn.BatchRenorm2d(4).state_dict()
    state._metadata[""]["batchrenorm_schedule"]["r_max"] = 0.5
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        brn.BatchRenorm2d(4).load_state_dict(state)
    state._metadata[""]["batchrenorm_schedule"] = dict(r_max=2.0)
    with pytest.raises(ValueError, match="must be a dict with keys"):
        brn.BatchRenorm2d(4).load_state_dict(state)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, outdir, world):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "checkpoint_worker.py"), mode,
                               str(outdir), "--rank", str(r), "--world", str(world),
                               "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-4000:]


def _assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.parametrize("world", [1, 2], ids=["BatchRenorm2d", "SyncBatchRenorm_2_gloo"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, world):
    if world == 1 and not brn.extension_available("cpu"):
        pytest.skip("needs the compiled CPU kernels")
    _run("train", tmp_path, world)
    _run("resume", tmp_path, world)
    for rank in range(world):
        full = torch.load(tmp_path / f"train_rank{rank}.pt")
        resumed = torch.load(tmp_path / f"resume_rank{rank}.pt")
        _assert_identical(resumed, full, f"rank {rank}")
        # Mid-schedule at the checkpoint, past both ramps' start by the end.
        assert all(b[0] > 1.0 and b[1] > 0.0 for b in full["bounds"])
