"""A CPU training step (forward_train, then backward) on a float16 input of more than 2^31
elements, compared with the reference on sampled channels: the ones whose offsets pass 2^31,
where 32-bit index arithmetic would wrap. Part of `make fuzz`, not of `make test`: it needs
about 9 GB of memory (input, output and grad_input of 4.3 GB each, the output freed before the
backward) and a minute or two.

    python tests/fuzz_big.py
"""
from __future__ import annotations

import sys
import time

import torch
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda._testing import tolerance

SHAPE = (8, 64, 2049, 2048)  # 2,148,007,936 elements > 2^31 = 2,147,483,648
SAMPLED = [0, 1, 31, 62, 63]  # channel 63 of the last item starts beyond 2^31


def main() -> int:
    if not brn.extension_available("cpu"):
        print("fuzz big: the CPU extension is not built", file=sys.stderr)
        return 1
    t0 = time.time()
    numel = torch.Size(SHAPE).numel()
    assert numel > 2 ** 31
    C = SHAPE[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(SHAPE, dtype=torch.float16)
    # Filled per item so that no float32 temporary of the whole tensor exists.
    for n in range(SHAPE[0]):
        x[n] = (torch.randn(SHAPE[1:], generator=gen) * 1.5 + 0.25 * n).half()
    # Channel 63 of the last item gets its own offset, so a wrapped index would show.
    x[-1, -1] += 7.0
    weight = torch.rand(C, generator=gen) + 0.5
    bias = torch.rand(C, generator=gen) - 0.5
    rm, rv = torch.zeros(C), torch.ones(C)
    nbt = torch.tensor(10)
    ops = torch.ops.batchrenorm
    rm0, rv0, nbt0 = rm.clone(), rv.clone(), nbt.clone()
    y, mean, invstd, r, d = ops.forward_train(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, 3.0, 5.0,
                                              0, 0, 0)
    t_fwd = time.time() - t0

    idx = torch.tensor(SAMPLED)
    xs = x[:, idx].contiguous().requires_grad_()
    ws, bs = weight[idx].clone().requires_grad_(), bias[idx].clone().requires_grad_()
    rms, rvs, nbts = rm0[idx].clone(), rv0[idx].clone(), nbt0.clone()
    ys = reference.batch_renorm(xs, rms, rvs, ws, bs, True, 0.1, 1e-5, 3.0, 5.0, nbts)
    tol = tolerance(torch.float16)
    assert_close(y[:, idx], ys.detach(), **tol)
    assert_close(rm[idx], rms, rtol=1e-5, atol=1e-5)
    assert_close(rv[idx], rvs, rtol=1e-5, atol=1e-5)
    assert int(nbt) == int(nbts) == 11
    del y
    # Backward with grad_output = x: no third full-size tensor.
    t1 = time.time()
    dx, dw, db = ops.backward(x, x, weight, mean, invstd, r, d, True, [True, True, True])
    t_bwd = time.time() - t1
    ys.backward(xs.detach())
    m = numel // C
    assert_close(dx[:, idx], xs.grad, **tol)
    assert_close(dw[idx], ws.grad, atol=tol["atol"] * m ** 0.5, rtol=tol["rtol"] * 4)
    assert_close(db[idx], bs.grad, atol=tol["atol"] * m ** 0.5, rtol=tol["rtol"] * 4)
    print(f"fuzz big: float16 input {SHAPE} = {numel:,} elements (> 2^31): forward_train "
          f"{t_fwd:.0f} s, backward {t_bwd:.0f} s; channels {SAMPLED} match the reference "
          f"(output, buffers, counter, grad_input, grad_weight, grad_bias); "
          f"{time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
