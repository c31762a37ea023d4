"""The one benchmark harness: timing of forward / backward / forward+backward, quantiles,
effective bandwidth, and the environment every result row is tied to.

Every benchmark script builds a zero-argument `forward()` closure over its inputs and calls
`measure(forward, inputs, grad_output, mode, ...)`; this file owns how time is taken.

Timing (see benchmarks/NOTES.md, "Method"):
- CPU: wall clock (time.perf_counter) per call; device_ms = wall_ms.
- CUDA: device_ms from CUDA-graph replays of one step, each replay between two CUDA events, with
  the L2 cache flushed before each sample (falling back to events around eager calls when the
  step cannot be captured); wall_ms from eager calls, each bracketed by torch.cuda.synchronize,
  i.e. the latency a Python caller sees including launch overhead.
- The median is reported, with the 20th and 80th percentiles.

Modes:
- "fwd": one training forward with autograd recording (inputs require grad), as in training.
- "bwd": the backward alone: the forward runs once, untimed, and torch.autograd.grad(...,
  retain_graph=True) is timed on that graph (autograd.grad does not accumulate into .grad).
- "fwd+bwd": forward then autograd.grad.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
REPO_ROOT = Path(__file__).resolve().parent.parent

# Tensor-sized reads and writes per mode, in units of numel * element_size. Per-channel vectors
# (statistics, weight, buffers) are ignored: at ResNet shapes they are < 0.1% of the traffic.
#   fwd: read x, write y. bwd: read x and dy, write dx. fwd+bwd: the sum.
_TENSOR_PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def minimal_bytes(numel: int, element_size: int, mode: str) -> int:
    """The bytes an ideal kernel must move for one step of `mode`."""
    return _TENSOR_PASSES[mode] * numel * element_size


@dataclass
class TimerConfig:
    """How long to warm up and how many samples to take.

    reps=None picks the number of samples from a time budget: rep_ms / (estimated time per
    call), clamped to [min_reps, max_reps]. warmup_ms is spent after one untimed first call
    (which absorbs compilation and first allocations).
    """
    warmup_ms: float = 50.0
    rep_ms: float = 200.0
    min_reps: int = 5
    max_reps: int = 100
    reps: Optional[int] = None
    flush_l2: bool = True  # CUDA only


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def summarize(samples_ms: Sequence[float]) -> Timing:
    s = sorted(samples_ms)
    if len(s) == 1:
        return Timing(s[0], s[0], s[0], 1)
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(s), q[1], q[7], len(s))


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def mode_step(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
              grad_output: torch.Tensor, mode: str) -> Callable[[], object]:
    """A zero-argument callable doing one step of `mode`. For "bwd" the forward runs here,
    once, on the current stream (autograd runs a backward op on its forward op's stream)."""
    inputs = tuple(inputs)
    if mode == "fwd":
        return forward
    if mode == "bwd":
        out = forward()
        return lambda: torch.autograd.grad(out, inputs, grad_output, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), inputs, grad_output)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _n_reps(cfg: TimerConfig, estimate_ms: float) -> int:
    if cfg.reps is not None:
        return max(1, cfg.reps)
    n = int(cfg.rep_ms / max(estimate_ms, 1e-3))
    return max(cfg.min_reps, min(cfg.max_reps, n))


def _warmup(step: Callable[[], object], cfg: TimerConfig, sync: Callable[[], None]) -> float:
    """One untimed call, then calls until warmup_ms is spent; returns the mean ms per call."""
    step()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        step()
        sync()
        calls += 1
        elapsed = (time.perf_counter() - start) * 1e3
        if elapsed >= cfg.warmup_ms or (cfg.reps is not None and calls >= 1):
            return elapsed / calls


def _wall_samples(step, n: int, sync: Callable[[], None]) -> List[float]:
    samples = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


_L2_FLUSH: Dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    # Larger than any L2 today (H100: 50 MB, H200: 60 MB... B200: 126 MB).
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    return _L2_FLUSH[device]


