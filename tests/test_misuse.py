"""Misuses that nn.BatchNorm catches (or where a silent answer would hurt us more than it hurts
BatchNorm): each gets a clear error naming the argument, or a warning naming what was reset, and
no buffer is touched first (issue 22)."""
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import batchrenorm_cuda as brn

BACKENDS = ["reference"] + (["fused"] if brn.extension_available("cpu") else [])


def _buffers(C=4):
    return torch.zeros(C), torch.ones(C)


def _untouched(rm, rv):
    return bool(rm.eq(0).all() and rv.eq(1).all())


# ---- training must be a bool -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", ["False", "True", 1, 0, None, torch.tensor(True)])
def test_training_must_be_a_bool(backend, training):
    # F.batch_norm: "argument 'training' (position 6) must be bool, not str". "False" is truthy:
    # accepted, it would train and update the buffers.
    x = torch.randn(3, 4, 5)
    rm, rv = _buffers()
    with pytest.raises(TypeError, match="batch_renorm: training must be a bool, got"):
        brn.batch_renorm(x, rm, rv, training=training, backend=backend)
    assert _untouched(rm, rv)


# ---- running statistics that require grad ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_requiring_grad_raise(backend, training, which):
    # nn.BatchNorm: "native_batch_norm is not differentiable with respect to argument
    # 'running_mean'", in training and in eval.
    x = torch.randn(3, 4, 5)
    args = dict(zip(("running_mean", "running_var"), _buffers()))
    args[which].requires_grad_()
    with pytest.raises(RuntimeError, match=f"batch_renorm: {which} requires grad"):
        brn.batch_renorm(x, training=training, backend=backend, **args)
    assert _untouched(args["running_mean"].detach(), args["running_var"].detach())


@pytest.mark.parametrize("layer_type", [brn.BatchRenorm1d, brn.SyncBatchRenorm])
def test_module_with_a_buffer_requiring_grad_raises(layer_type):
    layer = layer_type(4)
    layer.running_mean.requires_grad_()
    with pytest.raises(RuntimeError, match=f"{layer_type.__name__}: running_mean requires grad"):
        layer(torch.randn(3, 4))
    assert int(layer.num_batches_tracked) == 0


# ---- hyperparameters of the wrong type ---------------------------------------------------------

@pytest.mark.parametrize("name, value", [("r_max", "3"), ("d_max", "5"), ("eps", "1e-5"),
                                         ("momentum", "0.1"), ("r_max", True),
                                         ("eps", None), ("d_max", [5.0])])
def test_module_hyperparameter_types(name, value):
    with pytest.raises(TypeError, match=f"BatchRenorm2d: {name} must be a float, got"):
        brn.BatchRenorm2d(4, **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["r_max", "d_max", "eps", "momentum"])
def test_functional_hyperparameter_types(backend, training, name):
    # The same TypeError on every backend (the dispatcher alone would say RuntimeError).
    x = torch.randn(3, 4, 5)
    rm, rv = _buffers()
    with pytest.raises(TypeError, match=f"batch_renorm: {name} must be a float, got str '3'"):
        brn.batch_renorm(x, rm, rv, training=training, backend=backend, **{name: "3"})
    assert _untouched(rm, rv)


@pytest.mark.parametrize("name", ["warmup_steps", "r_max_ramp_steps", "d_max_ramp_steps"])
@pytest.mark.parametrize("value, error", [("5", TypeError), (None, TypeError),
                                          (False, TypeError), (-1, ValueError),
                                          (2.5, ValueError), (float("inf"), ValueError),
                                          (float("nan"), ValueError)])
def test_schedule_step_counts(name, value, error):
    with pytest.raises(error, match=f"BatchRenorm1d: {name} must be a non-negative integer, "
                                    f"got"):
        brn.BatchRenorm1d(4, **{name: value})
    assert brn.BatchRenorm1d(4, **{name: 7.0}).__getattribute__(name) == 7  # as before


