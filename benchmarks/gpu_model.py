"""GPU performance, modelled, not measured: the fused CUDA kernels' work as the CUDA emulator
counts it on a fake H100, priced with public H100 SXM figures, against ATen's native batch-norm
kernels priced the same way from their launch and pass structure, and against the HBM floor.

    python benchmarks/gpu_model.py [--jobs 2] [--quick] [--out benchmarks/results]
    (make gpu-model; about 5-10 minutes on a 2-core machine)

Every count (launches, grid syncs, CTAs, bytes read and written, the most bytes one CTA moved)
comes from running the real kernels on the emulator (tests/cuda_emulation.py) under the
in-order schedule; nothing of ours is assumed but how many bytes a CTA keeps in flight
(OURS_IN_FLIGHT). The native kernels' counts are derived below from their source. Writes
benchmarks/results/gpu_model_h100.{json,md,png}.

The model (one formula for both, per kernel):
    t = launch + latency * (1 + grid_syncs) + grid_sync * grid_syncs
        + max(dram_bytes / HBM, all_bytes / L2, waves * max_cta_bytes * latency / in_flight)
the last term being Little's law for the busiest CTA (a CTA keeping `in_flight` bytes in flight
moves in_flight per DRAM latency). An op's re-reads come from L2 when its tensors fit in L2,
else from DRAM. backward_relu (the backward of a norm followed by a ReLU, as compiled graphs call
it) is also priced against the pair it replaces, a ReLU-backward kernel then our backward, whose
dy comes from L2 when it fits there. What it leaves out: instruction throughput, bank conflicts,
L2 partition effects, clocks under power limits, the host's own per-op overhead (the same for
both).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

# ---------------------------------------------------------------------------------------------
# Public H100 SXM5 figures. None is fitted; tests/gpu/calibrate.py measures each on the first
# GPU day and reports the model's error.
H100 = dict(
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): HBM3, 3.35 TB/s.
    hbm_bytes_per_s=3.35e12,
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper: 50 MB L2 (SXM5), 132 SMs.
    l2_bytes=50 * 1024 * 1024,
    sms=132,
    # L2 bandwidth: about 5.5 TB/s, the order Chips and Cheese measured on an H100 PCIe ("Nvidia's
    # H100: Funny L2, and Tons of Bandwidth", 2023); uncertain, calibrated first.
    l2_bytes_per_s=5.5e12,
    # Back-to-back kernel launches on one stream: about 2 us each when the host issues them
    # (NVIDIA Developer Blog, "Getting Started with CUDA Graphs", 2019: a few us per short
    # kernel without graphs), the figure issue 19 uses.
    launch_s=2.0e-6,
    # A cooperative grid.sync() of a full grid: about 1.5 us (issue 19's figure; Zhang et al.,
    # "A Study of Single and Multi-device Synchronization Methods in Nvidia GPUs", IPDPS 2020,
    # measured grid synchronisation in the microsecond range on V100).
    grid_sync_s=1.5e-6,
    # DRAM load latency: 600-800 ns under load (issue 19); 700 ns.
    latency_s=0.7e-6,
    # Boost clock 1.98 GHz (datasheet); not used by the formula, recorded for calibration.
    clock_hz=1.98e9,
    max_threads_per_sm=2048,
    max_ctas_per_sm=32,
)


@dataclass
class Kernel:
    name: str
    ctas: int
    threads: int  # per CTA
    read: int  # bytes requested
    written: int
    dram: int  # of which from / to DRAM
    max_cta_bytes: int
    in_flight: int  # bytes one CTA keeps in flight
    grid_syncs: int = 0


def kernel_seconds(k: Kernel, P=H100) -> float:
    """Modelled seconds of one kernel (the formula of the module docstring)."""
    resident = P["sms"] * max(1, min(P["max_ctas_per_sm"], P["max_threads_per_sm"] // k.threads))
    waves = math.ceil(k.ctas / resident)
    busiest = waves * k.max_cta_bytes * P["latency_s"] / max(k.in_flight, 1)
    stream = max(k.dram / P["hbm_bytes_per_s"], (k.read + k.written) / P["l2_bytes_per_s"])
    return (P["launch_s"] + P["latency_s"] * (1 + k.grid_syncs) + P["grid_sync_s"] * k.grid_syncs
            + max(stream, busiest))


def dram_share(requested: int, unique: int, working_set: int, P=H100) -> int:
    """DRAM bytes of `requested` bytes that move `unique` bytes of distinct data: re-reads hit
    L2 when the op's working set fits in it."""
    return min(requested, unique) if working_set <= P["l2_bytes"] else requested


