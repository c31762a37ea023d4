"""BatchRenorm1d/2d/3d: drop-in replacements for nn.BatchNorm1d/2d/3d, and convert/revert.

The buffers keep nn.BatchNorm's names and meaning (running_mean, running_var unbiased,
num_batches_tracked), so state_dicts move between the two unchanged. num_batches_tracked also
drives the r_max / d_max schedule, so a checkpoint restores the schedule with it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import reference
from .functional import _batch_renorm, check_hyperparameters


class _BatchRenorm(_NormBase):
    _expected_ranks: Tuple[int, ...] = ()
    _shape_name = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
        device=None,
        dtype=None,
    ) -> None:
        name = type(self).__name__
        check_hyperparameters(name, momentum, eps, r_max, d_max)
        for arg, value in (("warmup_steps", warmup_steps), ("r_max_ramp_steps", r_max_ramp_steps),
                           ("d_max_ramp_steps", d_max_ramp_steps)):
            if int(value) != value or value < 0:
                raise ValueError(f"{name}: {arg} must be a non-negative integer, got {value}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.r_max_ramp_steps = int(r_max_ramp_steps)
        self.d_max_ramp_steps = int(d_max_ramp_steps)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_ranks:
            got = f"{input.dim()}D input of shape {tuple(input.shape)}"
            raise ValueError(f"{type(self).__name__}: expected {self._shape_name} input, got {got}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input has {input.shape[1]} channels "
                             f"(dim 1), expected num_features={self.num_features}")

    def clip_bounds(self) -> Tuple[float, float]:
        """(r_max, d_max) that the next training step will use, for logging.

        Reads the step counter, so it synchronises with the device; the training step itself
        never does. Without running statistics there is nothing to correct towards: (1, 0).
        """
        if not self.track_running_stats:
            return 1.0, 0.0
        r_max, d_max = reference.clip_bounds(self.num_batches_tracked, self.r_max, self.d_max,
                                             self.warmup_steps, self.r_max_ramp_steps,
                                             self.d_max_ramp_steps)
        return float(r_max), float(d_max)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        caller = type(self).__name__
        if self.training and self.track_running_stats:
            return _batch_renorm(
                input, self.running_mean, self.running_var, self.weight, self.bias, True,
                self.momentum, self.eps, self.r_max, self.d_max,
                num_batches_tracked=self.num_batches_tracked,
                warmup_steps=self.warmup_steps, r_max_ramp_steps=self.r_max_ramp_steps,
                d_max_ramp_steps=self.d_max_ramp_steps, caller=caller)
        # As nn.BatchNorm: without running statistics, normalise with the batch's own in eval
        # too; with them, eval is plain inference.
        use_batch_stats = self.running_mean is None
        return _batch_renorm(
            input, None if use_batch_stats else self.running_mean,
            None if use_batch_stats else self.running_var, self.weight, self.bias,
            use_batch_stats, self.momentum, self.eps, self.r_max, self.d_max, caller=caller)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
                f"d_max_ramp_steps={self.d_max_ramp_steps}")


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over (N, C) or (N, C, L) input; a drop-in for nn.BatchNorm1d."""

    _expected_ranks = (2, 3)
    _shape_name = "2D or 3D (N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over (N, C, H, W) input; a drop-in for nn.BatchNorm2d."""

    _expected_ranks = (4,)
    _shape_name = "4D (N, C, H, W)"


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm over (N, C, D, H, W) input; a drop-in for nn.BatchNorm3d."""

    _expected_ranks = (5,)
    _shape_name = "5D (N, C, D, H, W)"


_RENORM_OF = ((nn.BatchNorm1d, BatchRenorm1d), (nn.BatchNorm2d, BatchRenorm2d),
              (nn.BatchNorm3d, BatchRenorm3d))


def _carry_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Share parameters and buffers (as nn.SyncBatchNorm.convert_sync_batchnorm does), so an
    optimizer that holds the old parameters keeps working, and copy the training flag."""
    if source.affine:
        with torch.no_grad():
            target.weight = source.weight
            target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def _swap_recursively(module: nn.Module, swap) -> nn.Module:
    output = swap(module)
    for name, child in module.named_children():
        output.add_module(name, _swap_recursively(child, swap))
    return output


def _sync_kwargs(m: nn.Module, process_group) -> dict:
    # An explicit process_group wins; else a synchronised layer keeps the group it had.
    group = process_group if process_group is not None else getattr(m, "process_group", None)
    return dict(process_group=group)


def convert_batchnorm(module: nn.Module, sync: bool = False, process_group=None,
                      **batchrenorm_kwargs) -> nn.Module:
    """Return `module` with its BatchNorm layers replaced by Batch Renorm.

    sync=False: nn.BatchNorm1d/2d/3d become BatchRenorm1d/2d/3d. sync=True: they become
    SyncBatchRenorm over `process_group` (None: the default group), for
    DistributedDataParallel. nn.SyncBatchNorm always becomes SyncBatchRenorm, whatever `sync`
    says: the model already asked for synchronised statistics (and a SyncBatchNorm does not say
    whether its input is 1d, 2d or 3d); it keeps its own process_group unless one is given.

    Weights, buffers (so the schedule's step count too), the training flag, device and dtype
    carry over; eps and momentum are the BatchNorm's unless given. batchrenorm_kwargs go to
    the BatchRenorm constructor (r_max, d_max, warmup_steps, ...).
    """
    from .distributed import SyncBatchRenorm  # distributed imports this module

    def swap(m: nn.Module) -> nn.Module:
        kwargs = dict(eps=m.eps, momentum=m.momentum) if isinstance(m, _NormBase) else {}
        kwargs.update(batchrenorm_kwargs)
        if isinstance(m, nn.SyncBatchNorm) or (
                sync and isinstance(m, tuple(bn for bn, _ in _RENORM_OF))):
            new = SyncBatchRenorm(m.num_features, affine=m.affine,
                                  track_running_stats=m.track_running_stats,
                                  **_sync_kwargs(m, process_group), **kwargs)
            return _carry_state(m, new)
        for bn_type, renorm_type in _RENORM_OF:
            if isinstance(m, bn_type):
                new = renorm_type(m.num_features, affine=m.affine,
                                  track_running_stats=m.track_running_stats, **kwargs)
                return _carry_state(m, new)
        return m

    return _swap_recursively(module, swap)


def revert_batchnorm(module: nn.Module, sync: bool = False, process_group=None) -> nn.Module:
    """The inverse of convert_batchnorm: BatchRenorm1d/2d/3d become nn.BatchNorm1d/2d/3d (or
    nn.SyncBatchNorm over `process_group` when sync=True), and SyncBatchRenorm always becomes
    nn.SyncBatchNorm, keeping its own process_group unless one is given."""
    from .distributed import SyncBatchRenorm  # distributed imports this module

    def swap(m: nn.Module) -> nn.Module:
        if type(m) is SyncBatchRenorm or (
                sync and type(m) in tuple(renorm for _, renorm in _RENORM_OF)):
            new = nn.SyncBatchNorm(m.num_features, eps=m.eps, momentum=m.momentum,
                                   affine=m.affine, track_running_stats=m.track_running_stats,
                                   **_sync_kwargs(m, process_group))
            return _carry_state(m, new)
        for bn_type, renorm_type in _RENORM_OF:
            if type(m) is renorm_type:
                new = bn_type(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                              track_running_stats=m.track_running_stats)
                return _carry_state(m, new)
        return m

    return _swap_recursively(module, swap)
