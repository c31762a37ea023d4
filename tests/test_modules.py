"""BatchRenorm1d/2d/3d as drop-ins for nn.BatchNorm: buffers, schedule, state_dicts, conversion,
and the behaviours nn.BatchNorm has (momentum=None, no running stats, no affine, empty batch)."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference

NO_SCHEDULE = dict(warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
SHAPES = {brn.BatchRenorm1d: [(6, 4), (3, 4, 5)], brn.BatchRenorm2d: [(3, 4, 5, 5)],
          brn.BatchRenorm3d: [(2, 4, 3, 4, 5)]}
BN_OF = {brn.BatchRenorm1d: nn.BatchNorm1d, brn.BatchRenorm2d: nn.BatchNorm2d,
         brn.BatchRenorm3d: nn.BatchNorm3d}


def _module_step(module, x):
    """Forward, then the textbook reference step on copies of the buffers before it."""
    rm, rv = module.running_mean.clone(), module.running_var.clone()
    nbt = module.num_batches_tracked.clone()
    y = module(x)
    expected = reference.batch_renorm(
        x, rm, rv, module.weight, module.bias, True, module.momentum, module.eps, module.r_max,
        module.d_max, nbt, module.warmup_steps, module.r_max_ramp_steps, module.d_max_ramp_steps)
    return y, expected, (rm, rv, nbt)


@pytest.mark.parametrize("cls", list(SHAPES))
def test_each_rank_trains_and_matches_reference(cls):
    for shape in SHAPES[cls]:
        module = cls(4, momentum=0.1, warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=3)
        for step in range(5):
            x = torch.randn(shape) * 2 + 0.5
            y, expected, (rm, rv, nbt) = _module_step(module, x)
            assert_close(y, expected)
            assert_close(module.running_mean, rm)
            assert_close(module.running_var, rv)
            assert module.num_batches_tracked.item() == nbt.item() == step + 1


def test_schedule_follows_num_batches_tracked_and_checkpoints_restore_it():
    m = brn.BatchRenorm2d(3, warmup_steps=2, r_max_ramp_steps=4, d_max_ramp_steps=2)
    bounds = []
    for _ in range(7):
        bounds.append(m.clip_bounds())
        m(torch.randn(2, 3, 4, 4))
    assert bounds == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (1.5, 2.5), (2.0, 5.0), (2.5, 5.0),
                      (3.0, 5.0)]
    restored = brn.BatchRenorm2d(3, warmup_steps=2, r_max_ramp_steps=4, d_max_ramp_steps=2)
    restored.load_state_dict(m.state_dict())
    assert restored.clip_bounds() == m.clip_bounds() == (3.0, 5.0)
    assert brn.BatchRenorm2d(3, track_running_stats=False).clip_bounds() == (1.0, 0.0)


def test_warmup_is_exactly_batchnorm():
    torch.manual_seed(1)
    m = brn.BatchRenorm2d(3, momentum=0.1, warmup_steps=3)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 3 + 1
        assert_close(m(x), bn(x))
    assert_close(m.running_var, bn.running_var)
    # After warm-up with bounds from step one, the two differ.
    m2 = brn.BatchRenorm2d(3, momentum=0.1, **NO_SCHEDULE)
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    assert not torch.allclose(m2(x), nn.BatchNorm2d(3, momentum=0.1)(x))


def test_training_step_does_not_read_values_on_the_host(monkeypatch):
    """No .item(), float(), bool() or tolist() on any tensor during a training step: those are
    device-to-host synchronisations on CUDA and would break CUDA-graph capture."""
    m = brn.BatchRenorm2d(3, warmup_steps=2, momentum=None)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)

    def forbid(*args, **kwargs):
        raise AssertionError("a training step read a tensor value on the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    for _ in range(3):
        m(x).sum().backward()
    monkeypatch.undo()
    assert m.num_batches_tracked.item() == 3


def test_momentum_none_is_cumulative_average():
    m = brn.BatchRenorm1d(3, momentum=None, r_max=1.0, d_max=0.0)
    bn = nn.BatchNorm1d(3, momentum=None)
    for _ in range(4):
        x = torch.randn(5, 3) * 2 + 1
        assert_close(m(x), bn(x))
    assert_close(m.running_mean, bn.running_mean)
    assert_close(m.running_var, bn.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_no_running_stats_normalises_with_batch_stats(training):
    m = brn.BatchRenorm2d(3, track_running_stats=False).train(training)
    bn = nn.BatchNorm2d(3, track_running_stats=False).train(training)
    assert m.running_mean is None and m.num_batches_tracked is None
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    assert_close(m(x), bn(x))


def test_affine_false():
    m = brn.BatchRenorm2d(3, affine=False, **NO_SCHEDULE)
    assert m.weight is None and m.bias is None
    x = torch.randn(4, 3, 5, 5)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    expected = reference.batch_renorm(x, rm, rv, None, None, True, 0.01, 1e-5, 3.0, 5.0)
    assert_close(m(x), expected)


def test_empty_batch_behaves_like_batchnorm():
    m = brn.BatchRenorm2d(3)
    bn = nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert m.weight.grad is not None and x.grad.shape == x.shape
    assert_close(m.running_mean, bn.running_mean)
    assert_close(m.running_var, bn.running_var)
    bn(x)
    assert m.num_batches_tracked.item() == bn.num_batches_tracked.item() == 1
    assert m.eval()(x).shape == x.shape


def test_nonfinite_batch_keeps_running_stats_of_that_channel():
    m = brn.BatchRenorm2d(3, momentum=0.5, **NO_SCHEDULE)
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    y = m(x)
    assert torch.isnan(y[:, 0]).all() and not torch.isfinite(y[:, 2]).all()
    assert torch.isfinite(y[:, 1]).all()
    assert m.running_mean[0] == 0 and m.running_var[0] == 1
    assert m.running_mean[2] == 0 and m.running_var[2] == 1
    assert m.running_mean[1] != 0 and m.running_var[1] != 1
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("cls", list(SHAPES))
def test_state_dict_round_trip_with_batchnorm(cls):
    bn = BN_OF[cls](4)
    bn.train()(torch.randn(SHAPES[cls][0]) * 3)
    m = cls(4)
    m.load_state_dict(bn.state_dict())
    assert m.state_dict().keys() == bn.state_dict().keys()
    for key, value in bn.state_dict().items():
        assert torch.equal(m.state_dict()[key], value), key
    m.train()(torch.randn(SHAPES[cls][0]))
    back = BN_OF[cls](4)
    back.load_state_dict(m.state_dict())
    assert back.num_batches_tracked.item() == 2


def _small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=0.3, eps=1e-3)),
        nn.Flatten(2), nn.BatchNorm1d(8), nn.Flatten(), nn.Linear(8 * 36, 4),
    )


def test_convert_and_revert_small_cnn():
    model = _small_cnn()
    model(torch.randn(4, 3, 8, 8))  # move the BatchNorm buffers away from their init
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    params = list(model.parameters())
    converted = brn.convert_batchnorm(model, r_max=2.0, warmup_steps=0)
    kinds = [type(m) for m in converted.modules()]
    assert nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    assert kinds.count(brn.BatchRenorm2d) == 2 and kinds.count(brn.BatchRenorm1d) == 1
    inner = converted[3][1]
    assert (inner.eps, inner.momentum, inner.r_max, inner.warmup_steps) == (1e-3, 0.3, 2.0, 0)
    assert not converted.training and not inner.training
    # Parameters are shared, so an optimizer built before the conversion still works.
    assert [id(p) for p in converted.parameters()] == [id(p) for p in params]
    assert_close(converted(x), expected)
    reverted = brn.revert_batchnorm(converted)
    kinds = [type(m) for m in reverted.modules()]
    assert brn.BatchRenorm2d not in kinds and kinds.count(nn.BatchNorm2d) == 2
    assert_close(reverted(x), expected)


def test_convert_keeps_dtype_and_device():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double()
    converted = brn.convert_batchnorm(model)
    assert converted[1].running_mean.dtype == torch.float64
    assert converted[1].weight.dtype == torch.float64
    assert converted(torch.randn(2, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_fuse_conv_bn_eval():
    conv = nn.Conv2d(3, 4, 3).eval()
    layer = brn.BatchRenorm2d(4)
    layer(torch.randn(8, 4, 6, 6) * 2 + 1)
    layer.eval()
    fused = torch.nn.utils.fuse_conv_bn_eval(conv, layer)
    x = torch.randn(2, 3, 8, 8)
    assert_close(fused(x), layer(conv(x)))


def test_repr_names_renorm_arguments():
    text = repr(brn.BatchRenorm2d(8, r_max=2.5))
    assert "r_max=2.5" in text and "warmup_steps=5000" in text
    assert text.startswith("BatchRenorm2d(8")


def test_deepcopy_and_half_input_with_float_params():
    m = brn.BatchRenorm2d(3, **NO_SCHEDULE)
    m2 = copy.deepcopy(m)
    x = torch.randn(4, 3, 5, 5)
    for dtype in (torch.float16, torch.bfloat16):
        y = m(x.to(dtype))
        assert y.dtype == dtype
        expected = m2(x)
        assert_close(y.float(), expected, atol=3e-2, rtol=3e-2)
    assert m.running_mean.dtype == torch.float32
