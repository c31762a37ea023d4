"""torch.func.vmap rules of the fused ops (torch.library.register_vmap). Their autograd is in
C++ (csrc/batchrenorm_autograd.h): forward_train and forward_eval are differentiable ops, with a
double-differentiable backward when the graph is kept (create_graph=True, torch.func.grad).

A vmapped batch of B independent layers (an ensemble of critics, say) over (N, C, *) input is
one layer over (N, B*C, *): each member's channels are channels of their own, so one fused call
does all B. Per-channel tensors fold to (B*C,) the same way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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


def register_vmaps(namespace: str) -> None:
    """The vmap rules of forward_train and forward_eval in `namespace` ("batchrenorm", or a test
    namespace with the same schemas)."""
    ops = getattr(torch.ops, namespace)

    @torch.library.register_vmap(f"{namespace}::forward_train")
    def _forward_train_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                            num_batches_tracked, *config):
        B = info.batch_size
        x_dim, w_dim, b_dim, rm_dim, rv_dim, step_dim = in_dims[:6]
        if running_mean is not None and (rm_dim is None or rv_dim is None):
            batched = [n for n, dim in (("input", x_dim), ("weight", w_dim), ("bias", b_dim))
                       if dim is not None]
            raise _unbatched_buffers_error(batched[0] if batched else "a member")
        if step_dim is not None:
            # Each member has its own step counter, hence its own clip bounds: one call each.
            outs = [ops.forward_train(
                *(t if t is None or dim is None else t.select(dim, i)
                  for t, dim in zip((input, weight, bias, running_mean, running_var,
                                     num_batches_tracked), in_dims[:6])), *config)
                for i in range(B)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * 5
        rm = _fold_channels(running_mean, rm_dim, B)
        rv = _fold_channels(running_var, rv_dim, B)
        y, mean, invstd, r, d = ops.forward_train(
            _fold_input(input, x_dim, B), _fold_channels(weight, w_dim, B),
            _fold_channels(bias, b_dim, B), rm, rv, num_batches_tracked, *config)
        _store_back(running_mean, rm_dim, rm)
        _store_back(running_var, rv_dim, rv)
        per_member = tuple(t.view(B, -1) for t in (mean, invstd, r, d))
        return (_unfold_output(y, B), *per_member), (1, 0, 0, 0, 0)

    @torch.library.register_vmap(f"{namespace}::forward_eval")
    def _forward_eval_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
        # Eval only reads the buffers, so unbatched ones are shared by every member.
        B = info.batch_size
        y = ops.forward_eval(*(f(t, dim, B) for f, t, dim in zip(
            (_fold_input,) + (_fold_channels,) * 4,
            (input, weight, bias, running_mean, running_var), in_dims[:5])), eps)
        return _unfold_output(y, B), 1
