"""The ops called directly (torch.ops.batchrenorm.* and the emulated CUDA namespace), with one
test body for every backend (fused_cases.py's `backend` fixture: the CPU kernels, the CUDA build
on a GPU, the CUDA kernels on the emulator): opcheck, each backend against the CPU kernels, the
output mask and the eval form, the SyncBatchRenorm building blocks, outputs poisoned before the
kernels run, and the argument checks' exception types and words. The training steps against the
reference are in test_fused_kernels.py."""
import contextlib

import pytest
import torch
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference
from batchrenorm_cuda._testing import DTYPES, make_params, tolerance

from fused_cases import backend_fixture  # noqa: F401 - autouse: every test on every backend
from fused_cases import op_samples
from fused_cases import buffer_tol as _buffer_tol
from fused_cases import grad_tol as _grad_tol


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, torch.contiguous_format),
                                       (torch.bfloat16, torch.channels_last),
                                       (torch.float16, torch.contiguous_format),
                                       (torch.float64, torch.channels_last)], ids=str)
@pytest.mark.parametrize("name", ["forward_train", "forward_eval", "backward", "backward_relu",
                                  "batch_stats", "normalize", "backward_reduce",
                                  "backward_input"])
def test_opcheck(name, dtype, fmt, backend):
    args = op_samples(backend.device, dtype, fmt)[name]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(backend.ops, name).default, args, test_utils=tests)
    if name in ("forward_train", "forward_eval"):
        # With input, weight and bias requiring grad: the C++ autograd (batchrenorm_autograd.h)
        # is registered, and AOTAutograd traces through it.
        args = tuple(a.detach().clone().requires_grad_() if i < 3 else a
                     for i, a in enumerate(args))
        torch.library.opcheck(getattr(backend.ops, name).default, args, test_utils=tests)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", [((3, 5, 4, 6), torch.contiguous_format),
                                       ((3, 8, 7, 7), torch.channels_last),
                                       ((40, 6), torch.contiguous_format)])