# ---------------------------------------------------------------------------------------------
# ATen's native kernels (aten/src/ATen/native/cuda/Normalization.cu and Normalization.cuh),
# read from the source, for a training step with weight, bias and running statistics:
#   forward, NCHW: batch_norm_collect_statistics_kernel (grid C, 512 threads, reads x) ->
#     batch_norm_update_stats_and_invert (a TensorIterator launch over C) ->
#     batch_norm_transform_input_kernel (grid (C, min(256K/C, N/tb)), reads x, writes y):
#     3 launches, x read twice.
#   forward, channels_last and (N, C): flexible_launch_configs; when grid.y > 1, at::zeros of
#     the semaphores (a fill launch) and batch_norm_collect_statistics_channels_last_kernel
#     (partials staged in global memory, the last CTA of a column merges them), then the update
#     launch and batch_norm_transform_input_channels_last_kernel: 3-4 launches, x read twice.
#   backward, NCHW: batch_norm_backward_kernel (grid C, 512 threads): x and dy read for the
#     reduction and again for grad_input in the same CTA, dx written: 1 launch.
#   backward, channels_last and (N, C): [zeros] + batch_norm_backward_reduce_channels_last_kernel
#     (reads x, dy) + batch_norm_backward_elemt_channels_last_kernel (reads x, dy, writes dx):
#     2-3 launches, x and dy read twice.
# Loads are scalar; a thread keeps 4 in flight (PARALLEL_LOADS = ELEMENTS_PER_ITER = 4 in the
# channels-last kernels; the same assumed of the compiler's unrolling of the NCHW loops).
NATIVE_LOADS_IN_FLIGHT = 4
MAX_BLOCK_SIZE = 512
STAT = 4  # float statistics


