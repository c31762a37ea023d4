"""How Inductor should lay out `backward`'s grad_output: in input's stride order.

Why: on the CPU Inductor runs convolutions in channels_last even in an NCHW model, but only up to
the last convolution; past it, buffers keep the eager (NCHW) strides. So the gradient reaching
the Batch Renorm layer after the last convolution comes in NCHW while the layer's input, the
convolution's output, is channels_last, and the kernel must convert one of them (4-layer CNN,
(8, 128, 32, 32): 12.1 ms against 0.75 ms with matching layouts). BatchNorm escapes this
because Inductor decomposes it; our ops are extern kernels. Asking Inductor for grad_output in
input's stride order lets the fused kernel that computes the gradient (ReLU's backward, say)
write it in that order at no cost. benchmarks/NOTES.md, issue 22, has the measurements.

Inductor has no public API for an op's layout constraint (the schema tags offer the eager
strides, exact or contiguous ones, or none), so this uses its lowering registry; `backward`'s
schema carries no layout tag because a tag would win over the registered constraint. Every use
of Inductor's private names is here, guarded: if they move in a later torch, the constraint is
skipped with one warning and Inductor applies its default for custom ops (correct, slower).

Registration is lazy: importing torch._inductor costs about 1.5 s, so the package never does.
The fake kernel of `backward` calls `register_backward_layout` while AOTAutograd traces a
backward graph, which happens before Inductor lowers it; if Inductor is not loaded by then,
nothing is compiled with it and there is nothing to do.
"""
from __future__ import annotations

import sys
import warnings

import torch

_REGISTERED: set = set()


def _grad_output_in_input_order(fx_node, *args, **kwargs):
    try:
        return _constrain(*args), kwargs
    except Exception as e:  # pragma: no cover - depends on Inductor's private API
        # Inductor's IR helpers differ across torch releases. Without the constraint the op
        # gets what Inductor has, and the kernel converts grad_output itself: correct, slower.
        _warn_once(f"could not apply backward's layout constraint ({type(e).__name__}: {e})")
        return args, kwargs


def _constrain(grad_output, input, *rest):
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    # Fix input's layout now, as the fallback kernel would next (ExternKernel.process_kernel),
    # so that the order read here is the one the kernel gets. In a backward graph input is a
    # saved activation, whose layout is already fixed.
    input = ir.ExternKernel.realize_input(input)
    if ir.is_storage_and_layout(input):
        ir.as_storage_and_layout(input, freeze=True)
    # Strides may be symbolic (dynamic shapes): the shape environment orders them.
    order = ir.get_stride_order(input.get_stride(), V.graph.sizevars.shape_env)
    grad_output = ir.ExternKernel.require_stride_order(grad_output, order)
    return (grad_output, input, *rest)


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"batchrenorm_cuda: {message}; compiled backward passes may copy "
                      "grad_output to input's layout", RuntimeWarning, stacklevel=3)


def register_backward_layout(op: torch._ops.OpOverload) -> None:
    """Give `op` (a namespace's backward.default) its Inductor fallback with the constraint
    above, once per op, if Inductor is loaded."""
    if op in _REGISTERED or "torch._inductor.lowering" not in sys.modules:
        return
    _REGISTERED.add(op)
    try:
        from torch._inductor.lowering import make_fallback

        make_fallback(op, layout_constraint=_grad_output_in_input_order, warn=False)
    except Exception as e:  # pragma: no cover - depends on Inductor's private API
        _warn_once(f"could not register {op}'s layout constraint with Inductor "
                   f"({type(e).__name__}: {e})")
