"""Batch Renorm training step vs BatchNorm, side by side, on ResNet-50's BatchNorm shapes.

    python benchmarks/bench_batchrenorm.py                  # default device (CUDA if present)
    python benchmarks/bench_batchrenorm.py --quick          # a few minutes on a 2-core CPU
    python benchmarks/bench_batchrenorm.py --smoke          # seconds: tiny shapes, 3 reps
    make bench BENCH_ARGS="--quick"

Implementations (all training=True, momentum=0.01, eps=1e-5; Batch Renorm with r_max=3,
d_max=5; every implementation gets its own copy of the running buffers):
  brn_fused      batchrenorm_cuda.batch_renorm(backend="fused")
  bn_native      F.batch_norm, ATen's native kernels (on CUDA with cuDNN disabled)
  bn_cudnn       F.batch_norm with cuDNN enabled (CUDA only; the row's backend says which
                 kernel served: cuDNN takes fp32 and fp16, ATen's native kernel bf16)
  brn_reference  batchrenorm_cuda.reference through batch_renorm(backend="reference"), eager
  brn_compiled   torch.compile(batchrenorm_cuda.reference.batch_renorm, dynamic=False),
                 compiled once per shape, layout and dtype, warmed up outside timing

Writes <out>.json (environment + rows), <out>.md (tables) and <out>.png (ratio plot), and
prints the geometric-mean time ratio of each implementation to bn_native (and bn_cudnn).
Method and results: benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import batchrenorm_cuda  # noqa: E402
from batchrenorm_cuda import reference  # noqa: E402
from batchrenorm_cuda._testing import BATCH_SIZES, RESNET50_SHAPES, make_params  # noqa: E402

import harness  # noqa: E402

IMPLS = ("brn_fused", "bn_native", "bn_cudnn", "brn_reference", "brn_compiled")
BASELINES = ("bn_native", "bn_cudnn")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MOMENTUM, EPS, R_MAX, D_MAX = 0.01, 1e-5, 3.0, 5.0

# --quick: five ResNet-50 shapes spanning the spatial sizes and the channel counts.
QUICK_SHAPES = ((64, 56, 56), (256, 56, 56), (512, 28, 28), (256, 14, 14), (2048, 7, 7))
QUICK_BATCH_SIZES = (1, 4, 16)
# Default on a CPU: every shape, N in {1, 4, 16} (N = 32 doubles the run; --batch-sizes all).
CPU_DEFAULT_BATCH_SIZES = (1, 4, 16)
SMOKE_SHAPES = ((8, 4, 4), (16, 8, 8))
SMOKE_BATCH_SIZES = (2,)


# ---------------------------------------------------------------------------------------------
# Implementations


class Impl:
    """One implementation: `build(x, params)` returns (forward closure, backend name);
    `context()` is held while it is measured."""

    def __init__(self, name: str, build, context: Callable[[], object] = nullcontext,
                 per_config_setup: Optional[Callable[[], None]] = None):
        self.name, self.build, self.context = name, build, context
        self.per_config_setup = per_config_setup


def _brn(backend: str):
    def build(x, p):
        w, b, rm, rv = p

        def forward():
            return batchrenorm_cuda.batch_renorm(x, rm, rv, w, b, training=True,
                                                 momentum=MOMENTUM, eps=EPS, r_max=R_MAX,
                                                 d_max=D_MAX, backend=backend)
        return forward, backend
    return build


def _compiled(x, p):
    w, b, rm, rv = p
    fn = torch.compile(reference.batch_renorm, dynamic=False)

    def forward():
        return fn(x, rm, rv, w, b, True, MOMENTUM, EPS, R_MAX, D_MAX)
    return forward, "inductor"


def _bn_backend(out: torch.Tensor) -> str:
    name = type(out.grad_fn).__name__.lower() if out.grad_fn is not None else ""
    for backend in ("cudnn", "miopen"):
        if backend in name:
            return backend
    return "native"


def _bn(cudnn: bool):
    def build(x, p):
        w, b, rm, rv = p

        def forward():
            return F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
        with torch.backends.cudnn.flags(enabled=cudnn):
            backend = _bn_backend(forward())  # one step to ask autograd which kernel served
        return forward, backend
    return build


def _cudnn_context(enabled: bool):
    return lambda: torch.backends.cudnn.flags(enabled=enabled)


def implementations(device: torch.device) -> Dict[str, Impl]:
    on_cuda = device.type == "cuda"
    return {
        "brn_fused": Impl("brn_fused", _brn("fused")),
        "bn_native": Impl("bn_native", _bn(False),
                          _cudnn_context(False) if on_cuda else nullcontext),
        "bn_cudnn": Impl("bn_cudnn", _bn(True), _cudnn_context(True)),
        "brn_reference": Impl("brn_reference", _brn("reference")),
        # A fresh dynamo cache per configuration: compiled once per shape, and never past
        # the recompile limit (which would silently fall back to eager).
        "brn_compiled": Impl("brn_compiled", _compiled, per_config_setup=torch._dynamo.reset),
    }


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    if name == "brn_fused" and not batchrenorm_cuda.extension_available(device.type):
        return (f"batchrenorm_cuda.extension_available({device.type!r}) is False: no fused "
                f"kernel built for {device.type}")
    if name == "bn_cudnn" and device.type != "cuda":
        return "cuDNN is CUDA only"
    if name == "bn_cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    return None


# ---------------------------------------------------------------------------------------------
# The run


def configs(shapes, batch_sizes, layouts, dtypes):
    for dtype in dtypes:
        for layout in layouts:
            for c, h, w in shapes:
                for n in batch_sizes:
                    yield dtype, layout, (n, c, h, w)


def make_inputs(shape, layout: str, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dy = dy.contiguous(memory_format=LAYOUTS[layout])
    params = make_params(shape[1], dtype, device=device, generator=g)
    return x, dy, params


def _fresh_params(params):
    w, b, rm, rv = (t.clone() for t in params)
    return w.requires_grad_(), b.requires_grad_(), rm, rv


def run(args) -> Dict[str, object]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = harness.cpu_allocator(args)
    env = harness.environment(device)
    env["cpu_allocator"] = allocator if device.type == "cpu" else None
    env["copy_gbps"] = harness.copy_bandwidth_gbps(device)
    env["extension_available"] = batchrenorm_cuda.extension_available(device.type)
    cfg = harness.TimerConfig(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                              min_reps=args.min_reps, max_reps=args.max_reps, reps=args.reps,
                              flush_l2=not args.no_flush)
    impls = implementations(device)
    skipped = {}
    chosen = []
    for name in args.impls:
        reason = unavailable_reason(name, device)
        if reason:
            print(f"note: skipping {name}: {reason}")
            skipped[name] = reason
        else:
            chosen.append(impls[name])

    work = list(configs(args.shapes, args.batch_sizes, args.layouts, args.dtypes))
    rows: List[Dict[str, object]] = []
    errors: List[str] = []
    progress = _progress(len(work), disable=args.no_progress)
    for i, (dtype_name, layout, shape) in enumerate(work):
        progress.set_postfix_str(f"{dtype_name} {layout} {'x'.join(map(str, shape))}",
                                 refresh=False)
        dtype = DTYPES[dtype_name]
        x, dy, params = make_inputs(shape, layout, dtype, device, seed=i)
        numel, elsize = x.numel(), x.element_size()
        entries, backends = {}, {}
        for impl in chosen:
            if impl.per_config_setup is not None:
                impl.per_config_setup()
            p = _fresh_params(params)  # each implementation mutates its own buffers
            try:
                with impl.context():
                    forward, backends[impl.name] = impl.build(x, p)
            except Exception as error:  # noqa: BLE001 - record and go on with the others
                errors.append(f"{impl.name} {dtype_name} {layout} {shape}: build: {error!r}")
                continue
            entries[impl.name] = (forward, (x, p[0], p[1]), impl.context)
        load = harness.loadavg()
        for mode in args.modes:
            results = harness.measure_many(entries, dy, mode, cfg)
            for name, result in results.items():
                if "error" in result:
                    errors.append(f"{name} {dtype_name} {layout} {shape} {mode}: "
                                  f"{result['error']}")
                    progress.write(f"error: {errors[-1]}")
                    continue
                gbps = harness.minimal_bytes(numel, elsize, mode) / (
                    result["device_ms"] * 1e-3) / 1e9
                rows.append(dict(shape=list(shape), layout=layout, dtype=dtype_name, impl=name,
                                 mode=mode, backend=backends[name],
                                 device_ms=result["device_ms"], wall_ms=result["wall_ms"],
                                 gbps=gbps, **{k: v for k, v in result.items()
                                               if k not in ("device_ms", "wall_ms", "samples_ms")},
                                 loadavg_1m=load[0] if load else None))
        del x, dy, params, entries
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.update(1)
    progress.close()
    env["loadavg_end"] = harness.loadavg()
    env["args"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                   if k not in ("out",)}
    env["skipped"] = skipped
    env["errors"] = errors
    env["rows"] = rows
    return env


class _NoProgress:
    def set_postfix_str(self, *a, **k): pass
    def update(self, *a): pass
    def close(self): pass
    def write(self, s): print(s)


def _progress(total: int, disable: bool):
    if disable:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="config", dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Reporting


def config_key(row) -> Tuple:
    return (row["dtype"], row["layout"], tuple(row["shape"]), row["mode"])


def ratios(rows, baseline: str, field: str = "device_ms") -> Dict[Tuple[str, str], List[Tuple]]:
    """{(impl, mode): [(config_key, impl_time / baseline_time), ...]}"""
    base = {config_key(r): r[field] for r in rows if r["impl"] == baseline}
    out = defaultdict(list)
    for r in rows:
        key = config_key(r)
        if r["impl"] != baseline and key in base and base[key] > 0:
            out[(r["impl"], r["mode"])].append((key, r[field] / base[key]))
    return out


def _fmt_key(key) -> str:
    dtype, layout, shape, _ = key
    return f"{dtype} {layout} {'x'.join(map(str, shape))}"


def summary_table(rows, baseline: str, field: str = "device_ms") -> List[List[str]]:
    """Rows: impl, mode, configs, geomean, best, worst (config), for time ratio to baseline."""
    table = []
    for (impl, mode), vals in sorted(ratios(rows, baseline, field).items(),
                                     key=lambda kv: (IMPLS.index(kv[0][0]),
                                                     harness.MODES.index(kv[0][1]))):
        rs = [v for _, v in vals]
        worst_key, worst = max(vals, key=lambda kv: kv[1])
        table.append([impl, mode, str(len(rs)), f"{harness.geomean(rs):.3f}",
                      f"{min(rs):.3f}", f"{worst:.3f} ({_fmt_key(worst_key)})"])
    return table


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _plain(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*row) for row in body])


SUMMARY_HEADER = ("impl", "mode", "configs", "geomean ratio", "best", "worst (config)")


def present_baselines(rows) -> List[str]:
    return [b for b in BASELINES if any(r["impl"] == b for r in rows)]


def print_summary(result) -> None:
    rows = result["rows"]
    for baseline in present_baselines(rows):
        print(f"\nTime ratio to {baseline} (device_ms; < 1 is faster), geometric mean over "
              "shapes x layouts x dtypes:")
        print(_plain(SUMMARY_HEADER, summary_table(rows, baseline)))
    if result.get("copy_gbps"):
        print(f"\ndevice-to-device copy: {result['copy_gbps']:.0f} GB/s")


def markdown_report(result) -> str:
    rows = result["rows"]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    out = [f"# Batch Renorm benchmark: {result['device']}", "",
           f"torch {result['torch']}, CUDA {result['cuda']}, threads {result['threads']}, "
           f"csrc tree {result['csrc_tree']}{' (dirty)' if result.get('csrc_dirty') else ''}, "
           f"{result['timestamp']}, load average at start {result.get('loadavg_start')} "
           f"and end {result.get('loadavg_end')}."]
    if result.get("cpu_allocator"):
        out.append(f"CPU allocator: {result['cpu_allocator']}.")
    if result.get("copy_gbps"):
        out.append(f"Device-to-device copy bandwidth: {result['copy_gbps']:.0f} GB/s.")
    for name, reason in result.get("skipped", {}).items():
        out.append(f"- skipped {name}: {reason}")
    for baseline in present_baselines(rows):
        out += ["", f"## Time ratio to {baseline} (geometric mean; < 1 is faster)", "",
                _markdown(SUMMARY_HEADER, summary_table(rows, baseline))]
    by_key = {(config_key(r), r["impl"]): r for r in rows}
    keys = sorted({config_key(r) for r in rows},
                  key=lambda k: (k[0], k[1], k[2][1:], k[2][0], harness.MODES.index(k[3])))
    ref = present_baselines(rows)[0] if present_baselines(rows) else None
    body = []
    for key in keys:
        cells = [_fmt_key(key), key[3]]
        for impl in impls:
            r = by_key.get((key, impl))
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['device_ms']:.3f}"
            base = by_key.get((key, ref))
            if ref and base and impl != ref:
                cell += f" ({r['device_ms'] / base['device_ms']:.2f}x)"
            cells.append(cell)
        body.append(cells)
    out += ["", f"## Median device time per step, ms (ratio to {ref})", "",
            _markdown(["config (dtype layout NxCxHxW)", "mode"] + impls, body), ""]
    return "\n".join(out)


def plot(result, path: Path) -> None:
    """Per (dtype, layout): fwd+bwd time ratio to the first baseline, geometric mean over N
    per shape (top), and over shapes per N (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    rows = result["rows"]
    baselines = present_baselines(rows)
    if not baselines:
        return
    baseline = baselines[0]
    mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in rows) else rows[0]["mode"]
    groups = sorted({(r["dtype"], r["layout"]) for r in rows},
                    key=lambda g: (g[0], list(LAYOUTS).index(g[1])))
    impls = [i for i in IMPLS if i != baseline and any(r["impl"] == i for r in rows)]
    rat = ratios([r for r in rows if r["mode"] == mode], baseline)
    fig, axes = plt.subplots(2, len(groups), figsize=(6.5 * len(groups), 8.5), squeeze=False)
    colors = dict(zip(IMPLS, ("tab:red", "tab:gray", "tab:green", "tab:blue", "tab:orange")))
    for col, (dtype, layout) in enumerate(groups):
        ax_shape, ax_n = axes[0][col], axes[1][col]
        shapes = sorted({k[2][1:] for (i, m), vals in rat.items() for k, _ in vals
                         if k[0] == dtype and k[1] == layout}, key=lambda s: (-s[1], s[0]))
        ns = sorted({k[2][0] for vals in rat.values() for k, _ in vals})
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = [(k, v) for k, v in rat.get((impl, mode), [])
                    if k[0] == dtype and k[1] == layout]
            ys = [harness.geomean([v for k, v in vals if k[2][1:] == s]) for s in shapes]
            ax_shape.bar([x + (j - (len(impls) - 1) / 2) * width for x in range(len(shapes))],
                         ys, width, label=impl, color=colors[impl])
            yn = [harness.geomean([v for k, v in vals if k[2][0] == n]) for n in ns]
            ax_n.plot(ns, yn, marker="o", label=impl, color=colors[impl])
        for ax in (ax_shape, ax_n):
            ax.axhline(1.0, color="black", lw=1, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_ylabel(f"{mode} time / {baseline} time")
            ax.grid(True, which="both", axis="y", alpha=0.3)
        ax_shape.set_xticks(range(len(shapes)))
        ax_shape.set_xticklabels([f"{c}x{h}x{w}" for c, h, w in shapes], rotation=30, ha="right")
        ax_shape.set_title(f"{dtype}, {layout}: per shape C x H x W (geomean over N)")
        ax_n.set_xscale("log", base=2)
        ax_n.set_xticks(ns)
        ax_n.set_xticklabels([str(n) for n in ns])
        ax_n.set_xlabel("batch size N")
        ax_n.set_title(f"{dtype}, {layout}: per N (geomean over shapes)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955),
               ncol=max(1, len(impls)), fontsize=9, frameon=False)
    fig.suptitle(f"Batch Renorm training step vs {baseline} on {result['device']} "
                 f"(torch {result['torch']}, threads={result['threads']}; < 1 is faster)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(device: torch.device, tag: str, threads: Optional[int]) -> Path:
    if device.type == "cuda":
        name = f"cuda_{_slug(harness.device_name(device))}"
    else:
        name = f"cpu_{_slug(harness.cpu_model_name())}_{threads or torch.get_num_threads()}t"
    return HERE / "results" / (name + (f"_{tag}" if tag else "") + ".json")


def _csv(kind, choices=None):
    def parse(text: str):
        items = tuple(kind(t) for t in text.split(",") if t)
        if choices is not None:
            for item in items:
                if item not in choices:
                    raise argparse.ArgumentTypeError(f"{item!r} is not one of {choices}")
        return items
    return parse


def _shape(text: str) -> Tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a shape is CxHxW, got {text!r}")
    return parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help=f"shapes {QUICK_SHAPES}, N in {QUICK_BATCH_SIZES}, float32 "
                             "(and bfloat16 on CUDA)")
    preset.add_argument("--smoke", action="store_true",
                        help="tiny shapes, 3 reps: checks the script runs, in seconds")
    p.add_argument("--impls", type=_csv(str, IMPLS), default=IMPLS,
                   help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--modes", type=_csv(str, harness.MODES), default=harness.MODES)
    p.add_argument("--dtypes", type=_csv(str, tuple(DTYPES)), default=None,
                   help="default: float32,bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layouts", type=_csv(str, tuple(LAYOUTS)), default=tuple(LAYOUTS))
    p.add_argument("--shapes", type=_csv(_shape), default=None,
                   help="comma-separated CxHxW (default: ResNet-50's BatchNorm shapes)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated N, or 'all' for batchrenorm_cuda._testing.BATCH_SIZES")
    p.add_argument("--reps", type=int, default=None,
                   help="fixed number of timed samples (default: from --rep-ms)")
    p.add_argument("--rep-ms", type=float, default=None, help="time budget for samples")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's, i.e. all cores). On a shared "
                        "machine 1 avoids OpenMP barriers waiting on a descheduled thread")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush L2 per sample")
    harness.add_allocator_argument(p)
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON path; .md and .png are written next to it "
                        "(default: benchmarks/results/<device>[_quick|_smoke].json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: print and rewrite the .md and .png of a results JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.smoke:
        shapes, sizes, dtypes, tag = SMOKE_SHAPES, SMOKE_BATCH_SIZES, ("float32",), "smoke"
        args.reps = args.reps or 3
        args.warmup_ms = 0.0 if args.warmup_ms is None else args.warmup_ms
    elif args.quick:
        # On a GPU bf16 costs little more and is where the native and cuDNN paths differ.
        shapes, sizes, tag = QUICK_SHAPES, QUICK_BATCH_SIZES, "quick"
        dtypes = ("float32", "bfloat16") if on_cuda else ("float32",)
    else:
        shapes, tag = RESNET50_SHAPES, ""
        sizes = BATCH_SIZES if on_cuda else CPU_DEFAULT_BATCH_SIZES
        dtypes = ("float32", "bfloat16") if on_cuda else ("float32",)
    args.shapes = tuple(args.shapes or shapes)
    if args.batch_sizes is None:
        args.batch_sizes = tuple(sizes)
    elif args.batch_sizes == "all":
        args.batch_sizes = tuple(BATCH_SIZES)
    else:
        args.batch_sizes = _csv(int)(args.batch_sizes)
    args.dtypes = tuple(args.dtypes or dtypes)
    # CPU steps are milliseconds long and the machine may be shared: a smaller budget per
    # measurement keeps the default run short; the median absorbs the noise.
    # On CUDA the budget mostly ends at max_reps samples; what dominates a full CUDA run is
    # brn_compiled's compilation (one per shape x layout x dtype) and graph captures.
    if args.rep_ms is None:
        args.rep_ms = 100.0 if on_cuda else 150.0
    if args.warmup_ms is None:
        args.warmup_ms = 25.0 if on_cuda else 20.0
    if args.out is None:
        args.out = default_out(device, tag, args.threads)
    return args


def write_reports(result, out: Path, with_plot: bool) -> List[Path]:
    out.with_suffix(".md").write_text(markdown_report(result))
    written = [out.with_suffix(".md")]
    if with_plot and result["rows"]:
        plot(result, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    return written


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        print_summary(result)
        written = write_reports(result, args.from_json, not args.no_plot)
        print("\nwrote " + ", ".join(str(p) for p in written))
        return result
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    print(f"device {args.device}: {len(args.shapes)} shapes x N {list(args.batch_sizes)} x "
          f"{list(args.layouts)} x {list(args.dtypes)}; impls {list(args.impls)}; "
          f"modes {list(args.modes)}")
    result = run(args)
    print_summary(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    written = [out] + write_reports(result, out, not args.no_plot)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
