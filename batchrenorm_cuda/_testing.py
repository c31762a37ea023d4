"""Test-only helpers (private: not part of the API). Shapes, dtypes and tolerances shared by the
tests and the benchmarks (one source of truth), and the op-namespace switch of the emulated runs."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

from .reference import stat_dtype

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Fused kernel vs reference. Both compute statistics in float32 (float64), so the
# differences are summation order and, for half types, the final rounding of the output
# (one ulp: 2^-8 for bf16, 2^-11 for fp16, relative).
TOLERANCES: Dict[torch.dtype, Dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# ResNet-50's BatchNorm layers: (C, H*W) as (C, H, W).
RESNET50_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
    (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7),
)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
# Reinforcement-learning critics' activations (CrossQ): (N, C) rows.
RL_SHAPES: Tuple[Tuple[int, int], ...] = tuple((n, c) for n in (256, 512) for c in (64, 256, 2048))

# The CUDA kernels' memory-traffic rule (issue 19), checked on the emulated H100 by
# tests/test_cuda_traffic.py and reported by benchmarks/gpu_model.py. When an op's tensors fit
# in half of the device's on-chip storage (registers and shared memory of all SMs), a single
# launch can keep them on chip, so it reads each input tensor once and writes each output once:
# the counted bytes may exceed the tensors' by TRAFFIC_SLACK (tile edges, a few shared reads),
# plus PER_CHANNEL_VECTORS float vectors of length C (weight, bias, the running statistics,
# the saved statistics and r, d, their updates, and a per-channel workspace round trip).
TRAFFIC_SLACK = 0.05
PER_CHANNEL_VECTORS = 16


def on_chip_bytes(device: Dict[str, int]) -> int:
    """Registers and shared memory over all SMs of a device (the CUDA emulator's
    device_properties(): an H100 has 132 x (256 KiB + 228 KiB) = 63.9 MB)."""
    return device["sms"] * (4 * device["registers_per_sm"] + device["shared_per_sm"])


def fits_on_chip(tensor_bytes: int, device: Dict[str, int]) -> bool:
    """Whether tensors of `tensor_bytes` together fit in half the device's on-chip storage."""
    return 2 * tensor_bytes <= on_chip_bytes(device)


def traffic_limit(tensor_bytes: int, channels: int, stat_bytes: int = 4) -> float:
    """The most global-memory bytes an op may read (write) to move `tensor_bytes` of tensors
    once, under the rule above."""
    return (1 + TRAFFIC_SLACK) * tensor_bytes + PER_CHANNEL_VECTORS * channels * stat_bytes


# batchrenorm.h's kWellCentredBound: a training backward takes the saved mean at its word for
# channels with |mean * invstd| <= this, and recovers the batch's exact mean elsewhere.
WELL_CENTRED_BOUND = 16.0


def backward_centre(mean: torch.Tensor, invstd: torch.Tensor,
                    batch_mean: torch.Tensor) -> torch.Tensor:
    """The per-channel centre of xhat in a training backward given `mean` and `invstd` (the
    kernels' rule, batchrenorm.h well_centred; NaN is not well centred)."""
    z = mean.double() * invstd.double()
    recover = ~(z.abs() <= WELL_CENTRED_BOUND)
    return torch.where(recover, batch_mean, mean.to(batch_mean.dtype))


def tolerance(dtype: torch.dtype) -> Dict[str, float]:
    """Outputs and input gradients of an input of `dtype`."""
    return TOLERANCES[dtype]


def grad_tolerance(dtype: torch.dtype, m: int) -> Dict[str, float]:
    """grad_weight and grad_bias: sums over the m values of a channel, whose rounding error
    grows like sqrt(m) (a random walk), with 4x headroom."""
    tol = TOLERANCES[dtype]
    return dict(atol=tol["atol"] * 4 * max(m, 1) ** 0.5, rtol=tol["rtol"] * 4)


def buffer_tolerance(dtype: torch.dtype) -> Dict[str, float]:
    """running_mean and running_var (float32, or float64 for float64 input): one moving-average
    update of statistics accumulated in that precision."""
    tight = 1e-12 if stat_dtype(dtype) == torch.float64 else 1e-5
    return dict(atol=tight, rtol=tight)


def mismatch(got: torch.Tensor, want: torch.Tensor, **tol: float) -> Optional[str]:
    """torch.testing.assert_close's verdict as a message, or None when they agree (NaN where
    NaN is expected counts as agreement): for campaigns that collect every failure."""
    try:
        torch.testing.assert_close(got.double(), want.double(), equal_nan=True, **tol)
    except AssertionError as error:
        return " ".join(str(error).split())
    return None


def make_params(channels: int, input_dtype: torch.dtype, device="cpu",
                generator: Optional[torch.Generator] = None):
    """Random weight, bias, running_mean, running_var of the dtype the contract asks for."""
    sdt = stat_dtype(input_dtype)

    def rand(*shape):
        values = torch.rand(*shape, generator=generator, dtype=torch.float64)
        return values.to(device=device, dtype=sdt)

    weight = rand(channels) + 0.5
    bias = rand(channels) - 0.5
    running_mean = rand(channels) - 0.5
    running_var = rand(channels) + 0.5
    return weight, bias, running_mean, running_var


@contextlib.contextmanager
def fused_ops_namespace(namespace: str):
    """Within the block, the fused path (batch_renorm(backend="fused"), the modules) calls the
    ops of torch.ops.<namespace> instead of torch.ops.batchrenorm: a library registering the
    same schemas for CPU tensors, such as the CUDA emulation of the tests."""
    from . import _ops

    previous = _ops.OPS
    _ops.OPS = getattr(torch.ops, namespace)
    try:
        yield _ops.OPS
    finally:
        _ops.OPS = previous
