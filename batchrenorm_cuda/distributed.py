"""SyncBatchRenorm: Batch Renorm whose batch statistics span every process of a group.

As nn.SyncBatchNorm does for BatchNorm: in training, each rank reduces its own slice of the
batch to per-channel (count, mean, M2), ONE all_gather exchanges them, and every rank merges
the gathered partials in the same fixed rank order, so all ranks hold bit-identical global
statistics, r, d and running buffers. Each rank then normalises its own slice. Backward needs
ONE all_reduce of the per-channel [sum(dy), sum(dy * xhat)] so that dx is exact for the global
batch; grad_weight and grad_bias stay LOCAL sums (DistributedDataParallel sums them across
ranks, as it does for nn.SyncBatchNorm).

The O(N*C*spatial) passes use the fused `batchrenorm::batch_stats / normalize /
backward_reduce / backward_input` kernels of the input's device when they are built, else
plain PyTorch ops in the statistics dtype (float32, float64 for float64 input). The
O(world * C) merge, r, d and the buffer update are the same few tensor ops for both, written
with the formulas of reference.py (and csrc/batchrenorm.h): the clip bounds come from the
num_batches_tracked tensor, so a training step never reads a value back to the host.

Channel-count check: ranks whose layers disagree on C would call all_gather with different
sizes, which gloo answers with garbage on one rank and an abort on another, and NCCL with a
hang. So the first synchronised step of a layer (and again whenever its process group, world
size or statistics dtype changes) all_gathers a 2-element header [C, stats dtype] and raises
the same ValueError on every rank if they differ. That costs one extra tiny collective and a
host read once; steady-state steps make exactly one collective forward and one backward.
"""
from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops, reference
from ._ops import memory_format_of
from ._common import (check_buffers_given, check_input_dtype, check_per_channel, in_float32,
                      use_fused)
# The base class, as torch's nn.SyncBatchNorm derives from nn.modules.batchnorm._BatchNorm.
from .modules import _BatchRenorm
from .reference import channel_shape, reduce_dims, stat_dtype

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_STAT_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


# ---------------------------------------------------------------------------------------------
# The O(N*C*spatial) passes: fused kernels or their plain-PyTorch equivalents.

def _local_stats(x: Tensor, fused: bool) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((x - mean)^2) of this rank's slice, in the stats dtype."""
    if fused:
        return _ops.OPS.batch_stats(x)
    xs = x.to(stat_dtype(x.dtype))
    dims = reduce_dims(x)
    mean = xs.mean(dims)
    m2 = (xs - mean.view(channel_shape(x))).square().sum(dims)
    return mean, m2


def _normalize(x: Tensor, scale: Tensor, shift: Tensor, fused: bool) -> Tensor:
    if fused:
        return _ops.OPS.normalize(x, scale, shift)
    return reference.apply_scale_shift(x, scale, shift).contiguous(
        memory_format=memory_format_of(x))


def _backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                     fused: bool) -> Tuple[Tensor, Tensor]:
    if fused:
        return _ops.OPS.backward_reduce(dy, x, mean, invstd)
    shape, dims = channel_shape(x), reduce_dims(x)
    g = dy.to(mean.dtype)
    xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
    return g.sum(dims), (g * xhat).sum(dims)


def _backward_input(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor,
                    mean_dy: Tensor, mean_dy_xhat: Tensor, fused: bool) -> Tensor:
    if fused:
        return _ops.OPS.backward_input(dy, x, mean, invstd, scale, mean_dy, mean_dy_xhat)
    shape = channel_shape(x)
    g = dy.to(mean.dtype)
    xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
    dx = scale.view(shape) * (g - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape))
    return dx.to(x.dtype).contiguous(memory_format=memory_format_of(x))


# ---------------------------------------------------------------------------------------------
# Collectives and the merge.

