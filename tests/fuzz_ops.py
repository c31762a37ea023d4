"""The op boundary: every torch.ops.batchrenorm.* op called directly with adversarial arguments.

Each call starts from valid arguments and mutates one or two of them: expanded (stride 0),
overlapping as_strided, slices from negative indices, transposed, on the meta device, of another
dtype, of another length or rank, empty, 0-d, None, sizes whose element count overflows 32 bits
(expanded, so nothing is allocated), and extreme scalars. A call must either raise
RuntimeError / ValueError / TypeError with a message, or return what a plain PyTorch model of
the op computes on contiguous copies; it must never crash or return a wrong answer.

    python tests/fuzz_ops.py --calls 12000            # part of `make fuzz`
    python tests/fuzz_ops.py --asan --calls 3000      # the same under an AddressSanitizer +
                                                      # UBSan build of the CPU extension
    python tests/fuzz_ops.py --repro SEED             # one call, described
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

SAFE_ERRORS = (RuntimeError, ValueError, TypeError)
OPS = ("forward_train", "forward_eval", "backward", "backward_relu", "batch_stats", "normalize",
       "backward_reduce", "backward_input")
# Tensor arguments of each op, in schema order (the scalars follow in `_scalars`).
TENSOR_ARGS = {
    "forward_train": ("input", "weight", "bias", "running_mean", "running_var",
                      "num_batches_tracked"),
    "forward_eval": ("input", "weight", "bias", "running_mean", "running_var"),
    "backward": ("grad_output", "input", "weight", "mean", "invstd", "r", "d"),
    "backward_relu": ("grad_output", "relu_output", "input", "weight", "mean", "invstd", "r",
                      "d"),
    "batch_stats": ("input",),
    "normalize": ("input", "scale", "shift"),
    "backward_reduce": ("grad_output", "input", "mean", "invstd"),
    "backward_input": ("grad_output", "input", "mean", "invstd", "scale", "mean_dy",
                       "mean_dy_xhat"),
}
MUTATIONS = ("expand", "overlap", "negative_slice", "transpose", "meta", "dtype", "length",
             "empty", "zero_dim", "none", "huge", "scalar", "valid")


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_values(t: torch.Tensor, kind: str, rng: random.Random) -> torch.Tensor:
    """t's values (or values of t's shape) in an adversarial but valid memory layout."""
    if kind == "expand":  # stride 0 along one dimension of size > 1: values repeat
        dims = [i for i, s in enumerate(t.shape) if s > 1]
        if not dims:
            return t
        d = rng.choice(dims)
        return t.narrow(d, 0, 1).expand(t.shape)
    if kind == "overlap":  # elements share memory: strides smaller than the dense ones
        strides = [1] * t.dim()
        for i in range(t.dim() - 2, -1, -1):
            strides[i] = max(1, strides[i + 1] * t.shape[i + 1] // 2)
        offset = rng.randrange(3)
        extent = offset + 1 + sum((n - 1) * st for n, st in zip(t.shape, strides))
        storage = torch.randn(extent, dtype=torch.float64).to(t.dtype)
        return storage.as_strided(t.shape, strides, offset)
    if kind == "negative_slice":  # the last entries of a longer tensor, taken with a negative index
        d = rng.randrange(t.dim()) if t.dim() else 0
        if t.dim() == 0:
            return t
        big = torch.cat([torch.randn_like(t.double()).to(t.dtype), t], d)
        return big[(slice(None),) * d + (slice(-t.shape[d], None),)]
    if kind == "transpose" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


class Call:
    """One op call: the op, its arguments, and the description of what was mutated."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.seed = seed
        self.op = rng.choice(OPS)
        self.dtype = rng.choice((torch.float32, torch.float64, torch.float16, torch.bfloat16))
        rank = rng.choice((2, 3, 4))
        self.shape = (rng.choice((1, 2, 3, 5)), rng.choice((1, 2, 3, 4, 7))) + tuple(
            rng.choice((1, 2, 3, 4)) for _ in range(rank - 2))
        if self.op in ("forward_train", "batch_stats") and self.shape[0] == 1:
            self.shape = (2,) + self.shape[1:]  # more than one value per channel
        gen = torch.Generator().manual_seed(seed)
        self.args = self._valid(gen, rng)
        self.scalars = self._scalars(rng)
        self.mutations: List[str] = []
        for _ in range(rng.choice((1, 1, 2))):
            self._mutate(rng, gen)

    def _valid(self, gen, rng) -> Dict[str, Any]:
        C, sdt = self.shape[1], _stat(self.dtype)

        def x():
            return (torch.randn(self.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3).to(
                self.dtype)

        def pc(lo, hi):
            return (torch.rand(C, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(sdt)

        args = {"input": x(), "grad_output": x(), "relu_output": x().relu(),
                "weight": pc(0.5, 1.5), "bias": pc(-1, 1),
                "running_mean": pc(-1, 1), "running_var": pc(0.5, 2), "mean": pc(-0.5, 0.5),
                "invstd": pc(0.5, 2), "r": pc(0.5, 2), "d": pc(-1, 1), "scale": pc(-2, 2),
                "shift": pc(-1, 1), "mean_dy": pc(-1, 1), "mean_dy_xhat": pc(-1, 1),
                "num_batches_tracked": torch.tensor(rng.choice((0, 3, 10)))}
        return {k: args[k] for k in TENSOR_ARGS[self.op]}

    def _scalars(self, rng) -> Dict[str, Any]:
        if self.op == "forward_train":
            return dict(momentum=rng.choice((0.1, 0.5, None)) if "num_batches_tracked" in
                        self.args else 0.1, eps=1e-3, r_max=rng.choice((1.0, 2.0)),
                        d_max=rng.choice((0.0, 1.0)), warmup_steps=rng.choice((0, 2)),
                        r_max_ramp_steps=rng.choice((0, 5)), d_max_ramp_steps=rng.choice((0, 5)))
        if self.op == "forward_eval":
            return dict(eps=1e-3)
        if self.op in ("backward", "backward_relu"):
            return dict(train=rng.random() < 0.5,
                        output_mask=[rng.random() < 0.7 for _ in range(3)])
        return {}

    def _mutate(self, rng, gen) -> None:
        kind = rng.choice(MUTATIONS)
        names = list(self.args)
        name = rng.choice(names)
        t = self.args[name]
        if t is not None and t.numel() >= 2 ** 31 and kind not in ("none", "scalar"):
            kind = "valid"  # already huge: anything else would allocate it
        desc = f"{kind}:{name}"
        if kind in ("expand", "overlap", "negative_slice", "transpose"):
            if t is not None and t.dim() > 0:
                self.args[name] = _like_values(t, kind, rng)
        elif kind == "meta" and t is not None:
            self.args[name] = t.to("meta")
        elif kind == "dtype" and t is not None:
            new = rng.choice((torch.int64, torch.int32, torch.bool, torch.float16, torch.float64,
                              torch.float32, torch.complex64, torch.bfloat16))
            self.args[name] = t.to(new)
            desc += f"->{str(new).split('.')[1]}"
        elif kind == "length" and t is not None:
            shape = list(t.shape)
            choice = rng.randrange(4)
            if choice == 0 and shape:
                shape[rng.randrange(len(shape))] += rng.choice((-1, 1, 5))
            elif choice == 1:
                shape = shape + [2]
            elif choice == 2 and len(shape) > 1:
                shape = shape[:-1]
            else:
                shape = [max(s, 1) + 1 for s in shape] or [2]
            shape = [max(s, 0) for s in shape]
            self.args[name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype)
            desc += f"->{tuple(shape)}"
        elif kind == "empty" and t is not None:
            shape = list(t.shape) or [0]
            shape[rng.randrange(len(shape))] = 0
            self.args[name] = t.new_empty(shape)
            desc += f"->{tuple(shape)}"
        elif kind == "zero_dim" and t is not None:
            self.args[name] = t.reshape(-1)[0].clone() if t.numel() else t.new_tensor(1.0)
        elif kind == "none":
            self.args[name] = None
        elif kind == "huge" and t is not None:
            # At least 2^35 elements: any copy or output of it is 64 GiB or more, beyond this
            # machine, so the answer must be an error, never a partial result or a 32-bit
            # wrap-around (and the machine is never asked for memory it could grant).
            if t.dim() >= 2:
                shape = (2 ** 18,) + tuple(t.shape[1:-1]) + (2 ** 17,)
            else:
                shape = (2 ** 35,)
            self.args[name] = t.reshape(-1)[:1].reshape((1,) * len(shape)).expand(shape) \
                if t.numel() else t.new_zeros((1,) * len(shape)).expand(shape)
            desc += f"->{shape}"
        elif kind == "scalar" and self.scalars:
            key = rng.choice(list(self.scalars))
            if key == "output_mask":
                self.scalars[key] = rng.choice(([True, True], [True] * 4, [], [False] * 3))
            elif key == "train":
                self.scalars[key] = not self.scalars[key]
            else:
                self.scalars[key] = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e300,
                                                -(2 ** 62), 2 ** 62, 2.5, None))
                if key.endswith("steps") and self.scalars[key] is not None:
                    self.scalars[key] = int(max(min(self.scalars[key], 2 ** 62), -(2 ** 62))) \
                        if self.scalars[key] == self.scalars[key] and abs(
                            self.scalars[key]) != float("inf") else 7
            desc = f"scalar:{key}={self.scalars[key]}"
        else:
            desc = "valid"
        self.mutations.append(desc)

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if v is None:
                parts.append(f"{k}=None")
            else:
                parts.append(f"{k}={str(v.dtype).split('.')[1]}{tuple(v.shape)}"
                             f"@{v.device.type} stride {tuple(v.stride())}")
        return (f"{self.op}({', '.join(parts)}, {self.scalars}) "
                f"mutations {self.mutations}")

    def invoke(self, ops):
        return getattr(ops, self.op)(*self.args.values(), *self.scalars.values())


# ---- what a call must return: plain PyTorch on contiguous float64 copies -------------------

def _plain(t):
    if t is not None and t.numel() >= 2 ** 31:
        raise RuntimeError("too big to compute here")
    return None if t is None else t.detach().clone().contiguous()


def expected(call: Call) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(outputs, in-place tensors after the call) of a correct op, or raises if the arguments
    have no meaning (then the op must raise too)."""
    from batchrenorm_cuda import reference
    from batchrenorm_cuda._common import check_arguments
    from batchrenorm_cuda._testing import backward_centre

    if call.args.get("input") is None:
        raise TypeError("input is None")
    devices = {v.device.type for v in call.args.values() if v is not None}
    if devices == {"meta"} and call.args["input"].dim() >= 2:
        return "meta", {}  # shape inference only: the fake kernels answer
    if devices != {"cpu"}:
        raise RuntimeError("device")
    a = {k: _plain(v) for k, v in call.args.items()}
    s = call.scalars
    x = a["input"]
    if x.dim() < 2 or x.dtype not in (torch.float32, torch.float64, torch.float16,
                                      torch.bfloat16):
        raise TypeError("input")
    sdt = _stat(x.dtype)
    C = x.shape[1]
    for k, v in a.items():
        if k in ("input", "grad_output", "relu_output", "num_batches_tracked") or v is None:
            continue
        if v.shape != (C,) or v.dtype != sdt:
            raise ValueError(k)
    for name in ("grad_output", "relu_output"):
        if name in a and (a[name] is None or a[name].shape != x.shape
                          or a[name].dtype != x.dtype):
            raise ValueError(name)
    if x.numel() >= 2 ** 31:
        raise RuntimeError("too big to compute here")
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, C) + (1,) * (x.dim() - 2)
    xs = x.to(sdt)
    m = x.numel() // max(C, 1)
    if call.op == "forward_train":
        nbt = a["num_batches_tracked"]
        if nbt is not None and (nbt.dtype != torch.long or nbt.numel() != 1):
            raise TypeError("num_batches_tracked")
        check_arguments("fuzz", x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                        True, s["momentum"], s["eps"], s["r_max"], s["d_max"],
                        None if nbt is None else nbt.reshape(()))
        if C > 0 and m < 2:
            raise ValueError("one value per channel")
        step = None if nbt is None else nbt.reshape(())
        y = reference.batch_renorm(x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                   True, s["momentum"], s["eps"], s["r_max"], s["d_max"], step,
                                   s["warmup_steps"], s["r_max_ramp_steps"], s["d_max_ramp_steps"])
        mean = xs.mean(dims)
        invstd = torch.rsqrt(xs.var(dims, correction=0) + s["eps"])
        inplace = {k: a[k] for k in ("running_mean", "running_var", "num_batches_tracked")
                   if a[k] is not None}
        return (y, mean, invstd), inplace
    if call.op == "forward_eval":
        if a["running_mean"] is None or a["running_var"] is None:
            raise TypeError("running stats")
        y = reference.batch_renorm(x, a["running_mean"], a["running_var"], a["weight"],
                                   a["bias"], False, 0.1, s["eps"])
        return (y,), {}
    if call.op == "batch_stats":
        if C > 0 and m < 1:
            raise ValueError("empty")
        mean = xs.mean(dims)
        return (mean, ((xs - mean.view(shape)) ** 2).sum(dims)), {}
    if call.op == "normalize":
        if a["scale"] is None or a["shift"] is None:
            raise TypeError("None")
        return ((xs * a["scale"].view(shape) + a["shift"].view(shape)).to(x.dtype),), {}
    dy = a["grad_output"].to(sdt)
    if call.op == "backward_relu":
        dy = torch.ops.aten.threshold_backward(dy, a["relu_output"].to(sdt), 0)
    if a["mean"] is None or a["invstd"] is None:
        raise TypeError("None")
    xhat = (xs - a["mean"].view(shape)) * a["invstd"].view(shape)
    if call.op == "backward_reduce":
        return (dy.sum(dims), (dy * xhat).sum(dims)), {}
    if call.op == "backward_input":
        if any(a[k] is None for k in ("scale", "mean_dy", "mean_dy_xhat")):
            raise TypeError("None")
        dx = a["scale"].view(shape) * (dy - a["mean_dy"].view(shape)
                                       - xhat * a["mean_dy_xhat"].view(shape))
        return (dx.to(x.dtype),), {}
    mask = s["output_mask"]
    if len(mask) != 3:
        raise RuntimeError("output_mask")
    if s["train"]:
        # The schema's contract: mean is the batch's own (rounded) mean. Where a channel is not
        # well centred the kernels recover the exact one from sum(x - mean); elsewhere they take
        # the given mean at its word (batchrenorm.h, well_centred).
        centre = backward_centre(a["mean"], a["invstd"], xs.mean(dims))
        xhat = (xs - centre.view(shape)) * a["invstd"].view(shape)
    one = torch.ones(C, dtype=sdt)
    w, r, d = (a[k] if a[k] is not None else (one if k != "d" else one * 0)
               for k in ("weight", "r", "d"))
    sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
    k = (w * r * a["invstd"]).view(shape)
    if s["train"]:
        dx = k * (dy - (sum_dy / m).view(shape) - xhat * (sum_dy_xhat / m).view(shape))
    else:
        dx = k * dy
    # grad_weight as if weight were 1 when it is absent (the autograd Functions do not ask).
    out = (dx.to(x.dtype) if mask[0] else None, r * sum_dy_xhat + d * sum_dy if mask[1] else
           None, sum_dy if mask[2] else None)
    return out, {}


def _mismatch(got, want, dtype, m) -> Optional[str]:
    from batchrenorm_cuda._testing import grad_tolerance, mismatch

    if (got is None) != (want is None):
        return (f"{'None' if got is None else 'a tensor'} where "
                f"{'a tensor' if want is not None else 'None'} was expected")
    if got is None:
        return None
    # Every output of an op call under the per-channel-sum rule (its largest error: the
    # parameter gradients); adversarial inputs, so 2x the gradient rule's headroom.
    tol = {k: 2 * v for k, v in grad_tolerance(dtype, m).items()}
    return mismatch(got, want, **tol)


def check(call: Call, ops) -> Tuple[str, str]:
    """(outcome, detail): outcome is 'error' (a clear error), 'ok' (right answer) or 'FAIL'."""
    try:
        want = expected(call)
        want_error = None
    except Exception as error:  # noqa: BLE001 - the arguments have no meaning
        want, want_error = None, error
    before = {k: v.clone() for k, v in call.args.items()
              if v is not None and v.device.type == "cpu" and v.numel() < 2 ** 31}
    try:
        got = call.invoke(ops)
    except SAFE_ERRORS as error:
        message = str(error).strip()
        if not message:
            return "FAIL", f"{type(error).__name__} without a message"
        return "error", f"{type(error).__name__}: {message.splitlines()[0][:110]}"
    except Exception as error:  # noqa: BLE001
        return "FAIL", f"unexpected {type(error).__name__}: {str(error)[:200]}"
    if want_error is not None:
        return "FAIL", f"accepted arguments with no meaning ({want_error}); returned {type(got)}"
    outputs, inplace = want
    got = got if isinstance(got, (tuple, list)) else (got,)
    if outputs == "meta":
        devices = {g.device.type for g in got if isinstance(g, torch.Tensor)}
        return ("ok", "meta") if devices <= {"meta"} else ("FAIL", f"meta call gave {devices}")
    x = call.args["input"]
    m = x.numel() // max(x.shape[1], 1)
    for i, w in enumerate(outputs):
        err = _mismatch(got[i], w, x.dtype if i == 0 else _stat(x.dtype), m)
        if err:
            return "FAIL", f"output {i}: {err}"
    for name, w in inplace.items():
        err = _mismatch(call.args[name].reshape(w.shape), w, _stat(x.dtype), m)
        if err:
            return "FAIL", f"{name} after the call: {err}"
    for name, t in call.args.items():
        if name not in inplace and name in before and not torch.equal(t, before[name]):
            return "FAIL", f"modified its argument {name}"
    return "ok", call.op


def run(seeds, namespace: str, verbose: bool = False) -> Tuple[collections.Counter, List[str]]:
    import batchrenorm_cuda  # noqa: F401 - registers torch.ops.batchrenorm

    if namespace != "batchrenorm":
        sys.path.insert(0, HERE)
        import cuda_emulation

        cuda_emulation.load().set_device(16, 2)
    ops = getattr(torch.ops, namespace)
    counts, failures = collections.Counter(), []
    for seed in seeds:
        with warnings.catch_warnings():  # casts to complex or bool, on purpose
            warnings.simplefilter("ignore")
            call = Call(seed)
        if namespace != "batchrenorm" and any(m.startswith("huge") for m in call.mutations):
            continue  # the emulator's glue is the CUDA one: its huge cases need a GPU
        if verbose:
            print(f"seed {seed}: {call.describe()}", file=sys.stderr, flush=True)
        outcome, detail = check(call, ops)
        counts[outcome] += 1
        counts["mutation " + call.mutations[0].split(":")[0]] += 1
        if outcome == "FAIL":
            failures.append(f"seed {seed}: {detail}\n  {call.describe()}\n  repro: python "
                            f"tests/fuzz_ops.py --repro {seed}")
    return counts, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--namespace", default="batchrenorm",
                        help="batchrenorm, or batchrenorm_emulated_cuda (the CUDA emulation)")
    parser.add_argument("--asan", action="store_true")
    parser.add_argument("--repro", type=int)
    args = parser.parse_args(argv)
    if args.asan:
        import fuzz_asan

        return fuzz_asan.run_under_asan(args.calls, args.seed)
    if os.environ.get("BRN_FUZZ_ASAN") == "1":
        import fuzz_asan

        fuzz_asan.use_asan_extension()
        import batchrenorm_cuda

        print(f"fuzz ops: the extension under test is {batchrenorm_cuda._ops._C.__file__}")
    if args.repro is not None:
        counts, failures = run([args.repro], args.namespace, verbose=True)
        print("\n".join(failures) or f"no failure ({dict(counts)})")
        return 1 if failures else 0
    t0 = time.time()
    seeds = range(args.seed * 1_000_000, args.seed * 1_000_000 + args.calls)
    counts, failures = run(seeds, args.namespace)
    for f in failures[:50]:
        print("FAIL", f)
    total = counts["ok"] + counts["error"] + counts["FAIL"]
    print(f"fuzz ops ({args.namespace}): {total} calls in {time.time() - t0:.0f} s: "
          f"{counts['ok']} right answers, {counts['error']} clear errors, "
          f"{counts['FAIL']} failures, 0 crashes (the process finished)")
    print("fuzz ops: first mutation " + ", ".join(
        f"{k.split(' ', 1)[1]}: {v}" for k, v in sorted(counts.items())
        if k.startswith("mutation")))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
