"""The autograd Functions over the fused ops, with what nn.BatchNorm users expect of them:
torch.func transforms (setup_context, a vmap rule) and double backward.

Backward runs the fused `backward` op when it can. When the backward itself has to be
differentiable (create_graph=True: gradient penalties, meta-learning) or runs under a torch.func
transform (jacrev, vmap of grad), it is computed from ordinary ops instead (_composite_*), which
autograd and functorch both see through.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from .reference import stat_dtype


def _channel_shape(x: Tensor):
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor):
    return (0,) + tuple(range(2, x.dim()))


def _needs_composite(*tensors: Optional[Tensor]) -> bool:
    # Grad mode on inside backward means create_graph=True. Wrapped tensors mean a torch.func
    # transform, which our ops have no rule for.
    if torch.is_grad_enabled():
        return True
    if torch.compiler.is_compiling():  # Dynamo cannot trace the functorch query (no transform)
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


def _composite_train_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                              r: Tensor, d: Tensor, eps: float, mask):
    """BatchNorm's backward with weight * r as the scale, in differentiable ops. The batch
    statistics are recomputed from input (the saved ones are constants) so that a second
    derivative flows through them."""
    sdt = stat_dtype(input.dtype)
    x, gy = input.to(sdt), grad_output.to(sdt)
    dims, shape = _reduce_dims(x), _channel_shape(x)
    mean = x.mean(dims, keepdim=True)
    invstd = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    xhat = (x - mean) * invstd
    sum_dy = gy.sum(dims)
    sum_dy_xhat = (gy * xhat).sum(dims)
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        scale = r if weight is None else weight * r
        count = x.numel() // x.shape[1]
        grad_input = (scale.view(shape) * invstd
                      * (gy - (sum_dy / count).view(shape)
                         - xhat * (sum_dy_xhat / count).view(shape))).to(input.dtype)
    if mask[1]:
        grad_weight = r * sum_dy_xhat + d * sum_dy
    if mask[2]:
        grad_bias = sum_dy
    return grad_input, grad_weight, grad_bias


def _composite_eval_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                             running_mean: Tensor, running_var: Tensor, eps: float, mask):
    sdt = stat_dtype(input.dtype)
    gy = grad_output.to(sdt)
    dims, shape = _reduce_dims(gy), _channel_shape(gy)
    invstd = torch.rsqrt(running_var + eps)
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        scale = invstd if weight is None else weight * invstd
        grad_input = (gy * scale.view(shape)).to(input.dtype)
    if mask[1]:
        xhat = (input.to(sdt) - running_mean.view(shape)) * invstd.view(shape)
        grad_weight = (gy * xhat).sum(dims)
    if mask[2]:
        grad_bias = gy.sum(dims)
    return grad_input, grad_weight, grad_bias


def _output_mask(ctx, has_weight: bool, has_bias: bool):
    return [ctx.needs_input_grad[0], has_weight and ctx.needs_input_grad[1],
            has_bias and ctx.needs_input_grad[2]]


# ---------------------------------------------------------------------------------------------
# vmap. A vmapped batch of B independent layers (an ensemble of critics, say) over (N, C, *)
# input is one layer over (N, B*C, *): each member's channels are channels of their own, so one
# fused call does all B. Per-channel tensors fold to (B*C,) the same way.

def _fold_input(x: Tensor, bdim: Optional[int], B: int) -> Tensor:
    if bdim is None:
        x = x.unsqueeze(1).expand(x.shape[0], B, *x.shape[1:])
    else:
        x = x.movedim(bdim, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _fold_channels(t: Optional[Tensor], bdim: Optional[int], B: int) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.expand(B, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.reshape(-1)


def _unfold_output(y: Tensor, B: int) -> Tensor:
    return y.view(y.shape[0], B, -1, *y.shape[2:])  # member dim at 1


def _store_back(buffer: Optional[Tensor], bdim: Optional[int], folded: Optional[Tensor]):
    # A folded buffer is a view of the batched one only when the member dim was outermost and
    # contiguous; otherwise the update went to a copy and is written back.
    if buffer is None:
        return
    target = buffer.movedim(bdim, 0)
    if folded.data_ptr() != target.data_ptr() or not target.is_contiguous():
        target.copy_(folded.view(target.shape))


def _unbatched_buffers_error(what: str) -> ValueError:
    return ValueError(
        f"batch_renorm under vmap: {what} is batched but running_mean/running_var are not, and "
        "training updates them in place. Batch them too (torch.func.stack_module_state gives "
        "each member its own buffers), or use track_running_stats=False")


class FusedTrain(torch.autograd.Function):
    """A training step through batchrenorm::forward_train; backward through batchrenorm::backward.

    r and d are constants for autograd, so backward is BatchNorm's with weight * r as the scale.
    forward returns (output, mean, invstd, r, d) so that setup_context can save the statistics;
    callers take [0].
    """

    @staticmethod
    def forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], config: tuple):
        # config = (momentum, eps, r_max, d_max, warmup_steps, r_max_ramp_steps,
        # d_max_ramp_steps): one argument rather than seven, because apply() walks every
        # argument on each call and this is the per-layer eager overhead.
        return _ops.OPS.forward_train(input, weight, bias, running_mean, running_var,
                                      num_batches_tracked, *config)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, bias, _, _, _, config = inputs
        _, mean, invstd, r, d = outputs
        ctx.mark_non_differentiable(mean, invstd, r, d)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, weight, mean, invstd, r, d)
        ctx.has_bias = bias is not None
        ctx.eps = config[1]

    @staticmethod
    def backward(ctx, grad_output: Optional[Tensor], *unused):
        input, weight, mean, invstd, r, d = ctx.saved_tensors
        mask = _output_mask(ctx, weight is not None, ctx.has_bias)
        if grad_output is None:
            return (None,) * 7
        if _needs_composite(grad_output, input, weight, mean):
            grads = _composite_train_backward(grad_output, input, weight, r, d, ctx.eps, mask)
        else:
            grads = _ops.OPS.backward(grad_output, input, weight, mean, invstd, r, d, True, mask)
        return (*grads, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var,
             num_batches_tracked, config):
        B = info.batch_size
        x_dim, w_dim, b_dim, rm_dim, rv_dim, step_dim, _ = in_dims
        if running_mean is not None and (rm_dim is None or rv_dim is None):
            batched = [n for n, dim in (("input", x_dim), ("weight", w_dim), ("bias", b_dim))
                       if dim is not None]
            raise _unbatched_buffers_error(batched[0] if batched else "a member")
        if step_dim is not None:
            # Each member has its own step counter, hence its own clip bounds: one call each.
            outs = [FusedTrain.forward(
                *(t if t is None or dim is None else t.select(dim, i)
                  for t, dim in zip((input, weight, bias, running_mean, running_var,
                                     num_batches_tracked), in_dims[:6])), config)
                for i in range(B)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * 5
        rm = _fold_channels(running_mean, rm_dim, B)
        rv = _fold_channels(running_var, rv_dim, B)
        y, mean, invstd, r, d = FusedTrain.forward(
            _fold_input(input, x_dim, B), _fold_channels(weight, w_dim, B),
            _fold_channels(bias, b_dim, B), rm, rv, num_batches_tracked, config)
        _store_back(running_mean, rm_dim, rm)
        _store_back(running_var, rv_dim, rv)
        per_member = tuple(t.view(B, -1) for t in (mean, invstd, r, d))
        return (_unfold_output(y, B), *per_member), (1, 0, 0, 0, 0)


class FusedEval(torch.autograd.Function):
    """Inference with the running statistics (nn.BatchNorm's eval), differentiable in x, weight
    and bias for fine-tuning with frozen statistics."""

    @staticmethod
    def forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
        return _ops.OPS.forward_eval(input, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps = inputs
        ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.has_bias = bias is not None
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, running_mean, running_var = ctx.saved_tensors
        mask = _output_mask(ctx, weight is not None, ctx.has_bias)
        if _needs_composite(grad_output, input, weight, running_mean):
            grads = _composite_eval_backward(grad_output, input, weight, running_mean,
                                             running_var, ctx.eps, mask)
        else:
            invstd = torch.rsqrt(running_var + ctx.eps)
            grads = _ops.OPS.backward(grad_output, input, weight, running_mean, invstd, None,
                                      None, False, mask)
        return (*grads, None, None, None)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
        # Eval only reads the buffers, so unbatched ones are shared by every member.
        B = info.batch_size
        y = FusedEval.forward(*(f(t, dim, B) for f, t, dim in zip(
            (_fold_input,) + (_fold_channels,) * 4,
            (input, weight, bias, running_mean, running_var), in_dims[:5])), eps)
        return _unfold_output(y, B), 1
