"""convert_batchnorm / revert_batchnorm with sync=True, and state_dicts between SyncBatchRenorm
and the single-process layers (no process group needed)."""
import inspect

import pytest
import torch
from torch import nn

import batchrenorm_cuda as brn

C = 3
SCHEDULE = dict(r_max=1.25, d_max=0.25, warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=2)

def _bn_model():
    return nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.Sequential(nn.BatchNorm1d(4), nn.SyncBatchNorm(4, eps=1e-3)),
                         nn.BatchNorm3d(4))


def _norms(model):
    return [model[1], model[3][0], model[3][1], model[4]]


def test_convert_sync_and_revert():
    group = object()
    model = _bn_model()
    model[1].running_mean.fill_(0.5)
    converted = brn.convert_batchnorm(model, sync=True, process_group=group, r_max=2.0)
    for layer in _norms(converted):
        assert type(layer) is brn.SyncBatchRenorm
        assert layer.process_group is group and layer.r_max == 2.0
    assert converted[1].momentum == 0.3 and converted[3][1].eps == 1e-3
    assert converted[1].running_mean is model[1].running_mean
    assert torch.all(converted[1].running_mean == 0.5)

    reverted = brn.revert_batchnorm(converted)
    for layer in _norms(reverted):
        assert type(layer) is nn.SyncBatchNorm and layer.process_group is group
    assert reverted[1].weight is model[1].weight


def test_convert_without_sync_keeps_plain_layers_plain():
    own_group = object()
    model = _bn_model()
    model[3][1].process_group = own_group
    converted = brn.convert_batchnorm(model)
    assert [type(m) for m in _norms(converted)] == \
        [brn.BatchRenorm2d, brn.BatchRenorm1d, brn.SyncBatchRenorm, brn.BatchRenorm3d]
    # nn.SyncBatchNorm was already synchronised: it stays so, with its own group.
    assert converted[3][1].process_group is own_group

    reverted = brn.revert_batchnorm(converted)
    assert [type(m) for m in _norms(reverted)] == \
        [nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm, nn.BatchNorm3d]
    assert reverted[3][1].process_group is own_group
    synced = brn.revert_batchnorm(brn.convert_batchnorm(_bn_model()), sync=True)
    assert all(type(m) is nn.SyncBatchNorm for m in _norms(synced))


def test_state_dict_moves_between_sync_and_plain():
    sync = brn.SyncBatchRenorm(C, momentum=0.1, **SCHEDULE)
    sync.running_mean.fill_(0.25)
    sync.num_batches_tracked.fill_(7)
    plain = brn.BatchRenorm2d(C, **SCHEDULE)
    plain.load_state_dict(sync.state_dict())
    assert torch.equal(plain.running_mean, sync.running_mean)
    assert sync.clip_bounds() == plain.clip_bounds() == (SCHEDULE["r_max"], SCHEDULE["d_max"])


def test_convert_sync_carries_every_batchrenorm_argument():
    # BatchRenorm's whole signature reaches SyncBatchRenorm: backend= and bias= too.
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4))
    converted = brn.convert_batchnorm(model, sync=True, backend="reference", r_max=2.0,
                                      warmup_steps=0)
    for layer in (converted[1], converted[2]):
        assert type(layer) is brn.SyncBatchRenorm
        assert layer.backend == "reference" and layer.r_max == 2.0 and layer.warmup_steps == 0
    assert "backend='reference'" in repr(converted[1])


def test_sync_batchrenorm_takes_every_batchrenorm_argument():
    layer = brn.SyncBatchRenorm(64, bias=False, backend="fused")
    assert layer.bias is None and layer.weight is not None and layer.backend == "fused"
    assert not hasattr(layer, "_backend")
    with pytest.raises(ValueError, match="SyncBatchRenorm: backend must be one of"):
        brn.SyncBatchRenorm(4, backend="gpu")
    with pytest.raises(TypeError, match="SyncBatchRenorm: r_max must be a float"):
        brn.SyncBatchRenorm(4, r_max="3")
    params = inspect.signature(brn.SyncBatchRenorm).parameters
    renorm = inspect.signature(brn.BatchRenorm2d).parameters
    assert list(params) == list(renorm) + ["process_group"]
    assert params["process_group"].kind is inspect.Parameter.KEYWORD_ONLY
