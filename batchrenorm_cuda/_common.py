"""The private helpers that functional, modules and distributed share, each rule written once:
argument checks (in the words the C++ checks use too, csrc/batchrenorm_checks.h), the backend
choice and the kernel probe, and the float32 compute copies of low-precision parameters."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _ops, reference

INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "fused", "reference")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_input_dtype(caller: str, input: Tensor) -> None:
    if input.dtype not in INPUT_DTYPES:
        raise TypeError(f"{caller}: input must be float32, float64, float16 or bfloat16, "
                        f"got {input.dtype}")


def check_backend(caller: str, backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {BACKENDS}, got {backend!r}")


def check_hyperparameter_types(caller: str, momentum: Optional[float], eps: float,
                                r_max: float, d_max: float) -> None:
    # The fused path needs these too: the dispatcher would reject a str with a RuntimeError
    # (the reference, and F.batch_norm, give TypeError). This runs on every call of the fused
    # path, so the common case (all floats, as the modules store them) is one expression:
    # 0.17 us, where a numbers.Real check per value (an ABC lookup) took 1.5 us of a 10 us call
    # on small inputs. isinstance rather than type(value) is float: torch.compile guards a
    # type() per value and layer on every compiled step, and an isinstance on a constant not.
    if (isinstance(eps, float) and isinstance(r_max, float) and isinstance(d_max, float)
            and (momentum is None or isinstance(momentum, float))):
        return
    for name, value in (("eps", eps), ("r_max", r_max), ("d_max", d_max), ("momentum", momentum)):
        # bool is a number to Python, but never a meant one here (as torch's float arguments).
        if (value is not None or name != "momentum") and (
                not isinstance(value, numbers.Real) or isinstance(value, bool)):
            raise TypeError(f"{caller}: {name} must be a float, got {type(value).__name__} "
                            f"{value!r}")


def check_hyperparameters(caller: str, momentum: Optional[float], eps: float, r_max: float,
                          d_max: float) -> None:
    check_hyperparameter_types(caller, momentum, eps, r_max, d_max)
    # Written as `not (ok)` so that NaN fails every check.
    if not eps > 0:
        raise ValueError(f"{caller}: eps must be > 0, got {eps}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{caller}: momentum must be in [0, 1] or None, got {momentum}")
    if not r_max >= 1.0:
        raise ValueError(f"{caller}: r_max must be >= 1, got {r_max}")
    if not d_max >= 0.0:
        raise ValueError(f"{caller}: d_max must be >= 0, got {d_max}")


def check_tensor_or_none(caller: str, name: str, t: object) -> None:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{caller}: {name} must be a Tensor or None, got {type(t).__name__}")


def check_buffers_given(caller: str, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], training: bool) -> None:
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        # As F.batch_norm (in eval too): the buffers are state, not inputs to differentiate,
        # and training would update a leaf that requires grad in place without a word.
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{caller}: {name} requires grad; the running statistics are "
                               "buffers that training updates in place and that are not "
                               f"differentiable (as in nn.BatchNorm): pass {name}.detach() or "
                               "a tensor with requires_grad=False")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{caller}: running_mean and running_var must both be tensors or "
                         "both be None")
    if not training and running_mean is None:
        raise ValueError(f"{caller}: eval (training=False) needs running_mean and running_var")


def check_per_channel(caller: str, name: str, t: Optional[Tensor], input: Tensor,
                       dtype: torch.dtype) -> None:
    check_tensor_or_none(caller, name, t)
    if t is None:
        return
    channels = input.shape[1]
    if t.shape != (channels,):
        raise ValueError(f"{caller}: {name} must have shape (C,) = ({channels},), "
                         f"got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{caller}: {name} must be {dtype} for {input.dtype} input, got {t.dtype}")
    if t.device != input.device:
        raise RuntimeError(f"{caller}: {name} is on {t.device}, expected {input.device} "
                           "like input")


def check_arguments(caller: str, input: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], training: bool, momentum: Optional[float],
                    eps: float, r_max: float, d_max: float,
                    num_batches_tracked: Optional[Tensor]) -> None:
    """Every check of batch_renorm's arguments, shared by both backends."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{caller}: input must be a Tensor, got {type(input).__name__}")
    check_input_dtype(caller, input)
    if input.dim() < 2:
        raise ValueError(f"{caller}: input must have shape (N, C, *) of rank >= 2, "
                         f"got shape {tuple(input.shape)}")
    check_hyperparameters(caller, momentum, eps, r_max, d_max)
    sdt = reference.stat_dtype(input.dtype)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_per_channel(caller, name, t, input, sdt)
    check_buffers_given(caller, running_mean, running_var, training)
    if num_batches_tracked is not None:
        if num_batches_tracked.dtype != torch.long or num_batches_tracked.numel() != 1:
            raise TypeError(f"{caller}: num_batches_tracked must be an int64 scalar tensor, got "
                            f"{num_batches_tracked.dtype} of shape "
                            f"{tuple(num_batches_tracked.shape)}")
        if num_batches_tracked.device != input.device:
            raise RuntimeError(f"{caller}: num_batches_tracked is on {num_batches_tracked.device},"
                               f" expected {input.device} like input")
    elif training and momentum is None and running_mean is not None:
        raise ValueError(f"{caller}: momentum=None (a cumulative average) needs the step "
                         "counter num_batches_tracked, which batch_renorm() does not take (the "
                         "modules BatchRenorm1d/2d/3d keep one); pass a float momentum")
    if training and input.numel() > 0 and input.numel() // input.shape[1] == 1:
        raise ValueError(f"{caller}: Expected more than 1 value per channel when training, "
                         f"got input size {tuple(input.shape)}")


def use_fused(input: Tensor, backend: str, caller: str) -> bool:
    # _ops._AVAILABLE, not extension_available(): a dict lookup per call, no argument parsing.
    if backend == "auto":
        return _ops._AVAILABLE.get(input.device.type, False)
    if backend == "reference":
        return False
    if backend == "fused":
        if not _ops._AVAILABLE.get(input.device.type, False):
            raise RuntimeError(f"{caller}: backend='fused' but no fused kernel is built for "
                               f"{input.device.type} tensors (extension_available"
                               f"({input.device.type!r}) is False)")
        return True
    check_backend(caller, backend)
    return False  # not reached: check_backend raised


_Tensors = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
                 Optional[Callable[[], None]]]


def in_float32(module: torch.nn.Module) -> _Tensors:
    """(weight, bias, running_mean, running_var, store_back) to compute with. Low-precision
    parameters and buffers (model.half()) are replaced by float32 copies, as ATen and cuDNN
    compute with, and store_back() writes the updated buffers back into the module's own; the
    casts are differentiable, so the half parameters get their gradients. Otherwise the
    module's own tensors, and store_back is None."""
    tensors = (module.weight, module.bias, module.running_mean, module.running_var)
    # A plain loop and None, not any() over a generator and a no-op lambda: this runs on every
    # module call (they were 1 us of the 3 us this function took), and a function called under
    # torch.compile is one more guard on every compiled step.
    for t in tensors:
        if t is not None and t.dtype in _LOW_PRECISION:
            break
    else:
        return (*tensors, None)
    copies = tuple(None if t is None else t.float() for t in tensors)

    def store_back() -> None:
        if tensors[2] is not None:
            with torch.no_grad():
                tensors[2].copy_(copies[2])
                tensors[3].copy_(copies[3])

    return (*copies, store_back)