def _all_gather(packed: Tensor, group, world_size: int) -> Tensor:
    """(world_size, packed.numel()): row i is rank i's tensor (rank within the group)."""
    if dist.get_backend(group) != "gloo":
        out = packed.new_empty((world_size, packed.numel()))
        dist.all_gather_into_tensor(out, packed, group=group)
        return out
    # gloo has no all_gather_into_tensor.
    rows = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(rows, packed, group=group)
    return torch.stack(rows)


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Global (count, mean, biased var) from per-rank partials (W, 1), (W, C), (W, C).

    Chan et al.'s pairwise update generalised to W partitions in one step, so the cost is a
    handful of ops whatever the world size:
        n = sum n_i,  mean = sum n_i * mean_i / n,  M2 = sum M2_i + sum n_i * (mean_i - mean)^2.
    The deviations are taken from the already-merged mean, which keeps it as stable as the
    pairwise form. Every rank reduces the same gathered tensor along the same dim in the same
    order, so every rank gets bit-identical results. A rank with no samples has n_i = 0 and
    zero partials, so it drops out; when every rank is empty, mean and var are NaN and the
    buffers are left alone (non-finite channels keep them).
    """
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total, mean, m2 / total


def _check_group_agrees(group, world_size: int, channels: int, sdt: torch.dtype,
                        device: torch.device) -> None:
    header = torch.tensor([channels, _STAT_DTYPE_CODES[sdt]], dtype=torch.long, device=device)
    rows = _all_gather(header, group, world_size).tolist()
    if any(row != rows[0] for row in rows):
        names = {code: str(dt).replace("torch.", "") for dt, code in _STAT_DTYPE_CODES.items()}
        per_rank = ", ".join(f"rank {i}: C={c} ({names.get(k, k)} statistics)"
                             for i, (c, k) in enumerate(rows))
        raise ValueError("SyncBatchRenorm: the ranks of the process group disagree on the "
                         f"number of channels or the statistics dtype ({per_rank}); every rank "
                         "must run the same layer (same num_features) on inputs of the same "
                         "dtype")


# ---------------------------------------------------------------------------------------------
# The autograd Function.

class SyncBatchRenormFunction(torch.autograd.Function):
    """A synchronised Batch Renorm training step. r and d are constants for autograd, so
    backward is nn.SyncBatchNorm's with weight * r as the scale."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                r_max: float, d_max: float, warmup_steps: int, r_max_ramp_steps: int,
                d_max_ramp_steps: int, group: ProcessGroup, world_size: int,
                fused: bool) -> Tensor:
        sdt = stat_dtype(input.dtype)
        channels = input.shape[1]
        if fused:
            # The kernels make a non-dense input contiguous anyway; doing it here means
            # backward sees the same layout for x and dy.
            input = input.contiguous(memory_format=memory_format_of(input))
        local_count = input.numel() // channels if channels > 0 else 0

        if local_count > 0:
            mean, m2 = _local_stats(input, fused)
        else:
            # An empty slice still takes part in the collective, with count 0.
            mean = m2 = input.new_zeros((channels,), dtype=sdt)
        packed = torch.cat([mean.new_full((1,), float(local_count)), mean, m2])
        gathered = _all_gather(packed, group, world_size)
        total, mean, var = merge_stats(gathered[:, :1], gathered[:, 1:channels + 1],
                                       gathered[:, channels + 1:])

        # r, d and the buffer update: the formulas of reference.batch_renorm, op for op.
        sigma_b = torch.sqrt(var + eps)
        invstd = 1.0 / sigma_b
        if running_mean is not None:
            bounds = reference.clip_bounds(num_batches_tracked, r_max, d_max, warmup_steps,
                                           r_max_ramp_steps, d_max_ramp_steps, sdt)
            r, d = reference.corrections(sigma_b, mean - running_mean, running_var, eps, *bounds)
            # The unbiased running_var uses the GLOBAL count. One value per channel in the
            # whole batch (BatchRenorm raises, which would need a host read here) would make
            # it 0/0: mark the statistics non-finite so that the buffers are kept.
            update_mean = torch.where(total > 1, mean, torch.full_like(mean, float("nan")))
            reference.update_running(update_mean, var, total, running_mean, running_var,
                                      num_batches_tracked, momentum)
        else:
            r = torch.ones_like(mean)
            d = torch.zeros_like(mean)
        scale, shift = reference.scale_shift(mean, invstd, r, d, weight, bias)

        if local_count > 0:
            output = _normalize(input, scale, shift, fused)
        else:
            output = torch.empty_like(input)

        ctx.save_for_backward(input, mean, invstd, r, d, scale, total)
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        # A weak reference: a graph that outlives destroy_process_group() (an output kept
        # without its backward, a reference cycle) must not keep the group alive. A gloo group
        # still alive when the interpreter exits aborts the process ("terminate called without
        # an active exception", torch's teardown; any Python reference to it does that).
        ctx.group = weakref.ref(group)
        ctx.fused = fused
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        input, mean, invstd, r, d, scale, total = ctx.saved_tensors
        channels = input.shape[1]
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if input.numel() > 0:
            if ctx.fused:
                grad_output = grad_output.contiguous(memory_format=memory_format_of(input))
            sum_dy, sum_dy_xhat = _backward_reduce(grad_output, input, mean, invstd, ctx.fused)
        else:
            sum_dy = sum_dy_xhat = torch.zeros_like(mean)

        grad_input = grad_weight = grad_bias = None
        if need_input:
            # Every rank must make this call, an empty one too (autograd still calls backward
            # with an empty grad_output for an empty output that the loss depends on), or its
            # peers wait forever. needs_input_grad[0] is the same on every rank running the
            # same model, as in nn.SyncBatchNorm.
            combined = torch.cat([sum_dy, sum_dy_xhat])
            group = ctx.group()
            if group is None:
                raise RuntimeError("SyncBatchRenorm: the process group of this forward was "
                                   "destroyed before its backward")
            dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=group)
            mean_dy = combined[:channels] / total
            mean_dy_xhat = combined[channels:] / total
            if input.numel() > 0:
                grad_input = _backward_input(grad_output, input, mean, invstd, scale, mean_dy,
                                             mean_dy_xhat, ctx.fused)
            else:
                grad_input = torch.zeros_like(input)
        # Local sums: DistributedDataParallel all-reduces parameter gradients itself. Zeros
        # (not None) on an empty rank, so that DDP's hooks see a gradient on every rank, and
        # zeros even when r and d are NaN (every rank empty: 0/0 statistics), as BatchRenorm
        # gives for an empty batch.
        if ctx.has_weight and need_weight:
            grad_weight = (r * sum_dy_xhat + d * sum_dy if input.numel() > 0
                           else torch.zeros_like(sum_dy))
        if ctx.has_bias and need_bias:
            grad_bias = sum_dy.clone()
        return (grad_input, grad_weight, grad_bias) + (None,) * 13


