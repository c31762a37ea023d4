"""BatchRenorm1d/2d/3d: drop-in replacements for nn.BatchNorm1d/2d/3d (convert.py swaps them in).

The buffers keep nn.BatchNorm's names and meaning (running_mean, running_var unbiased,
num_batches_tracked), so state_dicts move between the two unchanged. num_batches_tracked also
drives the r_max / d_max schedule; the schedule's hyperparameters travel in the state_dict's
metadata, so a checkpoint restores the schedule with it.
"""
from __future__ import annotations

import numbers
import warnings
from typing import NoReturn, Optional, Tuple, Union

import torch
import torch._dynamo
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from . import reference
from ._common import check_backend, check_hyperparameters, in_float32
from .functional import batch_renorm_scheduled



_ARGS_DOC = """
    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to the variances before the square root, as in nn.BatchNorm. Default 1e-5.
        momentum: the running averages' update factor, running = (1 - momentum) * running +
            momentum * batch; None is a cumulative average (as in nn.BatchNorm). Default 0.01,
            not BatchNorm's 0.1: r and d correct each batch towards the running statistics, so
            those must be a smooth estimate of the population's, not of the last few batches
            (the paper uses 0.01 with batches of 32). 0.1 broke training with microbatches
            of 2 in our accuracy experiment (README, "Does it help?"); for a short run, keep
            0.01 and scale the schedule with schedule_for(total_steps).
        affine: learnable per-channel weight (init 1) and bias (init 0). Default True.
        track_running_stats: keep running_mean, running_var and num_batches_tracked. False
            normalises with the batch's own statistics in eval too and makes training plain
            BatchNorm (r = 1, d = 0), as nn.BatchNorm does. Default True.
        r_max: final bound of r = clip(sigma_B / sigma, 1/r_max, r_max), >= 1. Default 3.
        d_max: final bound of d = clip((mu_B - running_mean) / sigma, -d_max, d_max), >= 0.
            Default 5.
        warmup_steps: training steps of plain BatchNorm (r_max = 1, d_max = 0) before the
            bounds relax. Default 5000, the paper's: at the start the running statistics are
            their initial 0 and 1 and say nothing yet, so correcting towards them would hurt;
            the warm-up should span several averaging windows (1 / momentum steps each).
            For runs shorter than the paper's, schedule_for(total_steps) gives all three.
            nn.BatchNorm has no such phase; set warmup_steps, r_max_ramp_steps and
            d_max_ramp_steps to 0 for the final bounds from the first step, or ramps of 0 for
            a hard switch after the warm-up (CrossQ's use).
        r_max_ramp_steps: steps after the warm-up over which r_max rises linearly from 1 to
            r_max. Default 35000 (r_max reached at step 40k, as in the paper).
        d_max_ramp_steps: the same for d_max, from 0. Default 20000 (reached at 25k).
        device, dtype: of the parameters and buffers, as in nn.BatchNorm. float16 and bfloat16
            parameters and buffers (model.half()) are accepted: each call computes with float32
            copies and stores the buffers back.
        bias: learn a bias when affine (keyword-only, as nn.BatchNorm's). Default True.
        backend: "auto" (the fused kernels of the input's device when built, else the
            pure-PyTorch reference), "fused" (require the kernels) or "reference"
            (keyword-only). Default "auto".

    The buffers have nn.BatchNorm's names and meaning, so state_dicts move between the two;
    num_batches_tracked also drives the r_max / d_max schedule, so a checkpoint restores it.
    Eval is exactly nn.BatchNorm's eval, and torch.export decomposes it to aten batch_norm.
    torch.jit.script is not supported (it raises and says what to use instead).
"""


@torch.fx.wrap
def _module_forward(module: "_BatchRenorm", input: Tensor) -> Tensor:
    """The body of _BatchRenorm.forward. A wrapped function so that torch.fx.symbolic_trace
    records one call taking the module (the checks branch on the input's shape, which a tracer
    cannot follow), and the traced graph still reads the module's training flag when it runs."""
    caller = module._caller
    momentum, eps, r_max, d_max = module.momentum, module.eps, module.r_max, module.d_max
    backend = module.backend
    _check_module_input(module, input)
    weight, bias, running_mean, running_var, store_back = in_float32(module)
    if module.training and module.track_running_stats:
        output = batch_renorm_scheduled(
            input, running_mean, running_var, weight, bias, True, momentum, eps, r_max, d_max,
            num_batches_tracked=module.num_batches_tracked, warmup_steps=module.warmup_steps,
            r_max_ramp_steps=module.r_max_ramp_steps, d_max_ramp_steps=module.d_max_ramp_steps,
            backend=backend, caller=caller)
        if store_back is not None:
            store_back()
        return output
    # As nn.BatchNorm: without running statistics, normalise with the batch's own in eval too;
    # with them, eval is plain inference.
    use_batch_stats = running_mean is None
    return batch_renorm_scheduled(input, running_mean, running_var, weight, bias, use_batch_stats,
                         momentum, eps, r_max, d_max, backend=backend, caller=caller)


