"""convert_batchnorm / revert_batchnorm: nn.BatchNorm*d and nn.SyncBatchNorm <-> BatchRenorm*d
and SyncBatchRenorm, in a whole model. A module of its own, above modules.py and distributed.py:
it needs both, and modules.py must not import distributed.py, which imports it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .distributed import SyncBatchRenorm
from .modules import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

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


def _sync_kwargs(m: nn.Module, process_group: Optional[ProcessGroup]) -> dict:
    # An explicit process_group wins; else a synchronised layer keeps the group it had.
    group = process_group if process_group is not None else getattr(m, "process_group", None)
    return dict(process_group=group)


def convert_batchnorm(module: nn.Module, sync: bool = False,
                      process_group: Optional[ProcessGroup] = None,
                      **batchrenorm_kwargs: Any) -> nn.Module:
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


def revert_batchnorm(module: nn.Module, sync: bool = False,
                     process_group: Optional[ProcessGroup] = None) -> nn.Module:
    """The inverse of convert_batchnorm: BatchRenorm1d/2d/3d become nn.BatchNorm1d/2d/3d (or
    nn.SyncBatchNorm over `process_group` when sync=True), and SyncBatchRenorm always becomes
    nn.SyncBatchNorm, keeping its own process_group unless one is given."""
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