def _cuda_event_samples(run_once: Callable[[], object], n: int, flush: Optional[torch.Tensor]
                        ) -> List[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        run_once()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def measure(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
            grad_output: torch.Tensor, mode: str, cfg: TimerConfig,
            context: Callable[[], object] = nullcontext) -> Dict[str, object]:
    """Time one step of `mode`. Returns device_ms, wall_ms, p20_ms, p80_ms, reps, timer.

    `context` is entered around everything (e.g. torch.backends.cudnn.flags(enabled=False)),
    so that the backend choice also holds while a CUDA graph is captured.
    """
    device = grad_output.device
    with context():
        if device.type != "cuda":
            step = mode_step(forward, inputs, grad_output, mode)
            estimate = _warmup(step, cfg, lambda: None)
            wall = summarize(_wall_samples(step, _n_reps(cfg, estimate), lambda: None))
            return dict(device_ms=wall.median_ms, wall_ms=wall.median_ms, p20_ms=wall.p20_ms,
                        p80_ms=wall.p80_ms, wall_p20_ms=wall.p20_ms, wall_p80_ms=wall.p80_ms,
                        reps=wall.reps, timer="perf_counter")
        return _measure_cuda(forward, inputs, grad_output, mode, cfg)


def measure_many(entries: Dict[str, Tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor],
                                          Callable[[], object]]],
                 grad_output: torch.Tensor, mode: str, cfg: TimerConfig
                 ) -> Dict[str, Dict[str, object]]:
    """Time one step of `mode` for several implementations of the same computation.

    entries: {name: (forward, inputs, context)}. On CPU the samples are interleaved: each round
    times every implementation once, in a rotated order, so that a load that comes and goes on a
    shared machine hits them alike and their ratios stay meaningful. On CUDA, where the device
    time does not depend on the host's load, they are measured one after the other.
    A failure is returned as {"error": repr} for that name.
    """
    out: Dict[str, Dict[str, object]] = {}
    if grad_output.device.type == "cuda":
        for name, (forward, inputs, context) in entries.items():
            try:
                out[name] = measure(forward, inputs, grad_output, mode, cfg, context)
            except Exception as error:  # noqa: BLE001
                out[name] = {"error": repr(error)}
        return out
    steps, estimates = {}, {}
    for name, (forward, inputs, context) in entries.items():
        try:
            with context():
                steps[name] = mode_step(forward, inputs, grad_output, mode)
                estimates[name] = _warmup(steps[name], cfg, lambda: None)
        except Exception as error:  # noqa: BLE001
            out[name] = {"error": repr(error)}
    if not steps:
        return out
    n = _n_reps(cfg, sum(estimates.values()) / len(estimates))
    names = list(steps)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    contexts = {name: entries[name][2] for name in names}
    for i in range(n):
        for name in rotated(names, i):
            with contexts[name]():
                t0 = time.perf_counter()
                steps[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    for name in names:
        wall = summarize(samples[name])
        out[name] = dict(device_ms=wall.median_ms, wall_ms=wall.median_ms, p20_ms=wall.p20_ms,
                         p80_ms=wall.p80_ms, wall_p20_ms=wall.p20_ms, wall_p80_ms=wall.p80_ms,
                         reps=wall.reps, timer="perf_counter, interleaved",
                         samples_ms=samples[name])
    return out


def rotated(names: Sequence[str], round_index: int) -> List[str]:
    """The order of one interleaved round: the names rotated by the round's index, so that each
    runs first, second, ... equally often and no position's effect (a cache warmed by the one
    before) falls on one name."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def paired_ratio(a: Dict[str, object], b: Dict[str, object]) -> Optional[float]:
    """The median over rounds of a's sample / b's sample in the same round, for two results of
    one interleaved measure_many: the two calls of a round ran back to back, so a load that
    comes and goes between rounds cancels out of each ratio (the ratio of the two medians
    does not pair them). None when the samples are not there (CUDA results)."""
    sa, sb = a.get("samples_ms"), b.get("samples_ms")
    if not sa or not sb or len(sa) != len(sb):
        return None
    return statistics.median(x / y for x, y in zip(sa, sb))


def _measure_cuda(forward, inputs, grad_output, mode, cfg: TimerConfig) -> Dict[str, object]:
    sync = torch.cuda.synchronize
    flush = _flush_buffer(grad_output.device) if cfg.flush_l2 else None
    stream = torch.cuda.Stream(device=grad_output.device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Forward (for "bwd") and backward both on `stream`, so that the backward can be
        # captured on it.
        step = mode_step(forward, inputs, grad_output, mode)
        estimate = _warmup(step, cfg, sync)
        n = _n_reps(cfg, estimate)
        wall = summarize(_wall_samples(step, n, sync))

        timer, graph = "cuda_graph", None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                step()
            graph.replay()  # first replay uploads the graph
            sync()
            samples = _cuda_event_samples(graph.replay, n, flush)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to events
            sync()
            timer = f"cuda_events ({type(error).__name__})"
            graph = None
            samples = _cuda_event_samples(step, n, flush)
        device = summarize(samples)
    torch.cuda.current_stream().wait_stream(stream)
    del graph
    return dict(device_ms=device.median_ms, wall_ms=wall.median_ms, p20_ms=device.p20_ms,
                p80_ms=device.p80_ms, wall_p20_ms=wall.p20_ms, wall_p80_ms=wall.p80_ms,
                reps=n, timer=timer)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 256 * 2**20, reps: int = 20
                        ) -> Optional[float]:
    """Device-to-device copy bandwidth (read + write counted), the roofline reference for the
    gbps of the rows. None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = _cuda_event_samples(lambda: dst.copy_(src), reps, None)
    return 2 * nbytes / (statistics.median(samples) * 1e-3) / 1e9


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT = "glibc, freed memory kept (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB)"


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory in the process (no mmap of its own per large block, no
    trimming), as a caching allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator) does.
    Without it, whether an output lands on pages the kernel must first fault in depends on
    what was freed before it: one CPU configuration's ratio moved from 0.38 to 1.90 between
    runs of the same tree (benchmarks/NOTES.md, "Method"). Call before the inputs are made.
    Returns what the allocator now does, for the results' environment."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and \
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
    return _KEPT if ok else "default (mallopt refused)"