def _check_module_input(module: "_BatchRenorm", input: Tensor) -> None:
    # The messages' names are read only when raising: under torch.compile each attribute read
    # on the way is a guard on every compiled step, per layer.
    if not isinstance(input, Tensor):
        raise TypeError(f"{module._caller}: input must be a Tensor, got {type(input).__name__}")
    ranks = module._expected_ranks
    if ranks and input.dim() not in ranks:  # SyncBatchRenorm (no ranks) checks rank >= 2
        got = f"{input.dim()}D input of shape {tuple(input.shape)}"
        raise ValueError(f"{module._caller}: expected {module._shape_name} input, got {got}")
    if input.shape[1] != module.num_features:
        raise ValueError(f"{module._caller}: input has {input.shape[1]} channels "
                         f"(dim 1), expected num_features={module.num_features}")


def _check_step_count(caller: str, name: str, value: object) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{caller}: {name} must be a non-negative integer, got "
                        f"{type(value).__name__} {value!r}")
    if not (value >= 0 and float(value).is_integer()):  # inf and NaN fail too
        raise ValueError(f"{caller}: {name} must be a non-negative integer, got {value!r}")


_SCHEDULE = ("r_max", "d_max", "warmup_steps", "r_max_ramp_steps", "d_max_ramp_steps")
_SCHEDULE_KEY = "batchrenorm_schedule"


