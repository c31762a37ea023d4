"""The pure-PyTorch Batch Renormalization: the fallback when the extension is missing, and the
oracle every fused kernel is tested against.

Written as plainly as the math (Ioffe 2017, Algorithm 1); autograd flows through ordinary ops,
with r and d detached. Statistics are computed in float32 (float64 for float64 input) whatever
the input dtype, and the output is cast back to the input's dtype.

The clip-bound schedule and the running-average factor mirror csrc/batchrenorm.h op for op, in
float64, so that the fused kernels and this file agree on the bounds bit for bit.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

Bound = Union[float, Tensor]


def stat_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics, parameters and buffers for an input dtype."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def ramp_fraction(step: Tensor, warmup_steps: int, ramp_steps: int) -> Tensor:
    """0 during warm-up, then a linear ramp reaching 1 after ramp_steps (at once if 0)."""
    t = step.to(torch.float64) - warmup_steps
    if ramp_steps <= 0:
        return (t >= 0).to(torch.float64)
    return (t / ramp_steps).clamp(0.0, 1.0)


def clip_bounds(
    step: Optional[Tensor],
    r_max: float,
    d_max: float,
    warmup_steps: int = 0,
    r_max_ramp_steps: int = 0,
    d_max_ramp_steps: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Bound, Bound]:
    """(r_max, d_max) for a training step, given num_batches_tracked before it.

    Computed in float64 and returned as `dtype` tensors (the statistics dtype) on step's device,
    with no host synchronisation; the final bounds as floats when step is None.
    """
    if step is None:
        return float(r_max), float(d_max)
    fr = ramp_fraction(step, warmup_steps, r_max_ramp_steps)
    fd = ramp_fraction(step, warmup_steps, d_max_ramp_steps)
    # Exactly (1, 0) before a ramp starts, also for r_max or d_max = inf (inf * 0 is NaN).
    return (torch.where(fr == 0, 1.0, 1.0 + (r_max - 1.0) * fr).to(dtype),
            torch.where(fd == 0, 0.0, d_max * fd).to(dtype))


def batch_sigma(mean: Tensor, var: Tensor, count: int, eps: float) -> Tensor:
    """sigma_B = sqrt(var_B + eps), with the non-finite policy of csrc/batchrenorm.h
    (finite_stats): statistics are usable when the mean and M2 = var * count are finite in the
    statistics dtype; otherwise the channel's sigma_B, and so its output and gradients, are NaN
    (an infinite sigma_B would give a finite, constant output)."""
    usable = torch.isfinite(mean.detach()) & torch.isfinite(var.detach() * count)
    return torch.where(usable, torch.sqrt(var + eps), float("nan"))


def corrections(sigma_b: Tensor, mean_offset: Tensor, running_var: Tensor, eps: float,
                r_max: Bound, d_max: Bound) -> Tuple[Tensor, Tensor]:
    """(r, d) from sigma_B and mu_B - running_mean, against the buffers before this step's
    update; constants for autograd."""
    # detach(), not a no_grad decorator: under torch.compile the decorator's wrapper is one
    # more function guarded on every compiled step.
    sigma = torch.sqrt(running_var + eps)
    return (torch.clamp(sigma_b.detach() / sigma, 1.0 / r_max, r_max),
            torch.clamp(mean_offset.detach() / sigma, -d_max, d_max))


def scale_shift(mean: Tensor, invstd: Tensor, r: Tensor, d: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per channel, y = x * scale + shift = weight * ((x - mean) * invstd * r + d) + bias: the
    training output as one affine map (SyncBatchRenorm's normalize, the compiled forward)."""
    scale = invstd * r
    shift = d - mean * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    return scale, shift


def apply_scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x * scale + shift per channel, computed in scale's dtype, returned in x's."""
    shape = channel_shape(x)
    return (x.to(scale.dtype) * scale.view(shape) + shift.view(shape)).to(x.dtype)


def channel_shape(x: Tensor) -> Tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def reduce_dims(x: Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape) -> Tensor:
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def batch_renorm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.01,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    num_batches_tracked: Optional[Tensor] = None,
    warmup_steps: int = 0,
    r_max_ramp_steps: int = 0,
    d_max_ramp_steps: int = 0,
) -> Tensor:
    """Batch Renorm forward with the semantics of the `batchrenorm::forward_*` ops.

    Training updates running_mean, running_var and num_batches_tracked in place (when given).
    Without running statistics, training (and eval) normalise with the batch's statistics and
    r = 1, d = 0. Arguments are not validated here: batchrenorm_cuda.batch_renorm does that.
    """
    sdt = stat_dtype(input.dtype)
    shape = channel_shape(input)
    x = input.to(sdt)

    if not training:
        invstd = torch.rsqrt(running_var + eps)
        y = (x - running_mean.view(shape)) * invstd.view(shape)
        return _affine(y, weight, bias, shape).to(input.dtype)

    dims = reduce_dims(input)
    mean = x.mean(dims)
    # mean(x - mean) is the rounding residue of `mean` (1e-4 near 3000 in float32): a large part
    # of sigma_B when |mean| >> std. It is 0 in exact arithmetic, so it carries no gradient.
    centred = x - mean.view(shape)
    residue = centred.detach().mean(dims)
    xc = centred - residue.view(shape)
    # The variance from the corrected centred values, not x.var(): autograd through x.var()
    # differentiates x - mean with the rounded mean, and dx loses the residue (25% off at mean
    # 1e4, std 1e-2 in float32).
    var = (xc * xc).mean(dims)
    count = input.numel() // input.shape[1]
    sigma_b = batch_sigma(mean, var, count, eps)
    y = xc / sigma_b.view(shape)

    if running_mean is not None:
        bounds = clip_bounds(num_batches_tracked, r_max, d_max, warmup_steps, r_max_ramp_steps,
                             d_max_ramp_steps, sdt)
        r, d = corrections(sigma_b.detach(), (mean.detach() - running_mean) + residue,
                           running_var, eps, *bounds)
        y = y * r.view(shape) + d.view(shape)
        update_running(mean.detach(), var.detach(), count, running_mean, running_var,
                        num_batches_tracked, momentum)
    return _affine(y, weight, bias, shape).to(input.dtype)


def update_running(mean, var, count, running_mean, running_var, num_batches_tracked, momentum):
    """The running buffers' in-place update from the batch's mean and (biased) var, as
    nn.BatchNorm's; the buffers do not require grad (the checks say so), and the statistics are
    detached here (corrections says why not with a decorator)."""
    mean, var = mean.detach(), var.detach()
    if momentum is None:
        # Cumulative average, as nn.BatchNorm's momentum=None: factor 1 / (steps so far + 1).
        factor = 1.0 / (num_batches_tracked.to(torch.float64) + 1.0)
        factor = factor.to(mean.dtype)
    else:
        factor = momentum
    # count / (count - 1) first: var * count would overflow before the division.
    unbiased = var * (count / (count - 1))
    new_mean = (1 - factor) * running_mean + factor * mean
    new_var = (1 - factor) * running_var + factor * unbiased
    # A channel keeps its buffers when its statistics or its update are not finite
    # (update_running in csrc/batchrenorm.h).
    finite = (torch.isfinite(mean) & torch.isfinite(var * count) & torch.isfinite(new_mean)
              & torch.isfinite(new_var))
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
