"""What Inductor is told of our backward ops: a layout constraint (grad_output in input's stride
order), two rewrites (a ReLU's backward fused into ours; a preceding bias's gradient, exactly
zero, not summed), and where it may call their out= overloads.

The constraint. Why: on the CPU Inductor runs convolutions in channels_last even in an NCHW model,
but only up to the last convolution; past it, buffers keep the eager (NCHW) strides. So the
gradient reaching the Batch Renorm layer after the last convolution comes in NCHW while the layer's
input, the convolution's output, is channels_last, and the kernel must convert one of them (4-layer
CNN, (8, 128, 32, 32): 12.1 ms against 0.75 ms with matching layouts). BatchNorm escapes this
because Inductor decomposes it; our ops are extern kernels. Asking Inductor for grad_output in
input's stride order lets the fused kernel that computes the gradient (ReLU's backward, say) write
it in that order at no cost. benchmarks/NOTES.md, issue 22, has the measurements.

Inductor has no public API for an op's layout constraint (the schema tags offer the eager
strides, exact or contiguous ones, or none), so this uses its lowering registry; `backward`'s
schema carries no layout tag because a tag would win over the registered constraint. Every use
of Inductor's private names is here, guarded: if they move in a later torch, the constraint is
skipped with one warning and Inductor applies its default for custom ops (correct, slower).

Registration is lazy: importing torch._inductor costs about 1.5 s, so the package never does.
The fake kernel of `backward` calls `register_with_inductor` while AOTAutograd traces a
backward graph, which happens before Inductor lowers it; if Inductor is not loaded by then,
nothing is compiled with it and there is nothing to do.

The rewrite. The same registration adds one to Inductor's post-grad pattern passes (its own list,
not the user's `post_grad_custom_*_pass` slots): ReLU's backward feeding ours,
`backward(where(le(relu_output, 0), 0, grad), ...)`, becomes `backward_relu(grad, relu_output,
...)`, which masks the gradient as it loads it instead of reading a masked copy that Inductor
wrote. Only where relu_output is a saved activation (already in memory: the next layer's input) and
every user of the masked gradient is one of our backwards, so that the rewrite never makes Inductor
write a tensor it would not have written. The values are the unfused graph's.

The second rewrite: the gradient of a per-channel shift before our layer (a Linear's bias, x + b)
is sum(grad_input) over every dim but the channels', and in training that sum is exactly 0 (the
batch mean absorbs the shift; r and d are constants of the gradient). Inductor cannot know it and
reads the whole grad_input once more to sum it, each step: 1 MB a layer of the CrossQ critic's
(512, 512). A later pass replaces the sum by zeros computed from per-channel values, NaN where the
sum would be NaN (_rewrite_shift_sum says how), for our training backwards only, only sums over
exactly those dims, and only where grad_input has another user. The kernels' sum was that zero's
rounding error (~1e-8); nn.BatchNorm's compiled one is too.

The out= overloads. `backward.out` and `backward_relu.out` carry the schema tag `out`, so that
Inductor (torch 2.13) lowers the functional ops to them and passes output buffers it plans and
reuses within the graph, where the functional op allocates three new tensors a call (the bytes
of our output at every call, under glibc's default allocator fresh pages from mmap for large
ones). Its multi-output out= lowering fails on symbolic sizes (dynamic shapes), so there the
overloads are hidden from it while it lowers our op, which keeps its functional form.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import sys
import warnings

import torch

# Namespaces registered; backward -> backward_relu of each; whether the rewrites are registered.
_REGISTERED: set = set()
_FUSED_RELU: dict = {}
_REWRITES_REGISTERED = False


def _layout_constraint(constrained: tuple, input_index: int):
    """A lowering's layout constraint: the arguments at `constrained` (gradient-shaped tensors)
    in the stride order of the argument at `input_index`."""

    def constraint(fx_node, *args, **kwargs):
        try:
            return _constrain(args, constrained, input_index), kwargs
        except Exception as e:  # pragma: no cover - depends on Inductor's private API
            # Inductor's IR helpers differ across torch releases. Without the constraint the op
            # gets what Inductor has, and the kernel converts the gradient itself: correct,
            # slower.
            _warn_once(f"could not apply backward's layout constraint ({type(e).__name__}: {e})")
            return args, kwargs

    return constraint


def _constrain(args: tuple, constrained: tuple, input_index: int) -> tuple:
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    args = list(args)
    # Fix input's layout now, as the fallback kernel would next (ExternKernel.process_kernel),
    # so that the order read here is the one the kernel gets. In a backward graph input is a
    # saved activation, whose layout is already fixed.
    input = ir.ExternKernel.realize_input(args[input_index])
    if ir.is_storage_and_layout(input):
        ir.as_storage_and_layout(input, freeze=True)
    args[input_index] = input
    # Strides may be symbolic (dynamic shapes): the shape environment orders them.
    order = ir.get_stride_order(input.get_stride(), V.graph.sizevars.shape_env)
    for i in constrained:
        args[i] = ir.ExternKernel.require_stride_order(args[i], order)
    return tuple(args)


_WARNED: set = set()


def _warn_once(message: str, layouts: bool = True) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        consequence = ("; compiled backward passes may copy grad_output to input's layout"
                       if layouts else "")
        warnings.warn(f"batchrenorm_cuda: {message}{consequence}", RuntimeWarning, stacklevel=3)


def register_with_inductor(namespace) -> None:
    """Give `namespace`'s backward and backward_relu (an op namespace with batchrenorm's
    schemas) their Inductor fallbacks with the constraints above, and the ReLU rewrite, once per
    namespace, if Inductor is loaded."""
    if namespace in _REGISTERED or "torch._inductor.lowering" not in sys.modules:
        return
    _REGISTERED.add(namespace)
    backward, backward_relu = namespace.backward.default, namespace.backward_relu.default
    try:
        from torch._inductor.lowering import make_fallback

        # backward(grad_output, input, ...); backward_relu(grad_output, relu_output, input, ...)
        make_fallback(backward, layout_constraint=_layout_constraint((0,), 1), warn=False)
        make_fallback(backward_relu, layout_constraint=_layout_constraint((0, 1), 2), warn=False)
        _functional_where_sizes_are_symbolic(backward, backward_relu)
    except Exception as e:  # pragma: no cover - depends on Inductor's private API
        _warn_once(f"could not register {backward}'s layout constraint with Inductor "
                   f"({type(e).__name__}: {e})")
    _FUSED_RELU[backward] = backward_relu
    try:
        _register_rewrites()
    except Exception as e:  # pragma: no cover - depends on Inductor's private API
        _warn_once(f"could not register the backward rewrites with Inductor "
                   f"({type(e).__name__}: {e}); ReLU's backward and a preceding bias's "
                   "gradient run as their own kernels", layouts=False)


def _functional_where_sizes_are_symbolic(*ops) -> None:
    """Inductor lowers our backwards to their out= overloads (tagged `out`), which lets it plan
    and reuse their output buffers; but its multi-output out= lowering (torch 2.13,
    ExternKernelMultiOut) fails on symbolic sizes (dynamic shapes, which a smaller last batch
    turns on). There the overloads are hidden from it while it lowers the op, which then keeps
    its functional form."""
    import sympy
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings

    try:
        from torch._library import _out_variant  # noqa: F401
    except ImportError:  # torch < 2.13: no out= lowering (nor tag) to hide
        return

    def static(arg) -> bool:
        return (not isinstance(arg, ir.IRNode)
                or all(isinstance(s, (int, sympy.Integer)) for s in arg.get_size()))

    for op in ops:
        handler = lowerings[op]

        def lowering(*args, handler=handler, **kwargs):
            if all(static(a) for a in args):
                return handler(*args, **kwargs)
            with _out_overloads_hidden(ops):
                return handler(*args, **kwargs)

        lowering._is_fallback_handler = True  # what make_fallback's handler says of itself
        lowerings[op] = lowering


@contextlib.contextmanager
def _out_overloads_hidden(ops):
    from torch._library import _out_variant

    find = _out_variant.to_out_variant
    _out_variant.to_out_variant = lambda op: None if op in ops else find(op)
    try:
        yield
    finally:
        _out_variant.to_out_variant = find


def _register_rewrites() -> None:
    global _REWRITES_REGISTERED
    if _REWRITES_REGISTERED:
        return
    from torch._inductor.fx_passes.post_grad import pass_patterns
    from torch._inductor.pattern_matcher import (MULTIPLE, CallFunction, KeywordArg,
                                                 register_graph_pattern)

    aten = torch.ops.aten
    # ReLU's backward as AOTAutograd decomposes threshold_backward(grad, relu_output, 0).
    pattern = CallFunction(aten.where.self,
                           CallFunction(aten.le.Scalar, KeywordArg("relu_output"), 0,
                                        _users=MULTIPLE),
                           KeywordArg("zero"), KeywordArg("grad"))
    register_graph_pattern(pattern, pass_dict=pass_patterns[0])(_fuse_relu_backward)
    # A Linear's bias gradient, sum(grad, [0], keepdim=True), with and without keepdim given;
    # in the next pass, so that it sees the ReLU rewrite's ops.
    for args in ((KeywordArg("grad_input"), KeywordArg("dims")),
                 (KeywordArg("grad_input"), KeywordArg("dims"), KeywordArg("keepdim"))):
        register_graph_pattern(CallFunction(aten.sum.dim_IntList, *args),
                               pass_dict=pass_patterns[1])(_zero_shift_gradient)
    _REWRITES_REGISTERED = True


def _is_zero(value) -> bool:
    if isinstance(value, (int, float)):
        return value == 0
    return (isinstance(value, torch.fx.Node) and value.target is torch.ops.aten.full.default
            and list(value.args[0]) == [] and value.args[1] == 0)


def _fuse_relu_backward(match, relu_output, zero, grad) -> None:
    try:
        _rewrite(match.output_node(), relu_output, zero, grad)
    except Exception as e:  # pragma: no cover - depends on Inductor's private API
        # Each rewrite is whole before the next starts, so the graph stays valid.
        _warn_once(f"the ReLU backward rewrite failed ({type(e).__name__}: {e}); ReLU's "
                   "backward runs as its own kernel", layouts=False)


def _rewrite(where, relu_output, zero, grad) -> None:
    """backward(where(le(relu_output, 0), 0, grad), ...) -> backward_relu(grad, relu_output,
    ...) for every user of `where`, if all of them are our backwards and the rewrite is safe."""
    users = list(where.users)
    if not users or not _is_zero(zero) or relu_output.op != "placeholder":
        return
    if any(u.target not in _FUSED_RELU or u.args[0] is not where or where in u.args[1:]
           or u.kwargs for u in users):
        return
    # Every tensor of input's shape, dtype and device, as backward_relu requires (where() could
    # broadcast its operands or promote their dtype).
    vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None
            for n in [where, grad, relu_output] + [u.args[1] for u in users]]
    if not all(isinstance(t, torch.Tensor) and t.shape == vals[0].shape
               and t.dtype == vals[0].dtype and t.device == vals[0].device for t in vals):
        return
    graph = where.graph
    for user in users:
        with graph.inserting_before(user):
            fused = graph.call_function(_FUSED_RELU[user.target],
                                        (grad, relu_output) + tuple(user.args[1:]))
        fused.meta.update(user.meta)
        user.replace_all_uses_with(fused)
        graph.erase_node(user)
    le = where.args[0]
    graph.erase_node(where)
    if not le.users:
        graph.erase_node(le)


def _zero_shift_gradient(match, grad_input, dims, keepdim=False) -> None:
    try:
        _rewrite_shift_sum(match, match.output_node(), keepdim)
    except Exception as e:  # pragma: no cover - depends on Inductor's private API
        _warn_once(f"the bias gradient rewrite failed ({type(e).__name__}: {e}); the sum "
                   "runs as its own kernel", layouts=False)


def _rewrite_shift_sum(match, total, keepdim) -> None:
    """sum(grad_input, every dim but the channels') -> zeros carrying the NaNs of the
    gradient's inputs, where grad_input is our training backward's, for a per-channel shift
    before the layer (a Linear's bias: its gradient is that sum)."""
    grad_input = total.args[0]
    # grad_input must have another user: one left unused makes Inductor's out= lowering of our
    # op (torch 2.13) pass a buffer it never allocated.
    if (total.kwargs or not isinstance(grad_input, torch.fx.Node)
            or grad_input.target is not operator.getitem or grad_input.args[1] != 0
            or len(grad_input.users) < 2):
        return
    op = grad_input.args[0]
    if op.kwargs or (op.target not in _FUSED_RELU and op.target not in _FUSED_RELU.values()):
        return
    # backward(grad_output, input, weight, mean, invstd, r, d, train, output_mask);
    # backward_relu has relu_output second.
    weight, _mean, invstd, r, _d, train, mask = op.args[-7:]
    rank = grad_input.meta["val"].dim()
    reduced = sorted(dim % rank for dim in total.args[1]) if rank >= 2 else None
    if train is not True or not mask[1] or reduced != [0] + list(range(2, rank)):
        return
    grad_weight = next((u for u in op.users
                        if u.target is operator.getitem and u.args[1] == 1), None)
    if grad_weight is None:
        return
    dtype = total.meta["val"].dtype
    view = [1] * rank
    view[1] = -1

    def zeros(grad_weight, *factors):
        # In training the layer's output does not change when a constant is added to a channel
        # of its input: xhat = (x - mean_B) / sigma_B absorbs it, and r and d are constants of
        # the gradient. So this sum is exactly 0 (summing the kernel's grad_input gives its
        # rounding error). 0 * a term is 0 while the term is finite and NaN where it is not, so
        # the zeros are NaN where grad_input is: grad_input = weight * r * invstd * (dy -
        # mean(dy) - xhat * mean(dy * xhat)), and a NaN or inf in dy or xhat makes
        # grad_weight = r * sum(dy * xhat) + d * sum(dy) NaN. (A NaN running_mean alone, which
        # only d reads, gives NaN here where the sum would be 0: the layer's grad_weight is NaN
        # then too.)
        z = (grad_weight * 0 + functools.reduce(operator.mul, factors) * 0).to(dtype)
        return z.view(view) if keepdim else z

    factors = [t for t in (invstd, weight, r) if t is not None]
    match.replace_by_example(zeros, [grad_weight, *factors])