def test_ops_match_cpu_kernels(dtype, shape, fmt, backend):
    # Same op, same inputs, on both devices (the CPU kernels are tested against the reference).
    if backend == "cpu":
        pytest.skip("the CPU kernels are what the other backends are compared with here")
    if not brn.extension_available("cpu"):
        pytest.skip("needs the compiled CPU kernels")
    samples = op_samples(backend.device, dtype, fmt, shape)
    tol = tolerance(dtype)
    for name, args in samples.items():
        if name == "forward_train":
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        cpu_args = tuple(a.cpu().clone() if isinstance(a, torch.Tensor) else a for a in args)
        out = getattr(backend.ops, name)(*args)
        out_cpu = getattr(torch.ops.batchrenorm, name)(*cpu_args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        outs_cpu = out_cpu if isinstance(out_cpu, (tuple, list)) else (out_cpu,)
        for a, b in zip(outs, outs_cpu):
            assert a.device.type == torch.device(backend.device).type
            # Full-size outputs: elementwise tolerance; per-channel ones are sums over m values.
            t = tol if a.dim() > 1 else _grad_tol(dtype, args[0])
            assert_close(a.cpu(), b, **t, msg=lambda m: f"{name}: {m}")
        if name == "forward_train":
            for i in (3, 4):  # running_mean, running_var
                assert_close(args[i].cpu(), cpu_args[i], **_buffer_tol(dtype))
            assert args[5].item() == cpu_args[5].item() == 3


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backward_output_mask_and_eval_form(fmt, backend):
    x = torch.randn(4, 3, 5, 5, device=backend.device).contiguous(memory_format=fmt)
    g = torch.randn(4, 3, 5, 5, device=backend.device)
    mean, invstd = torch.randn(3, device=backend.device), torch.rand(3, device=backend.device) + 0.5
    w = torch.rand(3, device=backend.device) + 0.5
    full = backend.ops.backward(g, x, w, mean, invstd, None, None, False, [True, True, True])
    assert all(t is not None for t in full)
    assert_close(full[0], g * (w * invstd).view(1, 3, 1, 1))
    xhat = (x - mean.view(1, 3, 1, 1)) * invstd.view(1, 3, 1, 1)
    assert_close(full[1], (g * xhat).sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert_close(full[2], g.sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    dx_only = backend.ops.backward(g, x, w, mean, invstd, None, None, False, [True, False, False])
    assert torch.equal(dx_only[0], full[0])
    full_t = backend.ops.backward(g, x, w, mean, invstd, None, None, True, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True],
                 [False, False, False], [True, True, False]):
        out = backend.ops.backward(g, x, w, mean, invstd, None, None, True, mask)
        assert [t is not None for t in out] == mask
        for t, f in zip(out, full_t):
            if t is not None:
                assert torch.equal(t, f)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_mixed = backend.ops.backward(g, x_cl, w, mean, invstd, None, None, True, [True, True, True])
    out_same = backend.ops.backward(g.contiguous(memory_format=torch.channels_last), x_cl, w, mean,
                            invstd, None, None, True, [True, True, True])
    assert out_mixed[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(out_mixed, out_same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_building_blocks_compose_to_the_fused_step(fmt, backend):
    x = (torch.randn(4, 6, 5, 5, device=backend.device) * 2 + 1).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    w, b, rm, rv = make_params(6, torch.float32, device=backend.device)
    y, mean, invstd, r, d = backend.ops.forward_train(x, w, b, rm.clone(), rv.clone(), None,
                                                      0.1, 1e-5,
                                              1.5, 0.5, 0, 0, 0)
    m = x.numel() // 6
    bmean, m2 = backend.ops.batch_stats(x)
    assert_close(bmean, mean)
    assert_close(torch.rsqrt(m2 / m + 1e-5), invstd)
    scale = w * r * invstd
    shift = b + w * (d - r * mean * invstd)
    assert_close(backend.ops.normalize(x, scale, shift), y, atol=1e-5, rtol=1e-5)
    sum_dy, sum_dy_xhat = backend.ops.backward_reduce(g, x, mean, invstd)
    xhat = (x - mean.view(1, 6, 1, 1)) * invstd.view(1, 6, 1, 1)
    assert_close(sum_dy, g.sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert_close(sum_dy_xhat, (g * xhat).sum((0, 2, 3)), atol=1e-4, rtol=1e-4)
    dx, dw, db = backend.ops.backward(g, x, w, mean, invstd, r, d, True, [True, True, True])
    assert_close(db, sum_dy)
    assert_close(dw, r * sum_dy_xhat + d * sum_dy)
    dx2 = backend.ops.backward_input(g, x, mean, invstd, scale, sum_dy / m, sum_dy_xhat / m)
    assert_close(dx2, dx, atol=1e-5, rtol=1e-4)


@contextlib.contextmanager
def _poisoned_allocations():
    """Within the block every floating-point tensor allocated through ATen (at::empty and
    the like, which the ops' glue uses for their outputs) starts as NaN, on every device:
    PyTorch's deterministic mode fills uninitialised memory. An output element a kernel does not
    write stays NaN."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def test_poisoned_allocations_catch_an_unwritten_output(backend):
    # The checker below can fail: an "op" that allocates its output and writes nothing.
    x = torch.randn(3, 7, 9, 11, device=backend.device)
    with _poisoned_allocations():
        unwritten = torch.empty_like(x)
    assert torch.isnan(unwritten).all()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 7, 9, 11), (3, 9, 9, 11)])  # CPU: 2-pass, fused backward
def test_no_poison_survives(fmt, shape, backend):
    samples = op_samples(backend.device, torch.float32, fmt, shape)
    for name, args in samples.items():
        if name == "forward_train":
            args = args[:3] + (args[3].clone(), args[4].clone(), args[5].clone()) + args[6:]
        with _poisoned_allocations():
            out = getattr(backend.ops, name)(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            assert t is not None
            assert torch.isfinite(t).all(), name
    x, w, b, rm, rv = samples["forward_train"][:5]
    with _poisoned_allocations():
        y = backend.ops.forward_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5, 3.0,
                                      5.0, 0, 0, 0)[0]
    y_ref = reference.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 3.0, 5.0)
    assert_close(y, y_ref, equal_nan=False, **tolerance(torch.float32))


# The exception types and words of the Python API (batchrenorm_checks.h): ValueError for a
# shape or a range, TypeError for a dtype, RuntimeError for a device.
@pytest.mark.parametrize("call,error,match", [
    (lambda ops, x, w: ops.forward_eval(x, w[:3], None, w, w, 1e-5), ValueError,
     r"weight must have shape \(C,\) = \(4,\), got \(3,\)"),
    (lambda ops, x, w: ops.forward_eval(x, w.double(), None, w, w, 1e-5), TypeError,
     "weight must be torch.float32 for torch.float32 input, got torch.float64"),
    (lambda ops, x, w: ops.forward_eval(x, w.cpu(), None, w, w, 1e-5), RuntimeError,
     "weight is on cpu"),
    (lambda ops, x, w: ops.forward_eval(x[0, 0, 0], None, None, w, w, 1e-5), ValueError,
     r"rank >= 2, got shape \(3,\)"),
    (lambda ops, x, w: ops.forward_eval(x.int(), None, None, w, w, 1e-5), TypeError,
     "input must be float32, float64, float16 or bfloat16, got torch.int32"),
    (lambda ops, x, w: ops.forward_eval(x, None, None, w, w, 0.0), ValueError, "eps must be > 0"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), None, None, 0.1, 1e-5, 3.0, 5.0,
                                    0, 0, 0), ValueError, "both be tensors or both be None"),
    (lambda ops, x, w: ops.forward_train(x[:1, :, :1, :1], None, None, None, None, None, 0.1, 1e-5,
                                    3.0, 5.0, 0, 0, 0), ValueError,
     r"Expected more than 1 value per channel when training, got input size \(1, 4, 1, 1\)"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None, None, 1e-5,
                                    3.0, 5.0, 0, 0, 0), ValueError, "momentum=None"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), torch.tensor(0), 0.1,
                                    1e-5, 3.0, 5.0, 0, 0, 0), RuntimeError,
     "num_batches_tracked is on cpu"),
    (lambda ops, x, w: ops.backward(x[:1], x, None, w, w, None, None, True, [True, True, True]),
     ValueError, "grad_output must have the input's shape"),
    (lambda ops, x, w: ops.normalize(x, w, w[:2]), ValueError, r"shift must have shape \(C,\)"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None,
                                         float("nan"), 1e-5,
                                         3.0, 5.0, 0, 0, 0), ValueError,
     r"momentum must be in \[0, 1\]"),
    (lambda ops, x, w: ops.forward_train(x, None, None, w.clone(), w.clone(), None, 0.1, 1e-5, 0.5,
                                    5.0, 0, 0, 0), ValueError, "r_max must be >= 1"),
    (lambda ops, x, w: ops.forward_train(x, None, None, None, None,
                                    torch.tensor(1.0, device=x.device), 0.1, 1e-5, 3.0, 5.0,
                                    0, 0, 0), TypeError,
     r"num_batches_tracked must be an int64 scalar tensor, got torch.float32 of shape \(\)"),
])
def test_op_argument_checks(call, error, match, backend):
    if backend != "cuda" and match in ("weight is on cpu", "num_batches_tracked is on cpu"):
        pytest.skip("a device mismatch needs two devices")
    x = torch.randn(2, 4, 3, 3, device=backend.device)
    w = torch.rand(4, device=backend.device) + 0.5
    with pytest.raises(error, match=match):
        call(backend.ops, x, w)
