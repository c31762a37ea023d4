"""Every regime of the CUDA reductions (csrc/cuda/batchrenorm_plan.cu) against the reference, on
the emulator, with fake devices small enough to force each one and each boundary between them:

  resident    NCHW with a warp, two warps and a whole CTA per channel; NHWC tiles of 2 to 16
              columns; tiles larger than the registers, so items live in shared memory too;
              one CTA (the counter advanced without a ticket) and many (with one)
  persistent  NCHW and NHWC channels split over CTAs that keep their slices on chip across one
              grid barrier
  streaming   what does not fit on the fake device at all

Each case first checks the plan (so a change of the planner cannot silently move a case to
another regime), then three training steps and an eval step against the reference: outputs,
the three gradients, the buffers and the counter (tests/fused_cases.py).
"""
import pytest
import torch

import batchrenorm_cuda as brn
from batchrenorm_cuda._testing import fused_ops_namespace

import fused_cases

pytestmark = pytest.mark.cuda_emulation

# (shape, layout, dtype, fake device (SMs, CTAs per SM; 48 KiB of shared memory per CTA),
# expected plan fields)
CASES = [
    # 7x7 at N = 1 is 49 values: one warp per channel, 8 channels per CTA, scalar items.
    ((1, 20, 7, 7), "contiguous", torch.float32, (16, 2), dict(regime="resident", team_warps=1)),
    # 14x14 at N = 3: 147 float4 vectors, two warps.
    ((3, 6, 14, 14), "contiguous", torch.float32, (16, 2), dict(regime="resident", team_warps=2)),
    # A whole CTA per channel, and a single CTA (no ticket).
    ((8, 1, 32, 32), "contiguous", torch.float32, (16, 2),
     dict(regime="resident", team_warps=8, grid=1, backward="persistent")),
    # Items beyond the registers (8 vectors), in shared memory: 12288 values = 3072 vectors =
    # 12 per thread. The backward's items are (dy, x) pairs, twice the size: it splits.
    ((3, 3, 64, 64), "contiguous", torch.float32, (16, 2),
     dict(regime="resident", items=12, backward="persistent")),
    ((3, 3, 128, 64), "contiguous", torch.bfloat16, (16, 2),
     dict(regime="resident", items=12, backward="persistent")),
    # NHWC tiles: rows, 3-d channels_last, odd C (scalar path), half.
    ((512, 64), "contiguous", torch.float32, (16, 2), dict(regime="resident", tx=2)),
    ((4, 40, 6, 7), "channels_last", torch.float16, (16, 2), dict(regime="resident")),
    ((3, 19, 5, 6), "channels_last", torch.float32, (16, 2), dict(regime="resident", vec=1)),
    ((2, 12, 3, 4, 5), "channels_last_3d", torch.float64, (16, 2), dict(regime="resident")),
    ((4, 32, 20, 20), "channels_last", torch.float32, (4, 2),
     dict(regime="resident", items=13, backward="persistent")),
    # Persistent: one channel split over several co-resident CTAs.
    ((4, 3, 80, 80), "contiguous", torch.float32, (16, 2), dict(regime="persistent")),
    ((4, 3, 112, 112), "contiguous", torch.float16, (16, 2), dict(regime="persistent")),
    ((16, 8, 40, 40), "channels_last", torch.float32, (16, 2), dict(regime="persistent")),
    ((3, 5, 101, 67), "contiguous", torch.float32, (16, 2), dict(regime="persistent", vec=1)),
    # Streaming: does not fit on a one-CTA device.
    ((4, 3, 80, 80), "contiguous", torch.float32, (1, 1), dict(regime="streaming")),
    ((16, 8, 40, 40), "channels_last", torch.float32, (1, 1), dict(regime="streaming")),
]


def _id(case):
    shape, kind, dtype, device, expect = case
    return f"{expect['regime']}-{'x'.join(map(str, shape))}-{kind}-{str(dtype)[6:]}-{device}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_regime_matches_reference(case, cuda_emulation):
    shape, kind, dtype, device, expect = case
    expect = dict(expect)
    sms, ctas_per_sm = device
    # An H100's SM with fewer SMs, fewer CTAs each and 48 KiB of shared memory per CTA: small
    # tensors reach every regime, so the emulator runs them in seconds.
    cuda_emulation.set_device_properties(sms=sms, max_ctas_per_sm=ctas_per_sm,
                                          shared_per_block_optin=48 * 1024)
    ops = torch.ops.batchrenorm_emulated_cuda
    try:
        x = fused_cases.layout(shape, kind, "cpu").to(dtype)
        state = fused_cases.State(shape[1], dtype, "cpu")
        with torch.no_grad():
            out = ops.forward_train(x, state.weight, state.bias, state.running_mean,
                                    state.running_var, state.num_batches_tracked, 0.1, 1e-3,
                                    2.0, 1.0, 0, 0, 0)
        plan = cuda_emulation.last_plan()
        backward = expect.pop("backward", expect["regime"])
        assert {k: plan[k] for k in expect} == expect, plan
        ops.backward(x, x, state.weight, out[1], out[2], out[3], out[4], True,
                     [True, True, True])
        assert cuda_emulation.last_plan()["regime"] == backward
        with fused_ops_namespace("batchrenorm_emulated_cuda"):
            fused_cases.compare_steps(shape, kind, dtype, "cpu")
    finally:
        cuda_emulation.set_device(16, 2)


def test_batch_stats_ops_stream(cuda_emulation):
    """batch_stats and backward_reduce write no tensor: one streaming pass, whatever fits."""
    cuda_emulation.set_device(16, 2)
    ops = torch.ops.batchrenorm_emulated_cuda
    x = torch.randn(4, 6, 5, 5)
    mean, m2 = ops.batch_stats(x)
    assert cuda_emulation.last_plan()["regime"] == "streaming"
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(m2, ((x - x.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3)))
    ops.backward_reduce(x, x, mean, torch.ones(6))
    assert cuda_emulation.last_plan()["regime"] == "streaming"
    assert brn.extension_available("cpu")
