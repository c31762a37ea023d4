"""batch_renorm(): argument checks, then the fused kernels or the reference."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from . import reference
from . import _ops

_INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "fused", "reference")
# torch.compiler.is_exporting arrived in torch 2.5 (we support 2.4).
_is_compiler_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _is_exporting() -> bool:
    # torch.jit.trace is how the TorchScript ONNX exporter (torch.onnx.export(dynamo=False))
    # records a model: an eval traced as aten batch_norm exports, where our op would not.
    return _is_compiler_exporting() or torch.jit.is_tracing()


def batch_renorm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    backend: str = "auto",
) -> Tensor:
    """Batch Renormalization, mirroring torch.nn.functional.batch_norm.

    The functional form has fixed bounds: r_max and d_max apply as given from the first call
    (there is no warm-up or ramp schedule, which needs a step counter: the modules
    BatchRenorm1d/2d/3d keep one in num_batches_tracked). For the same reason momentum must be
    a float here; momentum=None, a cumulative average, is the modules'.

    Training normalises with the batch's statistics, corrected towards the running ones by
    r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - running_mean) / sigma,
    -d_max, d_max), and updates running_mean and running_var in place. Eval is exactly
    BatchNorm's eval. With running_mean = running_var = None, training (r = 1, d = 0) is plain
    BatchNorm training.

    input: (N, C, *) float32, float64, float16 or bfloat16, any of the contiguous,
    channels_last or channels_last_3d layouts (the output keeps it). weight, bias and the
    buffers have shape (C,) and dtype float32 (float64 for float64 input).

    training: a bool (as in F.batch_norm, a string or a number is a TypeError).

    backend: "auto" uses the fused kernel for the input's device when it is built, else the
    reference; "fused" requires the kernel; "reference" forces the pure-PyTorch path.
    """
    return _batch_renorm(input, running_mean, running_var, weight, bias, training, momentum,
                         eps, r_max, d_max, backend=backend)


def _check_real(caller: str, name: str, value: object) -> None:
    # bool is a number to Python, but never a meant one here (as torch's float arguments).
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{caller}: {name} must be a float, got {type(value).__name__} "
                        f"{value!r}")


def _check_hyperparameter_types(caller: str, momentum: Optional[float], eps: float,
                                r_max: float, d_max: float) -> None:
    # The fused path needs these too: the dispatcher would reject a str with a RuntimeError
    # (the reference, and F.batch_norm, give TypeError).
    for name, value in (("eps", eps), ("r_max", r_max), ("d_max", d_max)):
        _check_real(caller, name, value)
    if momentum is not None:
        _check_real(caller, "momentum", momentum)


def check_hyperparameters(caller: str, momentum: Optional[float], eps: float, r_max: float,
                          d_max: float) -> None:
    _check_hyperparameter_types(caller, momentum, eps, r_max, d_max)
    # Written as `not (ok)` so that NaN fails every check.
    if not eps > 0:
        raise ValueError(f"{caller}: eps must be > 0, got {eps}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{caller}: momentum must be in [0, 1] or None, got {momentum}")
    if not r_max >= 1.0:
        raise ValueError(f"{caller}: r_max must be >= 1, got {r_max}")
    if not d_max >= 0.0:
        raise ValueError(f"{caller}: d_max must be >= 0, got {d_max}")


def _check_tensor_or_none(caller: str, name: str, t: object) -> None:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{caller}: {name} must be a Tensor or None, got {type(t).__name__}")


def _check_buffers_given(caller: str, running_mean: Optional[Tensor],
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


def _check_per_channel(caller: str, name: str, t: Optional[Tensor], input: Tensor,
                       dtype: torch.dtype) -> None:
    _check_tensor_or_none(caller, name, t)
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
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{caller}: input must be float32, float64, float16 or bfloat16, "
                        f"got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"{caller}: input must have shape (N, C, *) of rank >= 2, "
                         f"got shape {tuple(input.shape)}")
    check_hyperparameters(caller, momentum, eps, r_max, d_max)
    sdt = reference.stat_dtype(input.dtype)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_per_channel(caller, name, t, input, sdt)
    _check_buffers_given(caller, running_mean, running_var, training)
    if num_batches_tracked is not None:
        if num_batches_tracked.dtype != torch.long or num_batches_tracked.numel() != 1:
            raise TypeError(f"{caller}: num_batches_tracked must be an int64 scalar tensor, got "
                            f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
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
    raise ValueError(f"{caller}: backend must be one of {_BACKENDS}, got {backend!r}")


def _empty_batch(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    # As torch.batch_norm does for an empty input: no statistics, buffers untouched, and an
    # output that still depends on weight and bias so the autograd graph stays connected.
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out.to(input.dtype)


def _check_fused_arguments(caller: str, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], training: bool) -> None:
    """What the fused ops cannot check themselves: the dispatcher turns a non-Tensor argument
    into its own RuntimeError before a kernel runs, and eval's schema needs the buffers. The
    ops check everything else, in check_arguments' words (csrc/batchrenorm_checks.h)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_tensor_or_none(caller, name, t)
    _check_buffers_given(caller, running_mean, running_var, training)


def _batch_renorm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    r_max: float,
    d_max: float,
    num_batches_tracked: Optional[Tensor] = None,
    warmup_steps: int = 0,
    r_max_ramp_steps: int = 0,
    d_max_ramp_steps: int = 0,
    backend: str = "auto",
    caller: str = "batch_renorm",
) -> Tensor:
    """batch_renorm with the module's extras: the step counter that drives the schedule."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{caller}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(training, bool):
        # As F.batch_norm: "False" is truthy, and would train and update the buffers.
        raise TypeError(f"{caller}: training must be a bool, got {type(training).__name__} "
                        f"{training!r}")
    fused = use_fused(input, backend, caller)
    if fused and input.numel() > 0 and (training or not _is_exporting()):
        # The hot path: one dispatcher call, whose kernels check every argument before they
        # touch a buffer (csrc/batchrenorm_checks.h) and whose autograd is registered in C++
        # (csrc/batchrenorm_autograd.h).
        _check_fused_arguments(caller, running_mean, running_var, weight, bias, training)
        if training:
            _check_hyperparameter_types(caller, momentum, eps, r_max, d_max)
            return _ops.OPS.forward_train(input, weight, bias, running_mean, running_var,
                                          num_batches_tracked, momentum, eps, r_max, d_max,
                                          warmup_steps, r_max_ramp_steps, d_max_ramp_steps)[0]
        check_hyperparameters(caller, momentum, eps, r_max, d_max)
        return _ops.OPS.forward_eval(input, weight, bias, running_mean, running_var, eps)
    check_arguments(caller, input, running_mean, running_var, weight, bias, training, momentum,
                    eps, r_max, d_max, num_batches_tracked)
    if not training and _is_exporting():
        # Eval is exactly BatchNorm's eval: exported as aten batch_norm, a program runs (ONNX,
        # AOTInductor, ExecuTorch) without this package.
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                              False, 0.0, eps)
    if input.numel() == 0:
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return _empty_batch(input, weight, bias)
    return reference.batch_renorm(input, running_mean, running_var, weight, bias, training,
                                  momentum, eps, r_max, d_max, num_batches_tracked,
                                  warmup_steps, r_max_ramp_steps, d_max_ramp_steps)
