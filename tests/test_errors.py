"""Bad input gets a clear error naming the argument; nothing touches the running buffers first."""
import pytest
import torch

import batchrenorm_cuda as brn

BACKENDS = ["reference"] + (["fused"] if brn.extension_available("cpu") else [])


def _buffers(C=4, dtype=torch.float32):
    return torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)


def _call(x, rm=None, rv=None, backend="reference", **kwargs):
    if rm is None:
        rm, rv = _buffers(x.shape[1] if x.dim() > 1 else 4)
    kwargs.setdefault("training", True)
    return brn.batch_renorm(x, rm, rv, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(r_max=0.5), ValueError, "r_max"),
        (dict(d_max=-1.0), ValueError, "d_max"),
        (dict(momentum=None), ValueError, "momentum"),
        (dict(backend="cuda-please"), ValueError, "backend"),
    ],
)
def test_bad_hyperparameters(backend, kwargs, error, words):
    x = torch.randn(3, 4, 5)
    rm, rv = _buffers()
    kwargs.setdefault("backend", backend)
    with pytest.raises(error, match=words):
        brn.batch_renorm(x, rm, rv, training=True, **kwargs)
    assert rm.eq(0).all() and rv.eq(1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_input(backend, dtype):
    x = torch.ones(3, 4, 5).to(dtype)
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or bfloat16"):
        _call(x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_below_two(backend):
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, \*\)"):
        _call(torch.randn(5), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, bad, error, words",
    [
        ("running_mean", torch.zeros(3), ValueError,
         r"running_mean must have shape \(C,\) = \(4,\), got \(3,\)"),
        ("running_var", torch.ones(4, 1), ValueError, r"running_var must have shape"),
        ("weight", torch.ones(5), ValueError, r"weight must have shape \(C,\) = \(4,\)"),
        ("bias", torch.zeros(2), ValueError, r"bias must have shape"),
        ("running_mean", torch.zeros(4, dtype=torch.float64), TypeError,
         "running_mean must be torch.float32"),
        ("weight", torch.ones(4, dtype=torch.float16), TypeError, "weight must be torch.float32"),
        ("running_var", torch.ones(4, device="meta"), RuntimeError, "running_var is on meta"),
        ("bias", [0.0] * 4, TypeError, "bias must be a Tensor"),
    ],
)
def test_bad_per_channel_tensors(backend, name, bad, error, words):
    x = torch.randn(3, 4, 5)
    args = dict(zip(("running_mean", "running_var"), _buffers()))
    args.update(weight=torch.ones(4), bias=torch.zeros(4))
    before = {k: v.clone() for k, v in args.items() if k.startswith("running") and k != name}
    args[name] = bad
    with pytest.raises(error, match=words):
        brn.batch_renorm(x, training=True, backend=backend, **args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was modified before the error"


def test_half_input_needs_float32_params_and_double_needs_double():
    with pytest.raises(TypeError,
                       match="running_mean must be torch.float32 for torch.float16 input"):
        _call(torch.randn(3, 4).half(), *_buffers(dtype=torch.float16))
    with pytest.raises(TypeError,
                       match="running_mean must be torch.float64 for torch.float64 input"):
        _call(torch.randn(3, 4, dtype=torch.float64))


def test_buffers_both_or_neither_and_eval_needs_them():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="running_mean and running_var must both"):
        brn.batch_renorm(x, torch.zeros(4), None, training=True)
    with pytest.raises(ValueError, match="eval .* needs running_mean and running_var"):
        brn.batch_renorm(x, None, None, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)])
def test_one_value_per_channel_when_training(backend, shape):
    x = torch.randn(shape)
    rm, rv = _buffers()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        brn.batch_renorm(x, rm, rv, training=True, backend=backend)
    assert rm.eq(0).all() and rv.eq(1).all()
    brn.batch_renorm(x, rm, rv, training=False, backend=backend)  # fine in eval


@pytest.mark.parametrize(
    "cls, bad_shape, words",
    [
        (brn.BatchRenorm1d, (2, 4, 3, 3), "expected 2D or 3D"),
        (brn.BatchRenorm2d, (2, 4, 3), r"expected 4D \(N, C, H, W\) input, got 3D input"),
        (brn.BatchRenorm3d, (2, 4, 3, 3), "expected 5D"),
        (brn.BatchRenorm2d, (2, 5, 3, 3), "input has 5 channels .* expected num_features=4"),
    ],
)
def test_module_rank_and_channels(cls, bad_shape, words):
    m = cls(4)
    with pytest.raises(ValueError, match=words):
        m(torch.randn(bad_shape))
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(r_max=0.9), "r_max"), (dict(d_max=-0.5), "d_max"), (dict(eps=-1.0), "eps"),
        (dict(momentum=2.0), "momentum"), (dict(warmup_steps=-1), "warmup_steps"),
        (dict(r_max_ramp_steps=-5), "r_max_ramp_steps"),
        (dict(d_max_ramp_steps=1.5), "d_max_ramp_steps"),
    ],
)
def test_module_constructor_rejects(kwargs, words):
    with pytest.raises(ValueError, match=words):
        brn.BatchRenorm2d(4, **kwargs)


def test_fused_backend_without_kernels_says_so():
    # No kernel is ever built for the meta device, so this runs on every machine.
    x = torch.randn(3, 4, device="meta")
    rm, rv = torch.zeros(4, device="meta"), torch.ones(4, device="meta")
    with pytest.raises(RuntimeError, match="backend='fused' but no fused kernel is built for meta"):
        brn.batch_renorm(x, rm, rv, training=True, backend="fused")
