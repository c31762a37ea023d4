"""The op boundary (torch.ops.batchrenorm.* called directly): a fixed-seed slice of the
adversarial calls of tests/fuzz_ops.py (`make fuzz` runs 12,000 and an AddressSanitizer run),
and the cases it found, kept as tests."""
import math

import pytest
import torch
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference

import fuzz_ops

pytestmark = pytest.mark.skipif(not brn.extension_available("cpu"),
                                reason="needs the compiled CPU kernels")
ops = torch.ops.batchrenorm


def test_adversarial_calls_raise_clearly_or_answer_right():
    counts, failures = fuzz_ops.run(range(1500), "batchrenorm")
    assert not failures, "\n".join(failures[:10])
    assert counts["ok"] > 300 and counts["error"] > 300, counts


@pytest.mark.parametrize("where", ["weight", "input"])
def test_a_meta_tensor_among_cpu_tensors_is_an_error(where):
    # Found by the fuzzer: one meta argument sends the call to the fake kernel, which returned
    # uninitialised CPU memory as the output.
    x, w = torch.randn(3, 4, 5), torch.ones(4)
    if where == "weight":
        w = w.to("meta")
    else:
        x = x.to("meta")
    with pytest.raises(RuntimeError, match="weight is on"):
        ops.forward_eval(x, w, None, torch.zeros(4), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="scale is on|input must"):
        ops.normalize(x, w, torch.zeros(4))


def test_zero_dim_meta_input_names_the_rank():
    # Found by the fuzzer: an IndexError from the fake kernel.
    with pytest.raises(RuntimeError, match="rank >= 2"):
        ops.batch_stats(torch.tensor(1.0, device="meta"))


def test_meta_tensors_alone_infer_shapes():
    y = ops.normalize(torch.empty(2, 3, 4, device="meta"), torch.empty(3, device="meta"),
                      torch.empty(3, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 4)


def test_none_for_a_required_tensor_names_it():
    # Was "tensor does not have a device", naming nothing.
    x = torch.randn(3, 4, 5)
    with pytest.raises(TypeError, match="scale must be a Tensor, got None"):
        ops.normalize(x, None, torch.zeros(4))
    with pytest.raises(TypeError, match="mean must be a Tensor, got None"):
        ops.backward_reduce(torch.randn_like(x), x, None, torch.ones(4))
    # forward_train / forward_eval: checked in their C++ autograd kernel, which runs first.
    with pytest.raises(TypeError, match="forward_train: input must be a Tensor, got None"):
        ops.forward_train(None, None, None, None, None, None, 0.1, 1e-5, 3.0, 5.0, 0, 0, 0)
    for name, args in (("input", (None, torch.zeros(4), torch.ones(4))),
                       ("running_mean", (x, None, torch.ones(4))),
                       ("running_var", (x, torch.zeros(4), None))):
        with pytest.raises(TypeError, match=f"forward_eval: {name} must be a Tensor, got None"):
            ops.forward_eval(args[0], None, None, args[1], args[2], 1e-5)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_infinite_bounds_during_warmup_are_batchnorm(backend):
    # Found by the fuzzer: r_max = inf during warm-up gave the bound 1 + inf * 0 = NaN, which
    # the kernels and the reference clipped differently. Before a ramp starts the bounds are
    # exactly (1, 0).
    step = torch.tensor(0)
    assert [float(b) for b in reference.clip_bounds(step, math.inf, math.inf, 2, 3, 3)] == [1, 0]
    x = torch.randn(4, 3, 5)
    rm, rv = torch.full((3,), 2.0), torch.full((3,), 9.0)
    y = brn.functional.batch_renorm_scheduled(x, rm, rv, None, None, True, 0.1, 1e-5, math.inf,
                                     math.inf, step, 2, 3, 3, backend=backend)
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("step,warmup", [(2 ** 63 - 1, 0), (0, -(2 ** 62)), (2 ** 62, 2 ** 62)])
def test_counter_and_warmup_at_the_int64_limits(step, warmup):
    # step + 1 and step - warmup_steps overflowed int64 (undefined behaviour in C++, wrapped in
    # the reference); both now compute the schedule in double.
    x = torch.randn(4, 3, 5)
    outs = []
    for backend in ("fused", "reference"):
        rm, rv = torch.zeros(3), torch.ones(3)
        nbt = torch.tensor(step)
        y = brn.functional.batch_renorm_scheduled(x, rm, rv, None, None, True, None, 1e-5, 2.0, 1.0,
                                         nbt, warmup, 5, 5, backend=backend)
        outs.append((y, rm, rv))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        assert_close(a, b)
