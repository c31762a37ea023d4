"""The compiled gradient of a per-channel shift before a Batch Renorm layer (a Linear's bias):
_inductor.py replaces sum(grad_input) over every dim but the channels' by its exact value, 0,
with NaN where grad_input is NaN, wherever grad_input comes from our training backward. Where
the sum is over fewer dims, or the layer is in eval, the sum is not zero and stays."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda._testing import grad_tolerance

from conftest import requires_cpu_kernels

# Our fused backward for every layer: small CPU layers otherwise get Inductor's, which sums
# grad_input in its own kernel.
pytestmark = [requires_cpu_kernels, pytest.mark.usefixtures("fused_backward")]

SCHEDULE = dict(r_max=1.5, d_max=0.5, warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=2)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


class _Shifted(nn.Module):
    """x + shift, shift a parameter of the given shape, before BatchRenorm1d (N, C, L)."""

    def __init__(self, shift_shape, relu: bool):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(shift_shape))
        self.norm = brn.BatchRenorm1d(shift_shape[0], **SCHEDULE)
        self.relu = relu

    def forward(self, x):
        y = self.norm(x + self.shift)
        return torch.relu(y) * 2 if self.relu else y


def _sums_of_our_gradients(graph) -> int:
    """sum() calls in a post-grad graph whose input is one of our backwards' grad_input."""
    import operator

    ours = ("backward", "backward_relu")
    return sum(1 for n in graph.nodes
               if n.target is torch.ops.aten.sum.dim_IntList
               and n.args[0].target is operator.getitem and n.args[0].args[1] == 0
               and getattr(n.args[0].args[0].target, "_opname", None) in ours)


def _train(net, x, steps=3, train=True):
    """The compiled net's and an eager twin's gradients after `steps` steps, and the sums of
    our gradients left in the compiled backward graphs."""
    from torch._inductor import config as inductor_config

    twin = copy.deepcopy(net)
    net.train(train)
    twin.train(train)
    left = []
    with inductor_config.patch(force_disable_caches=True,
                               post_grad_custom_post_pass=lambda g: left.append(
                                   _sums_of_our_gradients(g))):
        compiled = torch.compile(net, backend="inductor", fullgraph=True)
        for _ in range(steps):
            for model in (compiled, twin):
                model.zero_grad()
                model(x).sin().sum().backward()  # not invariant to the norm's scale
    return dict(net.named_parameters()), dict(twin.named_parameters()), left


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_linear_bias_before_a_layer_gets_an_exact_zero_gradient(dtype, relu):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 16), brn.BatchRenorm1d(16, **SCHEDULE)]
    layers += [nn.ReLU(), nn.Linear(16, 16), brn.BatchRenorm1d(16, **SCHEDULE)] if relu else []
    net = nn.Sequential(*layers, nn.Linear(16, 1)).to(dtype)
    compiled, eager, left = _train(net, torch.randn(32, 5, dtype=dtype))
    assert left and not any(left), f"sums of our grad_input left in the backward: {left}"
    for name in compiled:
        assert_close(compiled[name].grad, eager[name].grad, **grad_tolerance(dtype, 32), msg=name)
    for name in ("0.bias", "3.bias") if relu else ("0.bias",):
        assert torch.equal(compiled[name].grad, torch.zeros_like(compiled[name].grad)), name
        # eager's is the kernel's rounding error (8e-4 in bfloat16): small, not what this is about
        assert eager[name].grad.abs().max() < grad_tolerance(dtype, 32)["atol"], name


def test_zero_gradient_is_nan_where_the_sum_is():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), brn.BatchRenorm1d(16, **SCHEDULE), nn.Linear(16, 1))
    x = torch.randn(32, 5)
    x[3, 2] = float("nan")  # every channel of row 3: NaN in every channel's sum
    compiled, eager, left = _train(net, x, steps=1)
    assert left and not any(left)
    for name in compiled:
        assert torch.equal(compiled[name].grad.isnan(), eager[name].grad.isnan()), name
    assert compiled["0.bias"].grad.isnan().all()


@pytest.mark.parametrize("shift_shape,input_grad,rewritten",
                         [((6, 1), True, True), ((6, 1), False, False), ((6, 7), True, False)],
                         ids=["per-channel", "per-channel-only-user", "per-position"])
def test_only_sums_over_every_dim_but_the_channels_are_rewritten(shift_shape, input_grad,
                                                                 rewritten):
    """A (C, 1) shift's gradient sums over N and L: zero, where grad_input has another user
    (the input's gradient) to keep it; without one the kernel's grad_input is what the sum reads
    (Inductor's out= lowering cannot leave an output unused). A (C, L) shift's sums over N only,
    which is not zero: the sum stays. The gradients are eager's in every case."""
    torch.manual_seed(0)
    net = _Shifted(shift_shape, relu=False)
    compiled, eager, left = _train(net, torch.randn(4, 6, 7).requires_grad_(input_grad))
    assert left and (not any(left)) == rewritten, left
    for name in compiled:
        assert_close(compiled[name].grad, eager[name].grad, **grad_tolerance(torch.float32, 32),
                     msg=name)
    assert compiled["shift"].grad.abs().max() > 1e-3 or shift_shape[1] == 1


def test_eval_keeps_the_sum():
    """In eval grad_input = weight * invstd * dy: its sum is not zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), brn.BatchRenorm1d(16, **SCHEDULE), nn.Linear(16, 1))
    compiled, eager, _ = _train(net, torch.randn(32, 5), steps=1, train=False)
    assert compiled["0.bias"].grad.abs().max() > 1e-3
    for name in compiled:
        assert_close(compiled[name].grad, eager[name].grad, **grad_tolerance(torch.float32, 32),
                     msg=name)
