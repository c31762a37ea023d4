"""The training forward as torch.compile traces it: the statistics, r, d, the buffer update and
the normalisation as aten ops, and the gradient from our fused `backward` kernel.

Why: Inductor decomposes nn.BatchNorm into aten ops, and its partitioner then recomputes the
normalisation and whatever follows it (a ReLU) in the backward graph from the saved convolution
output. An opaque `forward_train` that updates buffers in place cannot be recomputed, so the
partitioner saves ReLU's mask instead, which Inductor's CPU code writes and reads slowly: whole
compiled CNNs took 1.26-1.33x compiled BatchNorm's step (benchmarks/NOTES.md, issue 22). Traced
as aten ops, the forward fuses with its neighbours as BatchNorm's does, and the backward, where
our kernel beats the generated one, stays ours.

Every formula is reference.py's (batch_sigma, corrections, update_running, the schedule), so
this path and the oracle agree by construction; only the statistics come from Inductor's
var_mean (Welford) rather than our kernels' (tests compare both to the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from .reference import (apply_scale_shift, batch_sigma, clip_bounds_as, corrections,
                        reduce_dims, scale_shift, stat_dtype, update_running)


class _Renormalize(torch.autograd.Function):
    """y = weight * ((x - mean) * invstd * r + d) + bias, with BatchNorm's gradient through the
    batch statistics: mean, invstd, r and d come in as constants, and the fused backward kernel
    differentiates mean and invstd as functions of x itself (train=True)."""

    @staticmethod
    def forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, r: Tensor, d: Tensor) -> Tensor:
        return apply_scale_shift(input, *scale_shift(mean, invstd, r, d, weight, bias))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias, mean, invstd, r, d = inputs
        ctx.save_for_backward(input, weight, mean, invstd, r, d)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd, r, d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = _ops.OPS.backward(
            grad_output, input, weight, mean, invstd, r, d, True,
            [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2]])
        return grad_input, grad_weight, grad_bias, None, None, None, None


def forward_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                  r_max: float, d_max: float, warmup_steps: int, r_max_ramp_steps: int,
                  d_max_ramp_steps: int) -> Tensor:
    """batchrenorm::forward_train's output and buffer updates, for a non-empty input whose
    arguments the caller has checked."""
    sdt = stat_dtype(input.dtype)
    count = input.numel() // input.shape[1]
    with torch.no_grad():
        var, mean = torch.var_mean(input.to(sdt), reduce_dims(input), correction=0)
        sigma_b = batch_sigma(mean, var, count, eps)
        if running_mean is None:
            r, d = torch.ones_like(mean), torch.zeros_like(mean)
        else:
            bounds = clip_bounds_as(sdt, num_batches_tracked, r_max, d_max, warmup_steps,
                                    r_max_ramp_steps, d_max_ramp_steps)
            r, d = corrections(sigma_b, mean - running_mean, running_var, eps, *bounds)
            # The counter too: it advances with the running statistics, as in the kernels.
            update_running(mean, var, count, running_mean, running_var, num_batches_tracked,
                           momentum)
    return _Renormalize.apply(input, weight, bias, mean, 1.0 / sigma_b, r, d)

