"""Where a compiled network's training step spends the time that ours adds to nn.BatchNorm's:
issue 22's diagnostic, for the cases bench_modules.py finds above 1.0.

Two measurements, each interleaved in one process in a rotated order, paired per round:

1. The step split into its phases (the compiled forward call with Dynamo's guards, and the
   loss; the backward; the optimizer step: networks.train_step's marks), for nn.BatchNorm, a
   copy of it (the A/A control: what placement and order alone move), and ours. Nothing is
   instrumented here.
2. Inside Inductor's generated modules: each graph's call, and in it the generated kernels, the
   extern calls (convolutions, matmuls) and the Python wrapper's helper calls (allocations,
   `reinterpret_tensor` views, size asserts), counted and timed by wrapping them. The wrappers
   add about 1 us a call to what they wrap, so compare counts and differences, not the sums.

Usage: python benchmarks/compiled_breakdown.py --network "resnet18/4 b2" [--rounds 200]
It reads Inductor's private names (its output modules, CompiledFxGraph); a later torch may move
them, and then part 2 says so and stops.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
import networks

PHASES = ("forward", "backward", "optimizer", "step")
HELPERS = ("empty_strided_cpu", "reinterpret_tensor", "assert_size_stride")


def _variants(name: str):
    """networks.instances' three labels, compiled, one instance each, and a step that times its
    phases into `times` (the phases' boundaries are the step's own calls)."""
    built, x, y, loss_fn = networks.instances(name, compiled=True)

    def step(label: str, times=None):
        _, fn, opt = built[label][0]
        marks = [time.perf_counter()]
        networks.train_step(fn, opt, x, y, loss_fn, marks)
        if times is not None:
            t0, t1, t2, t3 = marks
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                times[label][phase].append(dt * 1e6)

    return list(built), step


def _rounds(labels, step, rounds: int, times=None) -> None:
    for i in range(rounds):
        for label in harness.rotated(labels, i):
            step(label, times)


def _paired(samples, label: str, base: str = "bn") -> float:
    return statistics.median(a - b for a, b in zip(samples[label], samples[base]))


def _generated_modules() -> dict:
    return {id(m): m for m in list(sys.modules.values())
            if "torchinductor" in str(getattr(m, "__file__", "")) and m.__file__.endswith(".py")}


def _instrument(step, rounds: int) -> dict:
    """Part 2: {label: {graph index: {piece: [calls per step, us per step]}}}, the graph call's
    median and its pieces' mean, for "bn" and "brn"."""
    from torch._inductor.output_code import CompiledFxGraph
    acc = collections.defaultdict(list)

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            acc[key].append((time.perf_counter() - t0) * 1e6)
            return result
        return wrapper

    class _Extern:
        def __init__(self, base, key):
            self._base, self._key = base, key

        def __getattr__(self, attr):
            return timed(self._key + ("extern calls",), getattr(self._base, attr))

    original_call = CompiledFxGraph.__call__
    owner, first_calls = [None], {}

    def graph_call(self, inputs):
        # The graph's module, from its callable's globals: the pieces below are keyed by it.
        fn = getattr(self.current_callable, "__func__", self.current_callable)
        path = getattr(fn, "__globals__", {}).get("__file__", str(id(self)))
        first_calls.setdefault(path, (owner[0], len(first_calls)))
        return timed((path, "graph call"), lambda: original_call(self, inputs))()

    CompiledFxGraph.__call__ = graph_call
    try:
        # The models ran in part 1, so their modules are loaded: wrap each once. Graphs are
        # shared by models of the same code (the copy runs BatchNorm's), so only those two run.
        for module in _generated_modules().values():
            for attr in dir(module):
                piece = ("generated kernels" if attr.startswith("cpp_fused")
                         else attr if attr in HELPERS else None)
                if piece:
                    setattr(module, attr, timed((module.__file__, piece), getattr(module, attr)))
            if hasattr(module, "extern_kernels"):
                module.extern_kernels = _Extern(module.extern_kernels, (module.__file__,))
        for label in ("bn", "brn"):
            owner[0] = label
            step(label)
        _rounds(["bn", "brn"], step, 3)
        acc.clear()
        _rounds(["bn", "brn"], step, rounds)
    finally:
        CompiledFxGraph.__call__ = original_call
    # Graphs in the order of their first call: each model's forward, then its backward.
    order = {path: (label, sum(1 for other, i in first_calls.values()
                               if other == label and i < index))
             for path, (label, index) in first_calls.items()}
    out = collections.defaultdict(lambda: collections.defaultdict(dict))
    for (path, piece), values in acc.items():
        if path not in order:
            continue
        label, graph = order[path]
        calls = len(values) // rounds
        per_step = (statistics.median(values) if piece == "graph call"
                    else sum(values) / rounds)
        out[label][graph][piece] = [calls, round(per_step, 1)]
    return {k: dict(v) for k, v in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="resnet18/4 b2", choices=sorted(networks.NETWORKS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="JSON path for the numbers")
    args = p.parse_args(argv)
    import torch._inductor.config as inductor_config
    inductor_config.force_disable_caches = True  # as bench_modules.py, for the same reason
    torch.set_num_threads(args.threads)
    labels, step = _variants(args.network)
    _rounds(labels, step, 5)
    times = {label: {phase: [] for phase in PHASES} for label in labels}
    _rounds(labels, step, args.rounds, times)
    result = dict(network=args.network, threads=args.threads, rounds=args.rounds,
                  torch=torch.__version__, phases={})
    print(f"{args.network}, {args.threads} thread(s), {args.rounds} rounds; us per step")
    for phase in PHASES:
        medians = {label: statistics.median(times[label][phase]) for label in labels}
        samples = {label: times[label][phase] for label in labels}
        diffs = {label: _paired(samples, label) for label in labels if label != "bn"}
        result["phases"][phase] = dict(median_us=medians, paired_minus_bn_us=diffs)
        print(f"  {phase:9s} medians " + ", ".join(f"{k} {v:.0f}" for k, v in medians.items())
              + "; paired minus bn: " + ", ".join(f"{k} {v:+.0f}" for k, v in diffs.items()))
    try:
        result["inside_graphs"] = _instrument(step, args.rounds)
    except (ImportError, AttributeError) as error:
        print(f"  part 2 skipped: Inductor's private names moved ({error!r})")
    for label, graphs in result.get("inside_graphs", {}).items():
        for graph, pieces in sorted(graphs.items()):
            print(f"  {label} graph {graph}: " + ", ".join(
                f"{piece} {calls}x {us:.0f}" for piece, (calls, us) in sorted(pieces.items())))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