def add_allocator_argument(parser) -> None:
    """The CPU benchmarks' --default-allocator flag (see keep_freed_memory)."""
    parser.add_argument("--default-allocator", action="store_true",
                        help="CPU: leave glibc's malloc as it is (by default the run tells it to "
                             "keep freed memory, so that page faults on fresh outputs do not "
                             "decide ratios)")


def cpu_allocator(args) -> str:
    """What the run's CPU allocator does, after keep_freed_memory() unless --default-allocator."""
    return "default" if args.default_allocator else keep_freed_memory()


def loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> Dict[str, object]:
    """Top-level keys of a results file: what the numbers were measured on and with."""
    device = torch.device(device)
    dirty = _git("status", "--porcelain", "--", "csrc")
    diff = _git("diff", "HEAD", "--", "csrc")
    return dict(
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        cudnn=(torch.backends.cudnn.version() if device.type == "cuda" else None),
        csrc_tree=_git("rev-parse", "HEAD:csrc"),
        csrc_dirty=bool(dirty) if dirty is not None else None,
        # Identifies uncommitted edits of tracked csrc files a run was built from (untracked
        # files show only in csrc_dirty).
        csrc_diff_sha1=hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        git_head=_git("rev-parse", "HEAD"),
        threads=torch.get_num_threads(),
        cpu=cpu_model_name(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        loadavg_start=loadavg(),
    )


__all__ = ["MODES", "TimerConfig", "Timing", "add_allocator_argument", "copy_bandwidth_gbps",
           "cpu_allocator", "device_name", "environment", "geomean", "keep_freed_memory",
           "loadavg", "measure", "measure_many", "minimal_bytes",
           "mode_step",
           "paired_ratio",
           "summarize", "asdict"]