# ---- momentum=None and the fixed bounds of the functional form ---------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_momentum_none_names_what_it_needs(backend):
    x = torch.randn(3, 4, 5)
    rm, rv = _buffers()
    with pytest.raises(ValueError, match=r"momentum=None \(a cumulative average\) needs the step "
                                         r"counter num_batches_tracked, which batch_renorm\(\) "
                                         r"does not take \(the modules BatchRenorm1d/2d/3d keep "
                                         r"one\); pass a float momentum"):
        brn.batch_renorm(x, rm, rv, training=True, momentum=None, backend=backend)
    assert _untouched(rm, rv)


def test_help_says_the_functional_form_has_fixed_bounds():
    doc = " ".join(brn.batch_renorm.__doc__.split())
    assert "The functional form has fixed bounds" in doc
    assert "no warm-up or ramp schedule" in doc and "num_batches_tracked" in doc


# ---- a checkpoint without the step counter ------------------------------------------------------

def _state_without_counter(layer):
    state = layer.state_dict()
    del state["num_batches_tracked"]
    return state


@pytest.mark.parametrize("copy", [dict, pickle.loads])
def test_checkpoint_without_counter_warns_that_the_schedule_restarts(copy):
    # nn.BatchNorm fills a missing counter in silently (a state_dict without a version, as a
    # plain dict copy or one from before torch had the counter); for us it is the schedule.
    trained = brn.BatchRenorm2d(4, warmup_steps=10, r_max_ramp_steps=0, d_max_ramp_steps=0)
    trained.num_batches_tracked.fill_(50)
    state = _state_without_counter(trained)
    state = dict(state) if copy is dict else copy(pickle.dumps(dict(state)))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), brn.BatchRenorm2d(4, warmup_steps=10))
    with pytest.warns(UserWarning) as caught:
        model.load_state_dict({f"1.{k}": v for k, v in state.items()} | {
            f"0.{k}": v for k, v in model[0].state_dict().items()})
    message = " ".join(str(w.message) for w in caught)
    assert "BatchRenorm2d '1': the state_dict has no num_batches_tracked" in message, message
    assert "stays at 0" in message and "restarts the schedule: 10 warm-up steps" in message
    assert model[1].clip_bounds() == (1.0, 0.0)


def test_checkpoint_with_counter_and_strict_missing_key_do_not_warn():
    layer = brn.BatchRenorm2d(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(brn.BatchRenorm2d(4).state_dict())
        layer.load_state_dict(nn.BatchNorm2d(4).state_dict())
        # With the version in the metadata, strict loading already reports the missing key.
        with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
            layer.load_state_dict(_state_without_counter(brn.BatchRenorm2d(4)))
    no_tracking = brn.BatchRenorm2d(4, track_running_stats=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        no_tracking.load_state_dict(dict(brn.BatchRenorm2d(4, track_running_stats=False)
                                         .state_dict()))


# ---- extension_available ---------------------------------------------------------------------

def test_extension_available_takes_devices_and_rejects_unknown_names():
    cpu = brn.extension_available("cpu")
    assert brn.extension_available(torch.device("cpu")) == cpu
    assert brn.extension_available("cuda:0") == brn.extension_available("cuda")
    assert brn.extension_available(torch.device("meta")) is False
    for bad in ("CPU", "gpu", ""):
        with pytest.raises(ValueError, match=f"extension_available: device must be a device "
                                             f"type such as 'cpu' or 'cuda'.*got {bad!r}"):
            brn.extension_available(bad)
    with pytest.raises(TypeError, match="extension_available: device must be a str or a "
                                        "torch.device, got int"):
        brn.extension_available(0)


# ---- ONNX through the TorchScript exporter -----------------------------------------------------

def test_jit_trace_of_eval_records_aten_batch_norm():
    model = nn.Sequential(brn.BatchRenorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the shape checks
        traced = torch.jit.trace(model, x)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert "aten::batch_norm" in kinds and not [k for k in kinds if "batchrenorm" in k], kinds
    torch.testing.assert_close(traced(x), model(x))


def test_onnx_export_without_dynamo():
    onnx = pytest.importorskip("onnx")
    model = brn.BatchRenorm2d(4).eval()
    model.running_mean.fill_(0.5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning
        torch.onnx.export(model, (torch.randn(2, 4, 3, 3),), buffer, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert "BatchNormalization" in [n.op_type for n in graph.node]
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), graph.node  # no custom op
