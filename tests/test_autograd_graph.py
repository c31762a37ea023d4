"""The autograd graph a Batch Renorm call records, against nn.BatchNorm's, on every backend
(reference, fused CPU kernels, CUDA kernels under the emulator): the fused ops' backward nodes
(csrc/batchrenorm_autograd.h) must behave as PyTorch's generated ones do.

- no graph when nothing needs one (no_grad, inputs not requiring grad), one node when it does;
- a second backward through a freed graph is an error; the step counter's version advances as
  nn.BatchNorm's add_(1) makes it;
- an eval backward after a training step changed the buffers is that of its forward;
- saved-tensor hooks see the saved tensors;
- forward-mode AD gives the reference's tangent.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.testing import assert_close

import batchrenorm_cuda as brn

NO_SCHEDULE = dict(warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
BOUNDS = dict(r_max=1.5, d_max=0.5)  # clipped for inputs of std ~3, mean ~1


def _layer(backend, C=4):
    m = brn.BatchRenorm2d(C, momentum=0.1, backend=backend, **NO_SCHEDULE, **BOUNDS).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def _x(requires_grad=True):
    return (torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_(requires_grad)


@pytest.mark.parametrize("training", [True, False])
def test_no_graph_unless_something_needs_a_gradient(backend, training):
    m = _layer(backend).train(training)
    with torch.no_grad():
        assert m(_x()).grad_fn is None
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    assert m(_x(requires_grad=False)).grad_fn is None
    y = m(_x())
    assert y.grad_fn is not None and y.requires_grad
    y.sum().backward()


@pytest.mark.parametrize("training", [True, False])
def test_second_backward_through_a_freed_graph_is_an_error(backend, training):
    m = _layer(backend).train(training)
    y = m(_x())
    y.square().sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.square().sum().backward()


def test_eval_backward_after_a_training_step_is_that_of_its_forward(backend):
    """A training step may update the buffers in place between an eval forward and its backward
    (an RL actor loss taken through its critic in eval mode, then a critic step): the gradient
    is still that of the function the eval forward computed, as the reference's is.
    (nn.BatchNorm's eval backward reads the updated buffers instead.)"""
    layers = [_layer(backend), _layer("reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    x0, x_step = _x(requires_grad=False), _x(requires_grad=False) * 2
    results = []
    for m in layers:
        x = x0.clone().requires_grad_()
        y = m.eval()(x)
        before = m.running_var.clone()
        m.train()(x_step)
        assert not torch.allclose(m.running_var, before), "the step must move the buffers"
        (y.square() * torch.arange(4.0, dtype=y.dtype).view(1, 4, 1, 1)).sum().backward()
        results.append((x.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-9, rtol=1e-8)


def test_training_step_bumps_the_counter_version(backend):
    m = _layer(backend)
    before = m.num_batches_tracked._version
    m(_x())
    assert m.num_batches_tracked._version > before
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("training", [True, False])
def test_saved_tensor_hooks_see_the_saved_tensors(backend, training):
    """torch.autograd.graph.saved_tensors_hooks (CPU offload, activation compression) applies to
    what the layer saves: hooks that store copies give the same gradients as no hooks. (The
    fused layer is the graph's only saver here: without the hooks applied, nothing is packed.)"""
    x0 = _x(requires_grad=False)
    grads = []
    for hooked in (False, True):
        torch.manual_seed(1)
        m = _layer(backend).train(training)
        x = x0.clone().requires_grad_()
        packed = []

        def pack(t):
            packed.append(t.shape)
            return t.clone()

        if hooked:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = m(x)
            assert x.shape in packed, "the input was saved without the hooks"
        else:
            y = m(x)
        y.square().sum().backward()
        grads.append((x.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_matches_reference(backend, training):
    x = _x(requires_grad=False)
    tangent = torch.randn_like(x)
    layers = [_layer(backend), _layer("reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    results = []
    for m in layers:
        m.train(training)
        with fwAD.dual_level():
            y = m(fwAD.make_dual(x, tangent))
            primal, jvp = fwAD.unpack_dual(y)
            results.append((primal, jvp, m.running_mean.clone(), m.running_var.clone()))
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-9, rtol=1e-8)
