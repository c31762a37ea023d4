"""The compiled ops: loading `_C`, and their fake kernels. Their autograd is registered in C++
(csrc/batchrenorm_autograd.h), their vmap rules in _vmap.py.

Importing `_C` runs its TORCH_LIBRARY registrations (csrc/batchrenorm.cpp). When it is missing
or fails to load, the package works on the pure-PyTorch reference and says so once, here.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from ._inductor import register_with_inductor
from ._vmap import register_vmaps
from .reference import stat_dtype

from ._loader import load_extension

# Importing _C runs its TORCH_LIBRARY registrations; _loader checks first that it was built for
# this torch. LOAD_ERROR is why it is not loaded (None when it is).
_C, LOAD_ERROR = load_extension()
if LOAD_ERROR is not None:  # pragma: no cover - depends on the build
    warnings.warn(f"batchrenorm_cuda: {LOAD_ERROR}. Every call uses the pure-PyTorch reference "
                  "implementation.", RuntimeWarning, stacklevel=2)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _has_kernel(device_type: str) -> bool:
    if _C is None or device_type not in _DISPATCH_KEYS:
        return False
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "batchrenorm::forward_train", _DISPATCH_KEYS[device_type]
    )


# Computed once: a plain dict lookup on every call costs nothing and traces under torch.compile.
_AVAILABLE = {device_type: _has_kernel(device_type) for device_type in _DISPATCH_KEYS}


def extension_available(device: Union[str, torch.device]) -> bool:
    """Whether fused kernels are built and usable for a device: a device type ("cpu", "cuda"),
    a device string ("cuda:1") or a torch.device. Device types are lower case, as in torch;
    a string that names no device type raises ValueError rather than answering False."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"extension_available: device must be a device type such as 'cpu' "
                             f"or 'cuda' (lower case, as torch.device takes it) or a "
                             f"torch.device, got {device!r}") from None
    if not isinstance(device, torch.device):
        raise TypeError(f"extension_available: device must be a str or a torch.device, got "
                        f"{type(device).__name__}")
    return _AVAILABLE.get(device.type, False)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout the kernels produce for an input of this layout (mirrored in C++):
    channels_last(_3d) when the input is dense in it, else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _per_channel_like(input: Tensor, count: int):
    return tuple(input.new_empty((input.shape[1],), dtype=stat_dtype(input.dtype))
                 for _ in range(count))


# Arguments of the schemas that are `Tensor`, not `Tensor?`: the dispatcher can still hand the
# fake kernels None for them.
_REQUIRED = ("grad_output", "relu_output", "mean", "invstd", "scale", "shift", "mean_dy",
             "mean_dy_xhat")


def _check_devices(op: str, input: Tensor, **tensors: Optional[Tensor]) -> None:
    # The dispatcher picks the fake kernel as soon as one argument is a meta tensor, even when
    # the others are real CPU or CUDA tensors; without this check such a call would return
    # uninitialised memory instead of an error.
    for name, t in (("input", input),) + tuple(tensors.items()):
        if not isinstance(t, Tensor) and (t is not None or name == "input" or name in _REQUIRED
                                          or (op == "forward_eval" and name.startswith("run"))):
            raise TypeError(f"batchrenorm::{op}: {name} must be a Tensor, got "
                            f"{type(t).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"batchrenorm::{op}: input must have shape (N, C, *) of rank >= 2, "
                           f"got shape {list(input.shape)}")
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"batchrenorm::{op}: {name} is on {t.device}, expected "
                               f"{input.device} like input")


