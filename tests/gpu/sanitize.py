"""Every batchrenorm op on CUDA, small inputs, every dtype and layout path: the workload that
tests/gpu/run_all.sh runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

initcheck matters here: the reductions' workspace comes from the caching allocator and is
never memset, so a read of a partial that no CTA wrote would show up as uninitialised.
Exits non-zero if an op raises; the sanitizer's own exit code reports memory errors.
"""
import sys

import torch

import batchrenorm_cuda as brn
from batchrenorm_cuda._testing import make_params

ops = torch.ops.batchrenorm
DEV = "cuda"

# (shape, memory format): NCHW vector / scalar paths, NHWC vector / scalar, rank 2, 5-D,
# several CTAs per channel, several channels per CTA, a non-contiguous input.
CASES = [
    ((4, 6, 8, 8), torch.contiguous_format),
    ((3, 5, 7, 7), torch.contiguous_format),
    ((3, 16, 7, 7), torch.channels_last),
    ((3, 5, 6, 7), torch.channels_last),
    ((33, 12), torch.contiguous_format),
    ((2, 19, 3, 4, 5), torch.channels_last_3d),
    ((16, 3, 40, 40), torch.contiguous_format),
    ((16, 8, 20, 20), torch.channels_last),
    ((2, 600, 5, 5), torch.contiguous_format),
    ("slice", torch.contiguous_format),
]


def run_case(shape, fmt, dtype):
    if shape == "slice":
        x = torch.randn(3, 10, 5, 6, device=DEV)[:, ::2].to(dtype)
        shape = tuple(x.shape)
    else:
        x = (torch.randn(shape, device=DEV) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    C = shape[1]
    g = torch.randn(shape, device=DEV).to(dtype)
    w, b, rm, rv = make_params(C, dtype, device=DEV)
    nbt = torch.tensor(3, device=DEV)
    y, mean, invstd, r, d = ops.forward_train(x, w, b, rm, rv, nbt, None, 1e-5, 1.5, 0.5, 1, 2, 2)
    ops.forward_train(x, None, None, None, None, None, 0.1, 1e-5, 3.0, 5.0, 0, 0, 0)
    ops.forward_eval(x, w, b, rm, rv, 1e-5)
    ops.forward_eval(x, None, None, rm, rv, 1e-5)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        ops.backward(g, x, w, mean, invstd, r, d, True, mask)
        ops.backward(g, x, w, rm, invstd, None, None, False, mask)
        ops.backward_relu(g, y.relu(), x, w, mean, invstd, r, d, True, mask)
        ops.backward_relu(g, y.relu(), x, w, rm, invstd, None, None, False, mask)
    m, m2 = ops.batch_stats(x)
    ops.normalize(x, invstd, mean)
    s0, s1 = ops.backward_reduce(g, x, mean, invstd)
    ops.backward_input(g, x, mean, invstd, w, s0, s1)
    # Through autograd and the module, as training does.
    module = brn.BatchRenorm2d(C).to(DEV) if len(shape) == 4 else None
    if module is not None and dtype == torch.float32:
        xr = x.detach().clone().requires_grad_()
        module(xr).sum().backward()


def main():
    # --dtypes float32,bfloat16 runs a slice (tests/gpu/run_all.sh: a sanitizer is slow).
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    if len(sys.argv) == 3 and sys.argv[1] == "--dtypes":
        dtypes = tuple(getattr(torch, name) for name in sys.argv[2].split(","))
    for shape, fmt in CASES:
        for dtype in dtypes:
            run_case(shape, fmt, dtype)
    torch.cuda.synchronize()
    print("sanitize.py: all ops ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