# ---------------------------------------------------------------------------------------------
# The module.

class SyncBatchRenorm(_BatchRenorm):
    """Batch Renorm with batch statistics over all processes of a torch.distributed group;
    a drop-in for nn.SyncBatchNorm. Input (N, C, *) of any rank >= 2.

    Training with a process group of more than one rank computes the batch's mean and variance
    over the union of every rank's slice (unequal slices, empty ones included), derives r, d
    and the running-buffer update from them (identical on every rank), and returns this rank's
    normalised slice. Backward is exact for the global batch. grad_weight and grad_bias are this
    rank's contributions, to be summed across ranks by DistributedDataParallel.

    Without synchronisation (torch.distributed not available or not initialised and no
    process_group given, or a group of one rank) it is exactly BatchRenorm1d/2d/3d, and eval is
    always plain BatchNorm inference with no collective. With track_running_stats=False,
    training still synchronises the batch statistics (r = 1, d = 0: nn.SyncBatchNorm).

    process_group: the group to synchronise over; None means the default (world) group.
    The other arguments are BatchRenorm2d's (help(batchrenorm_cuda.BatchRenorm2d)).
    Every rank of the group must call forward and backward of this layer the same number of
    times, in the same order, in the same mode (train/eval), as with nn.SyncBatchNorm.
    """

    def __init__(self, *args: Any, process_group: Optional[ProcessGroup] = None,
                 **kwargs: Any) -> None:
        """BatchRenorm2d's arguments, all of them (bias= and backend= too), plus the keyword-only
        process_group; the signature shown by help() and inspect is the full one."""
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self._agreed_key: Optional[tuple] = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected input of shape (N, C, *) with "
                             f"rank >= 2, got {input.dim()}D input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input has {input.shape[1]} channels "
                             f"(dim 1), expected num_features={self.num_features}")

    def _sync_group(self):
        """(group, world_size) to synchronise over, or None to run unsynchronised."""
        initialised = dist.is_available() and dist.is_initialized()
        if not initialised:
            if self.process_group is not None:
                raise RuntimeError(
                    "SyncBatchRenorm: process_group was given but torch.distributed is not "
                    "initialized (or its default group was destroyed); call "
                    "torch.distributed.init_process_group() before training, or pass "
                    "process_group=None to run unsynchronised")
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        if world_size < 1:
            raise RuntimeError("SyncBatchRenorm: this process is not a member of the "
                               "process_group it was given")
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or self._sync_group() is None:
            return super().forward(input)
        # Only the input crosses into the eager step below, which looks the group up again:
        # torch 2.12's Dynamo failed an assertion rebuilding a ProcessGroup passed across that
        # graph break.
        return self._synchronised_forward(input)

    # torch.compile runs this step eagerly, a graph break on each side (as for nn.SyncBatchNorm
    # over gloo): Dynamo cannot trace an autograd.Function whose forward and backward make
    # blocking collectives and whose first step reads the group's header back to the host. The
    # rest of a compiled model stays compiled; the unsynchronised and eval paths compile whole.
    @torch.compiler.disable
    def _synchronised_forward(self, input: Tensor) -> Tensor:
        group, world_size = self._sync_group()
        caller = type(self).__name__
        check_input_dtype(caller, input)
        sdt = stat_dtype(input.dtype)
        # Half or bfloat16 parameters and buffers (model.half()) compute in float32, as in
        # the single-process layer; float32 ones are checked against the input as they are.
        weight, bias, running_mean, running_var, store_back = in_float32(self)
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var),
                             ("weight", weight), ("bias", bias)):
            check_per_channel(caller, name, tensor, input, sdt)
        check_buffers_given(caller, running_mean, running_var, True)
        if dist.get_backend(group) == "nccl" and input.device.type != "cuda":
            raise ValueError(f"{caller}: the process group uses NCCL, which needs CUDA tensors; "
                             f"got input on {input.device}")
        key = (id(group), world_size, self.num_features, sdt)
        if self._agreed_key != key:
            _check_group_agrees(group, world_size, self.num_features, sdt, input.device)
            self._agreed_key = key

        tracking = self.track_running_stats
        output = SyncBatchRenormFunction.apply(
            input, weight, bias, running_mean if tracking else None,
            running_var if tracking else None,
            self.num_batches_tracked if tracking else None, self.momentum, self.eps,
            self.r_max, self.d_max, self.warmup_steps, self.r_max_ramp_steps,
            self.d_max_ramp_steps, group, world_size, use_fused(input, self.backend, caller))
        if store_back is not None:
            store_back()
        return output


def _full_signature() -> inspect.Signature:
    # __init__ forwards *args and **kwargs so that _BatchRenorm's arguments are written once;
    # help() and inspect show them with process_group added.
    base = inspect.signature(_BatchRenorm.__init__)
    group = inspect.Parameter("process_group", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation="Optional[ProcessGroup]")
    return base.replace(parameters=[*base.parameters.values(), group])


SyncBatchRenorm.__init__.__signature__ = _full_signature()  # type: ignore[attr-defined]