class _BatchRenorm(_NormBase):
    _expected_ranks: Tuple[int, ...] = ()
    _shape_name = ""
    # The class's name, for messages: a class attribute that torch.compile guards in C++, where
    # type(module).__name__ in the forward cost a Python guard `type(a) is type(b)` per layer.
    _caller = "_BatchRenorm"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._caller = cls.__name__
        # torch.compile treats our classes as it treats torch.nn's own (nn.BatchNorm2d): their
        # buffers get no no-aliasing guard and their int attributes stay constants. As user
        # classes, their in-place buffer updates cost every compiled step a guard over all the
        # model's buffers (ResNet-18/4: -100 us a step, benchmarks/NOTES.md, issue 22). A user's
        # subclass stays a user class, as a subclass of nn.BatchNorm2d does.
        if cls.__module__.startswith(__package__ + "."):
            torch._dynamo.mark_static(cls)
        else:
            cls._dynamo_marked_static = False  # what mark_static sets, not inherited from ours

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
        device: Union[torch.device, str, int, None] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        """See the class docstring for every argument."""
        name = type(self).__name__
        check_hyperparameters(name, momentum, eps, r_max, d_max)
        for arg, value in (("warmup_steps", warmup_steps), ("r_max_ramp_steps", r_max_ramp_steps),
                           ("d_max_ramp_steps", d_max_ramp_steps)):
            _check_step_count(name, arg, value)
        check_backend(name, backend)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            # Set here rather than passed on: _NormBase takes bias= only from torch 2.6 on.
            self.register_parameter("bias", None)
        self.r_max: float = float(r_max)
        self.d_max: float = float(d_max)
        self.warmup_steps: int = int(warmup_steps)
        self.r_max_ramp_steps: int = int(r_max_ramp_steps)
        self.d_max_ramp_steps: int = int(d_max_ramp_steps)
        self.backend: str = backend

    def _check_input_dim(self, input: Tensor) -> None:
        _check_module_input(self, input)

    def clip_bounds(self) -> Tuple[float, float]:
        """(r_max, d_max) that the next training step will use, for logging.

        Reads the step counter, so it synchronises with the device; the training step itself
        never does. Without running statistics there is nothing to correct towards: (1, 0).
        """
        if not self.track_running_stats:
            return 1.0, 0.0
        r_max, d_max = reference.clip_bounds(self.num_batches_tracked, self.r_max, self.d_max,
                                             self.warmup_steps, self.r_max_ramp_steps,
                                             self.d_max_ramp_steps)
        return float(r_max), float(d_max)

    def forward(self, input: Tensor) -> Tensor:
        return _module_forward(self, input)

    # The schedule is saved in the state_dict's metadata (state_dict()._metadata[prefix], where
    # torch keeps each module's version), not as a key: the keys stay nn.BatchNorm's, so a
    # checkpoint still loads strictly into nn.BatchNorm and back. On load the checkpoint's
    # schedule replaces the constructor's, with a warning when they differ: num_batches_tracked
    # comes from the checkpoint, and the bounds must continue from it as they were. A state_dict
    # without it (an older one, nn.BatchNorm's, or a plain dict copy) keeps the constructor's.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})[_SCHEDULE_KEY] = {
                k: getattr(self, k) for k in _SCHEDULE}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = (local_metadata or {}).get(_SCHEDULE_KEY)
        if saved is not None:
            name = type(self).__name__
            if not isinstance(saved, dict) or set(saved) != set(_SCHEDULE):
                raise ValueError(f"{name}: the checkpoint's schedule for '{prefix[:-1]}' must be "
                                 f"a dict with keys {_SCHEDULE}, got {saved!r}")
            check_hyperparameters(name, self.momentum, self.eps, saved["r_max"],
                                  saved["d_max"])
            for k in _SCHEDULE[2:]:
                _check_step_count(name, f"the checkpoint's {k} for '{prefix[:-1]}'", saved[k])
            changed = {k: (getattr(self, k), saved[k]) for k in _SCHEDULE
                       if getattr(self, k) != saved[k]}
            if changed:
                warnings.warn(
                    f"{name} '{prefix[:-1]}': the checkpoint's schedule replaces the "
                    "constructor's: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                  changed.items()), UserWarning, stacklevel=4)
            for k in _SCHEDULE:
                setattr(self, k, float(saved[k]) if k in ("r_max", "d_max") else int(saved[k]))
        self._warn_if_counter_missing(state_dict, prefix, local_metadata, strict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _warn_if_counter_missing(self, state_dict, prefix, local_metadata, strict) -> None:
        # nn.BatchNorm fills a missing num_batches_tracked in silently (state_dicts from before
        # the counter existed, or a plain dict copy, which has no version). There the counter
        # rarely matters; here it is the schedule's position, so say that it restarted.
        if not self.track_running_stats or prefix + "num_batches_tracked" in state_dict:
            return
        version = (local_metadata or {}).get("version")
        if strict and version is not None and version >= 2:
            return  # strict loading reports the missing key as an error
        counter = self.num_batches_tracked
        kept = "unchanged" if counter.is_meta else int(counter)
        warnings.warn(
            f"{type(self).__name__} '{prefix[:-1]}': the state_dict has no num_batches_tracked, "
            f"so the step counter that drives the r_max/d_max schedule is not restored: it "
            f"stays at {kept} (0 for a new layer, which restarts the schedule: "
            f"{self.warmup_steps} warm-up steps with r_max=1, d_max=0, then the ramps). Load a "
            "state_dict that has it, or set num_batches_tracked, to continue the schedule.",
            UserWarning, stacklevel=4)

    def __prepare_scriptable__(self) -> NoReturn:
        # torch.jit.script calls this on every submodule before compiling it.
        name = type(self).__name__
        raise RuntimeError(
            f"{name} does not support torch.jit.script (TorchScript cannot compile its Python "
            "forward, which picks the backend and checks the input). For speed use "
            "torch.compile; to export, use torch.export (eval decomposes to aten batch_norm) "
            "or batchrenorm_cuda.revert_batchnorm(model), "
            f"which turns every {name} into an nn.BatchNorm with the same weights and buffers "
            "(eval is identical).")

    def extra_repr(self) -> str:
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
                f"d_max_ramp_steps={self.d_max_ramp_steps}{backend}")


class BatchRenorm1d(_BatchRenorm):
    __doc__ = """Batch Renorm over (N, C) or (N, C, L) input; a drop-in for nn.BatchNorm1d.
""" + _ARGS_DOC

    _expected_ranks = (2, 3)
    _shape_name = "2D or 3D (N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    __doc__ = """Batch Renorm over (N, C, H, W) input; a drop-in for nn.BatchNorm2d.
""" + _ARGS_DOC

    _expected_ranks = (4,)
    _shape_name = "4D (N, C, H, W)"


class BatchRenorm3d(_BatchRenorm):
    __doc__ = """Batch Renorm over (N, C, D, H, W) input; a drop-in for nn.BatchNorm3d.
""" + _ARGS_DOC

    _expected_ranks = (5,)
    _shape_name = "5D (N, C, D, H, W)"