def register_fakes(namespace: str) -> None:
    """The fake (meta) kernels of the ops in `namespace`: "batchrenorm", or a test namespace with
    the same schemas (the CUDA emulation)."""

    @torch.library.register_fake(f"{namespace}::forward_train")
    def _forward_train_fake(input, weight, bias, running_mean, running_var, num_batches_tracked,
                            momentum, eps, r_max, d_max, warmup_steps, r_max_ramp_steps,
                            d_max_ramp_steps):
        _check_devices("forward_train", input, weight=weight, bias=bias,
                       running_mean=running_mean, running_var=running_var,
                       num_batches_tracked=num_batches_tracked)
        output = torch.empty_like(input, memory_format=memory_format_of(input))
        return (output, *_per_channel_like(input, 4))

    @torch.library.register_fake(f"{namespace}::forward_eval")
    def _forward_eval_fake(input, weight, bias, running_mean, running_var, eps):
        _check_devices("forward_eval", input, weight=weight, bias=bias,
                       running_mean=running_mean, running_var=running_var)
        return torch.empty_like(input, memory_format=memory_format_of(input))

    def _backward_outputs(input, mean, output_mask):
        grad_input = (torch.empty_like(input, memory_format=memory_format_of(input))
                      if output_mask[0] else None)
        grad_weight = mean.new_empty(mean.shape) if output_mask[1] else None
        grad_bias = mean.new_empty(mean.shape) if output_mask[2] else None
        return grad_input, grad_weight, grad_bias

    @torch.library.register_fake(f"{namespace}::backward")
    def _backward_fake(grad_output, input, weight, mean, invstd, r, d, train, output_mask):
        register_with_inductor(getattr(torch.ops, namespace))
        _check_devices("backward", input, grad_output=grad_output, weight=weight, mean=mean,
                       invstd=invstd, r=r, d=d)
        return _backward_outputs(input, mean, output_mask)

    @torch.library.register_fake(f"{namespace}::backward_relu")
    def _backward_relu_fake(grad_output, relu_output, input, weight, mean, invstd, r, d, train,
                            output_mask):
        _check_devices("backward_relu", input, grad_output=grad_output, relu_output=relu_output,
                       weight=weight, mean=mean, invstd=invstd, r=r, d=d)
        return _backward_outputs(input, mean, output_mask)

    # The out= overloads (Inductor's lowering of the two above): the checks, and the given
    # tensors back, as the kernels return them.
    @torch.library.register_fake(f"{namespace}::backward.out")
    def _backward_out_fake(grad_output, input, weight, mean, invstd, r, d, train, output_mask,
                           *, grad_input, grad_weight, grad_bias):
        _check_devices("backward.out", input, grad_output=grad_output, weight=weight, mean=mean,
                       invstd=invstd, r=r, d=d, grad_input=grad_input, grad_weight=grad_weight,
                       grad_bias=grad_bias)
        return grad_input, grad_weight, grad_bias

    @torch.library.register_fake(f"{namespace}::backward_relu.out")
    def _backward_relu_out_fake(grad_output, relu_output, input, weight, mean, invstd, r, d,
                                train, output_mask, *, grad_input, grad_weight, grad_bias):
        _check_devices("backward_relu.out", input, grad_output=grad_output,
                       relu_output=relu_output, weight=weight, mean=mean, invstd=invstd, r=r,
                       d=d, grad_input=grad_input, grad_weight=grad_weight, grad_bias=grad_bias)
        return grad_input, grad_weight, grad_bias

    @torch.library.register_fake(f"{namespace}::batch_stats")
    def _batch_stats_fake(input):
        _check_devices("batch_stats", input)
        return _per_channel_like(input, 2)

    @torch.library.register_fake(f"{namespace}::normalize")
    def _normalize_fake(input, scale, shift):
        _check_devices("normalize", input, scale=scale, shift=shift)
        return torch.empty_like(input, memory_format=memory_format_of(input))

    @torch.library.register_fake(f"{namespace}::backward_reduce")
    def _backward_reduce_fake(grad_output, input, mean, invstd):
        _check_devices("backward_reduce", input, grad_output=grad_output, mean=mean,
                       invstd=invstd)
        return _per_channel_like(input, 2)

    @torch.library.register_fake(f"{namespace}::backward_input")
    def _backward_input_fake(grad_output, input, mean, invstd, scale, mean_dy, mean_dy_xhat):
        _check_devices("backward_input", input, grad_output=grad_output, mean=mean,
                       invstd=invstd, scale=scale, mean_dy=mean_dy, mean_dy_xhat=mean_dy_xhat)
        return torch.empty_like(input, memory_format=memory_format_of(input))


if _C is not None:
    register_fakes("batchrenorm")
    register_vmaps("batchrenorm")

# The op namespace batch_renorm's fused path calls. Tests point it at another namespace with the
# same schemas (batchrenorm_cuda._testing.fused_ops_namespace: the CUDA emulation).
OPS = torch.ops.batchrenorm

