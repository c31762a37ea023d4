"""What only the fused CPU kernels have: their chunk and block boundaries, and threads
(determinism across thread counts, at::parallel_for really forking). Every case the backends
share runs in test_fused_kernels.py, on the CPU too."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch


from conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels

ops = torch.ops.batchrenorm

import fused_cases  # noqa: E402 - after the marks, a sibling module of tests/
from fused_cases import train_step as _step  # noqa: E402

DEV = "cpu"


def _State(C, dtype, affine=True, running=True, step=True):
    return fused_cases.State(C, dtype, DEV, affine, running, step)


def _compare_steps(shape, kind, dtype, **kwargs):
    return fused_cases.compare_steps(shape, kind, dtype, DEV, **kwargs)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_large_inputs_cross_chunk_and_block_boundaries(kind):
    # Enough values per channel for several chunks and work items per channel.
    _compare_steps((3, 3, 150, 160), kind, torch.float32, steps=2)
    _compare_steps((2, 130, 30, 41), kind, torch.float32, steps=2)


@pytest.mark.parametrize("shape,fmt", [((2, 3, 200, 200), torch.contiguous_format),
                                       ((8, 64, 20, 20), torch.channels_last),
                                       ((4, 256, 9, 9), torch.contiguous_format)])
def test_deterministic_with_threads(shape, fmt):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        assert torch.get_num_threads() > 1
        x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt)
        g = torch.randn(shape).contiguous(memory_format=fmt)
        base = _State(shape[1], torch.float32)
        runs = []
        for _ in range(2):
            state = base.clone()
            y, grads = _step(state, x, g, "fused")
            runs.append((y, *grads, state.running_mean, state.running_var))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


# 2-pass and fused backward; more channels than the forward's per-channel loop takes a thread.
@pytest.mark.parametrize("shape", [(2, 3, 300, 200), (8, 16, 20, 20), (2, 1100, 3, 3)])
def test_thread_count_does_not_change_results(shape):
    # The reductions' work partition has fixed sizes: one thread or two give the same bits.
    x = torch.randn(shape) * 3 + 1
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    base = _State(shape[1], torch.float32)
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            state = base.clone()
            y, grads = _step(state, x, g, "fused")
            runs.append((y, *grads, state.running_mean, state.running_var))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_parallel_for_runs_on_worker_threads():
    # The extension is built with -fopenmp so that at::parallel_for really forks; were it not,
    # the ops would run on the calling thread alone. A fresh process: no OpenMP pool exists
    # until the first parallel region, which is our op's.
    code = textwrap.dedent("""
        import os, torch, batchrenorm_cuda
        torch.set_num_threads(2)
        x = torch.randn(4, 64, 56, 56)
        before = len(os.listdir('/proc/self/task'))
        torch.ops.batchrenorm.batch_stats(x)
        print(before, len(os.listdir('/proc/self/task')))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after = int(out[-2]), int(out[-1])
    assert after > before, f"at::parallel_for started no worker thread ({before} -> {after})"


@requires_cpu_kernels
def test_counter_advances_only_with_running_statistics():
    """num_batches_tracked is incremented with the running buffers, as in the reference and the
    CUDA kernels; without buffers it only selects the schedule's bounds."""
    x = torch.randn(4, 3, 5)
    step = torch.tensor(7)
    torch.ops.batchrenorm.forward_train(x, None, None, None, None, step, 0.1, 1e-5, 3.0, 5.0,
                                        0, 0, 0)
    assert step.item() == 7
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.ops.batchrenorm.forward_train(x, None, None, rm, rv, step, 0.1, 1e-5, 3.0, 5.0, 0, 0, 0)
    assert step.item() == 8