def threshold_backward_kernel(T: int, elt: int) -> Kernel:
    """ReLU's backward as its own launch (ATen's threshold_backward, or the kernel Inductor
    generates for it): a vectorised TensorIterator launch, 128 threads x 4 values, reading the
    incoming gradient and the ReLU output and writing dy."""
    per_cta = 128 * 4 * elt
    ctas = max(1, -(-T // per_cta))
    return Kernel("threshold_backward", ctas, 128, 2 * T, T, 3 * T, 3 * per_cta, 2 * per_cta)


def _num_threads(n: int) -> int:  # getNumThreads
    for t in (32, 64, 128, 256, MAX_BLOCK_SIZE):
        if n <= t:
            return t
    return MAX_BLOCK_SIZE


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _flexible(reduction: int, stride: int, coop: bool):  # flexible_launch_configs
    bx = min(_last_pow2(stride), 32)
    by = min(_last_pow2(-(-reduction // 16)), MAX_BLOCK_SIZE // bx)
    if bx * by != MAX_BLOCK_SIZE:
        bx = min(_last_pow2(stride), MAX_BLOCK_SIZE // by)
    gx = -(-stride // bx)
    gy = min(-(-reduction // (by * 16)), 128)
    if coop and gy < 8:
        gy = 1
    return gx, gy, bx, by


def _tiny(name: str, C: int, read: int, written: int) -> Kernel:
    # A TensorIterator launch over C values: 128 threads x 4 values.
    return Kernel(name, max(1, -(-C // 512)), 128, read, written, read + written,
                  (read + written) // max(1, -(-C // 512)) + 1, 128 * 4 * STAT)


def native_kernels(op: str, shape, layout: str, elt: int, P=H100) -> List[Kernel]:
    N, C = shape[0], shape[1]
    HW = math.prod(shape[2:]) if len(shape) > 2 else 1
    T = N * C * HW * elt
    if op == "backward_relu":  # ATen has no fused one: ReLU's backward, then BatchNorm's
        return [threshold_backward_kernel(T, elt)] + native_kernels("backward", shape, layout,
                                                                   elt, P)
    if op == "forward_train":
        working = 2 * T
        ks: List[Kernel] = []
        if layout == "contiguous":
            ks.append(Kernel("collect_statistics", C, MAX_BLOCK_SIZE, T, 2 * C * STAT,
                             T + 2 * C * STAT, N * HW * elt, MAX_BLOCK_SIZE * 4 * elt))
            ks.append(_tiny("update_stats_and_invert", C, 4 * C * STAT, 3 * C * STAT))
            tf = max(_num_threads(HW // 4), min(_num_threads(HW), 64))
            tb = max(64 // tf, 1)
            gy = max(1, min(256 * 1024 // C, -(-N // tb)))
            rows = -(-N // (tb * gy)) * tb
            ks.append(Kernel("transform_input", C * gy, tf * tb, T, T,
                             dram_share(T, 0, working, P) + T, min(rows, N) * HW * elt * 2,
                             tf * tb * NATIVE_LOADS_IN_FLIGHT * elt))
            return ks
        M = N * HW
        gx, gy, bx, by = _flexible(M, C, True)
        staged = 3 * C * gy * STAT if gy > 1 else 0
        if gy > 1:
            ks.append(_tiny("zeros(semaphores)", gx, 0, gx * 4))
        rows = -(-M // (by * gy)) * by
        ks.append(Kernel("collect_statistics_channels_last", gx * gy, bx * by, T + staged,
                         staged + 2 * C * STAT, T + 2 * staged, min(rows, M) * bx * elt,
                         bx * by * NATIVE_LOADS_IN_FLIGHT * elt))
        ks.append(_tiny("update_stats_and_invert", C, 4 * C * STAT, 3 * C * STAT))
        gx, gy, bx, by = _flexible(M, C, False)
        rows = -(-M // (by * gy)) * by
        ks.append(Kernel("transform_input_channels_last", gx * gy, bx * by, T, T,
                         dram_share(T, 0, working, P) + T, min(rows, M) * bx * elt * 2,
                         bx * by * NATIVE_LOADS_IN_FLIGHT * elt))
        return ks
    working = 3 * T
    if layout == "contiguous":
        # The second pass over x and dy is the same CTA's: from L1/L2 when the tensors fit.
        return [Kernel("backward", C, MAX_BLOCK_SIZE, 4 * T, T,
                       2 * T + dram_share(2 * T, 0, working, P) + T, 5 * N * HW * elt,
                       MAX_BLOCK_SIZE * NATIVE_LOADS_IN_FLIGHT * elt)]
    M = N * HW
    ks = []
    gx, gy, bx, by = _flexible(M, C, True)
    staged = 2 * C * gy * STAT if gy > 1 else 0
    if gy > 1:
        ks.append(_tiny("zeros(semaphores)", gx, 0, gx * 4))
    rows = -(-M // (by * gy)) * by
    ks.append(Kernel("backward_reduce_channels_last", gx * gy, bx * by, 2 * T + staged,
                     staged + 4 * C * STAT, 2 * T + 2 * staged, min(rows, M) * bx * elt * 2,
                     bx * by * NATIVE_LOADS_IN_FLIGHT * elt * 2))
    gx, gy, bx, by = _flexible(M, C, False)
    rows = -(-M // (by * gy)) * by
    ks.append(Kernel("backward_elemt_channels_last", gx * gy, bx * by, 2 * T, T,
                     dram_share(2 * T, 0, working, P) + T, min(rows, M) * bx * elt * 3,
                     bx * by * NATIVE_LOADS_IN_FLIGHT * elt * 2))
    return ks


# ---------------------------------------------------------------------------------------------
# Ours: the emulator's counts. What it cannot count is the memory-level parallelism of a CTA,
# which the kernels fix and the plan (recorded with each launch) sizes; 256 threads each:
#  - on-chip kernels (csrc/cuda/batchrenorm_onchip.cu) load a thread's register items all at
#    once, then its shared-memory items 4 at a time (Tile::load_all): 1 + ceil((items -
#    register_items) / 4) round trips carry the CTA's bytes;
#  - streaming kernels (batchrenorm_streaming.cu) keep kBytesInFlight = 64 bytes per thread in
#    flight (at most 16 items: a 2-byte scalar path keeps 32).
# Keep this in step with the kernels.
# The tensors each op reads (an item loads one vector of each), and the distinct bytes it moves.
OP_INPUTS = {"forward_train": 1, "backward": 2, "backward_relu": 3}


def OURS_IN_FLIGHT(record, op: str, elt: int) -> int:
    plan = record["plan"]
    item = elt * plan["vec"] * OP_INPUTS[op]
    if plan["regime"] == "streaming":
        return 256 * min(64, 16 * item)
    rounds = 1 + math.ceil(max(0, plan["items"] - plan["register_items"]) / 4)
    return max(1, math.ceil(record["max_cta_bytes"] / rounds))


def ours_kernels(op: str, shape, layout: str, elt: int, records, P=H100,
                 cached: int = 0) -> List[Kernel]:
    """Our op's launches priced; `cached` bytes of its inputs are already in L2 when the op's
    tensors fit there (dy written by the launch before)."""
    T = math.prod(shape) * elt
    unique = (OP_INPUTS[op] + 1) * T
    ks = []
    for i, r in enumerate(records):
        moved = r["bytes_read"] + r["bytes_written"]
        # The first launch brings the op's tensors from DRAM; re-reads (and later launches)
        # come from L2 when they fit.
        dram = dram_share(moved, unique - cached if i == 0 else 0, unique, P)
        ks.append(Kernel(r["kernel"], r["ctas"], r["threads"], r["bytes_read"], r["bytes_written"],
                         dram, r["max_cta_bytes"], OURS_IN_FLIGHT(r, op, elt),
                         r["grid_syncs"]))
    return ks


# ---------------------------------------------------------------------------------------------
# The cases and the emulation.
def cases(quick: bool, smoke: bool = False):
    import torch

    from batchrenorm_cuda._testing import BATCH_SIZES, RESNET50_SHAPES, RL_SHAPES

    if smoke:  # the script end to end in seconds (tests/test_cuda_traffic.py)
        return [((2, 16, 8, 8), "contiguous", torch.float32),
                ((2, 16, 8, 8), "channels_last", torch.bfloat16), ((64, 32), "rows", torch.float32)]
    ns = (1, 8, 32) if quick else BATCH_SIZES
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for chw in RESNET50_SHAPES:
            for n in ns:
                for layout in ("contiguous", "channels_last"):
                    out.append(((n, *chw), layout, dtype))
        for s in RL_SHAPES:
            out.append((s, "rows", dtype))
    # Largest first, so the two workers end together.
    return sorted(out, key=lambda c: -math.prod(c[0]) * c[2].itemsize)


_MODULE = None


def _count(case):
    global _MODULE
    import torch

    import cuda_emulation

    torch.set_num_threads(1)
    if _MODULE is None:
        _MODULE = cuda_emulation.load()
        _MODULE.set_device_h100()
    shape, layout, dtype = case
    start = time.process_time()
    counted = cuda_emulation.count_train_step(_MODULE, shape, layout, dtype)
    counted["device"] = _MODULE.device_properties()
    counted["cpu_s"] = time.process_time() - start
    return case, counted


ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # a record's dtype


def price(row: Dict, P=H100):
    """(fused, native) modelled microseconds of one record of the JSON under parameters P
    (tests/gpu/calibrate.py reprices with measured ones)."""
    shape, elt = tuple(row["shape"]), ELEMENT_BYTES[row["dtype"]]
    ours = ours_kernels(row["op"], shape, row["layout"], elt, row["launch_records"], P)
    native = native_kernels(row["op"], shape, row["layout"], elt, P)
    return (1e6 * sum(kernel_seconds(k, P) for k in ours),
            1e6 * sum(kernel_seconds(k, P) for k in native), len(native))


def price_unfused(relu_row: Dict, backward_row: Dict, P=H100) -> float:
    """Modelled microseconds of what backward_relu replaces: ReLU's backward kernel, then our
    backward reading the dy it wrote (from L2 when the tensors fit)."""
    shape, elt = tuple(relu_row["shape"]), ELEMENT_BYTES[relu_row["dtype"]]
    T = math.prod(shape) * elt
    ours = ours_kernels("backward", shape, relu_row["layout"], elt,
                        backward_row["launch_records"], P, cached=T)
    return 1e6 * sum(kernel_seconds(k, P) for k in [threshold_backward_kernel(T, elt)] + ours)


def model(counted_cases) -> List[Dict]:
    from batchrenorm_cuda._testing import fits_on_chip, traffic_limit

    rows = []
    for (shape, layout, dtype), counted in counted_cases:
        T = counted["tensor_bytes"]
        case_rows = {}
        for op in ("forward_train", "backward", "backward_relu"):
            recs = counted[op]
            moved_in, moved_out = OP_INPUTS[op] * T, T
            # backward_relu keeps on chip what backward does (the masked dy and x).
            fits = fits_on_chip(min(moved_in, 2 * T), counted["device"])
            read = sum(r["bytes_read"] for r in recs)
            written = sum(r["bytes_written"] for r in recs)
            row = {
                "op": op, "shape": list(shape), "layout": layout,
                "dtype": str(dtype).split(".")[-1],
                "launches": len(recs), "grid_syncs": sum(r["grid_syncs"] for r in recs),
                "ctas": sum(r["ctas"] for r in recs), "bytes_read": read,
                "bytes_written": written,
                "max_cta_bytes": max((r["max_cta_bytes"] for r in recs), default=0),
                "kernels": [r["kernel"] for r in recs],
                "tensor_bytes": T, "fits_on_chip": fits,
                "traffic_rule_met": (len(recs) == 1 and (not fits or (
                    read <= traffic_limit(moved_in, shape[1])
                    and written <= traffic_limit(moved_out, shape[1])))),
                "floor_us": 1e6 * (moved_in + moved_out) / H100["hbm_bytes_per_s"],
                "launch_records": [
                    {"kernel": r["kernel"], "ctas": r["ctas"], "threads": math.prod(r["block"]),
                     "shared_bytes": r["shared_bytes"], "cooperative": r["cooperative"],
                     "grid_syncs": r["grid_syncs"], "bytes_read": r["bytes_read"],
                     "bytes_written": r["bytes_written"], "max_cta_bytes": r["max_cta_bytes"],
                     "plan": r["plan"]}
                    for r in recs],
            }
            row["modeled_us"], row["native_modeled_us"], row["native_launches"] = price(row)
            if op == "backward_relu":
                row["unfused_modeled_us"] = price_unfused(row, case_rows["backward"])
            case_rows[op] = row
            rows.append(row)
    return rows


def geomean(xs):
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _case_name(r):
    return f"{'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype']}"


def write_markdown(rows, path, seconds, device):
    steps = {}
    for r in rows:
        key = (tuple(r["shape"]), r["layout"], r["dtype"])
        steps.setdefault(key, {})[r["op"]] = r
    step_ratio = {k: (v["forward_train"]["modeled_us"] + v["backward"]["modeled_us"])
                  / (v["forward_train"]["native_modeled_us"] + v["backward"]["native_modeled_us"])
                  for k, v in steps.items()}
    lines = ["# Fused Batch Renorm vs ATen's native batch norm on an H100: modelled, not measured",
             "",
             "Counts from the CUDA emulator's fake H100 (benchmarks/gpu_model.py; "
             f"{len(steps)} training steps emulated in {seconds:.0f} s), priced with public H100 "
             "SXM figures; the native kernels priced the same way from their source. "
             "Ratio: modelled fused / native time of a training step (forward_train + backward); "
             "below 1 the fused kernels are modelled faster. Nothing here ran on a GPU.", "",
             "Assumed for occupancy on the fake H100: "
             f"{device['assumed_registers_per_thread']} registers per thread, "
             f"{device['assumed_static_shared'] // 1024} KiB of static shared memory per kernel "
             "(.ci/check_cuda_kernels prints ptxas's figures for sm_90). Parameters: "
             + ", ".join(f"{k} {v:g}" for k, v in H100.items()) + ".", "",
             "| layout | dtype | steps | geomean ratio | worst ratio (case) | traffic rule met |",
             "|---|---|---|---|---|---|"]
    for layout in ("contiguous", "channels_last", "rows"):
        for dtype in ("float32", "bfloat16"):
            ks = [k for k in step_ratio if k[1] == layout and k[2] == dtype]
            if not ks:
                continue
            worst = max(ks, key=lambda k: step_ratio[k])
            met = sum(steps[k]["forward_train"]["traffic_rule_met"]
                      and steps[k]["backward"]["traffic_rule_met"] for k in ks)
            lines.append(f"| {layout} | {dtype} | {len(ks)} | "
                         f"{geomean(step_ratio[k] for k in ks):.2f} | {step_ratio[worst]:.2f} "
                         f"({'x'.join(map(str, worst[0]))}) | {met} / {len(ks)} |")
    lines += ["", f"All {len(step_ratio)} steps: geomean ratio "
              f"**{geomean(step_ratio.values()):.2f}**, worst "
              f"**{max(step_ratio.values()):.2f}**; steps with ratio <= 1: "
              f"{sum(v <= 1 for v in step_ratio.values())}.", ""]
    lines += _relu_section(steps)
    lines += ["## Worst ten steps", "",
              "| case | fused us | native us | floor us | ratio | launches fwd/bwd | "
              "grid syncs fwd/bwd | read / tensor fwd, bwd |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted(step_ratio, key=lambda k: -step_ratio[k])[:10]:
        f, b = steps[k]["forward_train"], steps[k]["backward"]
        lines.append(
            f"| {_case_name(f)} | {f['modeled_us'] + b['modeled_us']:.1f} | "
            f"{f['native_modeled_us'] + b['native_modeled_us']:.1f} | "
            f"{f['floor_us'] + b['floor_us']:.1f} | {step_ratio[k]:.2f} | "
            f"{f['launches']}/{b['launches']} | {f['grid_syncs']}/{b['grid_syncs']} | "
            f"{f['bytes_read'] / f['tensor_bytes']:.2f}, "
            f"{b['bytes_read'] / b['tensor_bytes']:.2f} |")
    lines += ["", "## Every op", "",
              "| op | case | launches | grid syncs | CTAs | read / tensor | written / tensor | "
              "fits on chip | rule met | fused us | native us | floor us |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['op']} | {_case_name(r)} | {r['launches']} | {r['grid_syncs']} | {r['ctas']} | "
            f"{r['bytes_read'] / r['tensor_bytes']:.2f} | "
            f"{r['bytes_written'] / r['tensor_bytes']:.2f} | "
            f"{'yes' if r['fits_on_chip'] else 'no'} | "
            f"{'yes' if r['traffic_rule_met'] else 'NO'} | {r['modeled_us']:.1f} | "
            f"{r['native_modeled_us']:.1f} | {r['floor_us']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return step_ratio


def _relu_section(steps) -> List[str]:
    """backward_relu against the two launches it replaces in a compiled graph (ReLU's backward
    kernel, then our backward) and against ATen's two kernels."""
    lines = ["## A norm followed by a ReLU: backward_relu (torch.compile's rewrite)", "",
             "backward_relu / (ReLU's backward kernel + our backward), modelled; and / (ReLU's "
             "backward kernel + ATen's batch-norm backward).", "",
             "| layout | dtype | cases | / unfused: geomean | worst (case) | / ATen's pair: "
             "geomean |", "|---|---|---|---|---|---|"]
    relu = {k: v["backward_relu"] for k, v in steps.items() if "backward_relu" in v}
    for layout in ("contiguous", "channels_last", "rows"):
        for dtype in ("float32", "bfloat16"):
            ks = [k for k in relu if k[1] == layout and k[2] == dtype]
            if not ks:
                continue
            ratio = {k: relu[k]["modeled_us"] / relu[k]["unfused_modeled_us"] for k in ks}
            worst = max(ks, key=lambda k: ratio[k])
            native = geomean(relu[k]["modeled_us"] / relu[k]["native_modeled_us"] for k in ks)
            lines.append(f"| {layout} | {dtype} | {len(ks)} | {geomean(ratio.values()):.2f} | "
                         f"{ratio[worst]:.2f} ({'x'.join(map(str, worst[0]))}) | "
                         f"{native:.2f} |")
    return lines + [""]


def write_plot(rows, step_ratio, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for layout, marker in (("contiguous", "o"), ("channels_last", "s"), ("rows", "^")):
        for dtype, color in (("float32", "tab:blue"), ("bfloat16", "tab:orange")):
            ks = [k for k in step_ratio if k[1] == layout and k[2] == dtype]
            if not ks:
                continue
            size = [math.prod(k[0]) * (4 if dtype == "float32" else 2) / 1e6 for k in ks]
            ax.scatter(size, [step_ratio[k] for k in ks], marker=marker, color=color, s=18,
                       label=f"{layout} {dtype}", alpha=0.8)
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensor size (MB)")
    ax.set_ylabel("fused / native, training step")
    ax.set_title("Fused Batch Renorm vs ATen native BN on H100: modelled, not measured",
                 fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2,
                    help="emulating processes (default 2; 1: in this process)")
    ap.add_argument("--quick", action="store_true", help="N in (1, 8, 32) only")
    ap.add_argument("--smoke", action="store_true", help="3 tiny cases, files named *_smoke")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    import cuda_emulation

    cuda_emulation.load()  # builds once, before the workers start
    todo = cases(args.quick, args.smoke)
    start = time.time()
    done = []

    def report(i, case, counted):
        done.append((case, counted))
        shape, layout, dtype = case
        print(f"[{i}/{len(todo)}] {'x'.join(map(str, shape))} {layout} "
              f"{str(dtype).split('.')[-1]}: {counted['cpu_s']:.1f} s", flush=True)

    if args.jobs == 1:
        for i, case in enumerate(todo, 1):
            report(i, *_count(case))
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for i, (case, counted) in enumerate(pool.imap_unordered(_count, todo), 1):
                report(i, case, counted)
    seconds = time.time() - start
    done.sort(key=lambda c: (str(c[0][2]), c[0][1], c[0][0]))
    rows = model(done)
    os.makedirs(args.out, exist_ok=True)
    suffix = "_smoke" if args.smoke else "_quick" if args.quick else ""
    stem = os.path.join(args.out, "gpu_model_h100" + suffix)
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    step_ratio = write_markdown(rows, stem + ".md", seconds, done[0][1]["device"])
    write_plot(rows, step_ratio, stem + ".png")
    print(f"emulated {len(todo)} steps in {seconds:.0f} s; geomean fused/native "
          f"{geomean(step_ratio.values()):.2f}, worst {max(step_ratio.values()):.2f}; "
          f"wrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
