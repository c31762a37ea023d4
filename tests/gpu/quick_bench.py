"""Quick side-by-side timing of the fused CUDA kernels against nn.BatchNorm2d (cuDNN) on
ResNet-50 layer shapes: forward (train), backward, eval; fp32 and fp16; NCHW and NHWC.
Medians of CUDA-event timings; prints a Markdown table (run_all.sh saves it). Not the
project's benchmark harness (benchmarks/), just a first look for the GPU session."""
import statistics

import torch
from torch import nn

import batchrenorm_cuda as brn

SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
          (32, 2048, 7, 7)]


def timeit(fn, iters=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def main():
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| shape | dtype | layout | brn fwd us | bn fwd us | brn fwd+bwd us | bn fwd+bwd us "
          "| brn eval us | bn eval us | brn fwd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.float16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                C = shape[1]
                x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                g = torch.randn_like(x)
                brm = brn.BatchRenorm2d(C, warmup_steps=0, r_max_ramp_steps=0,
                                        d_max_ramp_steps=0).cuda()
                bn = nn.BatchNorm2d(C).cuda()
                if dtype == torch.float16:
                    bn = bn.to(memory_format=fmt)
                xr = x.detach().requires_grad_()

                def fwd(m):
                    with torch.no_grad():
                        m(x)

                def fwdbwd(m):
                    m(xr).backward(g)

                row = [str(shape), str(dtype).split(".")[-1],
                       "NHWC" if fmt == torch.channels_last else "NCHW"]
                t = {}
                for name, m in (("brn", brm), ("bn", bn)):
                    m.train()
                    t[name + "f"] = timeit(lambda: fwd(m))
                    t[name + "fb"] = timeit(lambda: fwdbwd(m))
                    m.eval()
                    t[name + "e"] = timeit(lambda: fwd(m))
                gbs = 2 * x.numel() * x.element_size() / (t["brnf"] * 1e-6) / 1e9
                row += [f"{t['brnf']:.1f}", f"{t['bnf']:.1f}", f"{t['brnfb']:.1f}",
                        f"{t['bnfb']:.1f}", f"{t['brne']:.1f}", f"{t['bne']:.1f}", f"{gbs:.0f}"]
                print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
