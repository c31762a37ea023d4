"""Batch Renormalization (Ioffe 2017) for PyTorch, with fused CPU and CUDA kernels.

    import batchrenorm_cuda as brn
    layer = brn.BatchRenorm2d(64)            # a drop-in for nn.BatchNorm2d
    model = brn.convert_batchnorm(model)     # or convert a whole model
    model = brn.convert_batchnorm(model, sync=True)   # SyncBatchRenorm, for DDP
    layer = brn.BatchRenorm2d(64, **brn.schedule_for(20_000))   # a run shorter than the paper's
"""
from . import reference
from ._ops import extension_available
from .distributed import SyncBatchRenorm
from .functional import batch_renorm
from .convert import convert_batchnorm, revert_batchnorm
from .modules import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .schedule import schedule_for

__all__ = [
    "batch_renorm",
    "extension_available",
    "reference",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "SyncBatchRenorm",
    "convert_batchnorm",
    "revert_batchnorm",
    "schedule_for",
]
__version__ = "0.1.0"
