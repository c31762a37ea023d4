"""batch_renorm(): argument checks, then the fused kernels or the reference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _compiled, _ops, reference
from ._common import (check_arguments, check_buffers_given, check_hyperparameter_types,
                      check_hyperparameters, check_tensor_or_none, use_fused)

__all__ = ["batch_renorm"]

# torch.compiler.is_exporting arrived in torch 2.5 (we support 2.4).
_is_compiler_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


# The traced training forward (_compiled.py) needs torch >= 2.12. Before, Dynamo folded
# torch.compiler.is_exporting() to True under torch.compile too, which kept compiled training on
# our opaque op; and on 2.11, put on the traced path anyway, the compiled backward ignored the
# incoming gradient: every parameter's gradient came out zero (benchmarks/NOTES.md, issue 22).
# There compiled training keeps the opaque op: correct, slower on the CPU.
TRACED_FORWARD = torch.torch_version.TorchVersion(torch.__version__) >= (2, 12)


def _is_tracing_for_inductor() -> bool:
    # torch.compile, not torch.export: an exported program keeps our ops (and needs no autograd).
    return TRACED_FORWARD and torch.compiler.is_compiling() and not _is_compiler_exporting()


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
    return batch_renorm_scheduled(input, running_mean, running_var, weight, bias, training,
                                  momentum, eps, r_max, d_max, backend=backend)


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
        check_tensor_or_none(caller, name, t)
    check_buffers_given(caller, running_mean, running_var, training)


def batch_renorm_scheduled(
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
    """batch_renorm with the modules' extras: the step counter that drives the schedule, and the
    caller's name for the errors. The modules' and tests' entry point."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{caller}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(training, bool):
        # As F.batch_norm: "False" is truthy, and would train and update the buffers.
        raise TypeError(f"{caller}: training must be a bool, got {type(training).__name__} "
                        f"{training!r}")
    fused = use_fused(input, backend, caller)
    if fused and training and input.numel() > 0 and _is_tracing_for_inductor():
        # Under torch.compile the forward is traced as aten ops, so that Inductor fuses and
        # recomputes it as it does nn.BatchNorm (_compiled.py says why); the backward stays the
        # fused kernel. The Python checks run once, while Dynamo traces.
        check_arguments(caller, input, running_mean, running_var, weight, bias, training,
                        momentum, eps, r_max, d_max, num_batches_tracked)
        return _compiled.forward_train(input, weight, bias, running_mean, running_var,
                                       num_batches_tracked, momentum, eps, r_max, d_max,
                                       warmup_steps, r_max_ramp_steps, d_max_ramp_steps)
    if fused and input.numel() > 0 and (training or not _is_exporting()):
        # The hot path: one dispatcher call, whose kernels check every argument before they
        # touch a buffer (csrc/batchrenorm_checks.h) and whose autograd is registered in C++
        # (csrc/batchrenorm_autograd.h).
        _check_fused_arguments(caller, running_mean, running_var, weight, bias, training)
        if training:
            check_hyperparameter_types(caller, momentum, eps, r_max, d_max)
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
