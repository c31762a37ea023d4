"""torch.compile(fullgraph=True) over a small network with BatchRenorm layers on the fused CPU
ops: no graph breaks, and the same outputs, grads and buffers (num_batches_tracked too) as
eager, in training and eval."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import batchrenorm_cuda as brn

from conftest import requires_cpu_kernels

# The compiled backward on our fused kernel for every layer, which these tests were written
# for; test_compiled_training_matches_the_reference and test_cpu_layers_get_a_generated_backward
# cover the generated one.
pytestmark = [requires_cpu_kernels, pytest.mark.usefixtures("fused_backward")]


SCHEDULE = dict(r_max=1.5, d_max=0.5, warmup_steps=1, r_max_ramp_steps=2, d_max_ramp_steps=2)


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        brn.BatchRenorm2d(8, momentum=0.2, **SCHEDULE),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        brn.BatchRenorm2d(8, momentum=None, **SCHEDULE),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_compiled_network_matches_eager():
    torch.manual_seed(0)
    eager = _net()
    compiled_net = copy.deepcopy(eager)
    # inductor: it compiles C++ for the surrounding ops on this CPU machine in well under a
    # minute, and it is what users will run; the batchrenorm ops stay opaque custom ops in it.
    compiled = torch.compile(compiled_net, backend="inductor", fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_net.parameters(), lr=0.1)
    tol = dict(atol=1e-4, rtol=1e-4)
    for step in range(4):
        x = torch.randn(4, 3, 8, 8) * (1 + step)  # shifting statistics: r and d get clipped
        for net, model, opt in ((eager, eager, opt_e), (compiled_net, compiled, opt_c)):
            opt.zero_grad()
            model(x).square().mean().backward()
        for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled_net.named_parameters()):
            assert_close(pc.grad, pe.grad, **tol, msg=f"grad of {n} at step {step}")
        se, sc = _state(eager), _state(compiled_net)
        for k in se:
            assert_close(sc[k], se[k], **tol, msg=f"{k} at step {step}")
        opt_e.step()
        opt_c.step()
    assert int(compiled_net[1].num_batches_tracked) == 4
    assert compiled_net[1].clip_bounds() == (1.5, 0.5)

    eager.eval()
    compiled_net.eval()
    x = torch.randn(4, 3, 8, 8)
    se, sc = _state(eager), _state(compiled_net)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), **tol)
    # Eval leaves every buffer as it was.
    se_after, sc_after = _state(eager), _state(compiled_net)
    for k in se:
        assert torch.equal(se_after[k], se[k]), k
        assert torch.equal(sc_after[k], sc[k]), k


def test_compile_treats_our_modules_as_torch_nn_ones():
    """torch.compile treats our classes as it treats nn.BatchNorm2d (modules.py: no no-aliasing
    guard on every buffer of the model each step), a user's subclass as a user module, as a
    subclass of nn.BatchNorm2d is. Their attributes stay guarded: bounds changed between two
    compiled steps are the ones the next step uses, as in eager."""
    from batchrenorm_cuda.distributed import SyncBatchRenorm

    class Mine(brn.BatchRenorm2d):
        pass

    # The flag torch._dynamo.mark_static sets and Dynamo's VariableBuilder reads.
    for cls in (brn.BatchRenorm1d, brn.BatchRenorm2d, brn.BatchRenorm3d, SyncBatchRenorm):
        assert getattr(cls, "_dynamo_marked_static", False), cls
    assert not Mine._dynamo_marked_static

    torch.manual_seed(0)
    nets = {"eager": _net().train()}
    nets["compiled"] = copy.deepcopy(nets["eager"])
    steps = {"eager": nets["eager"], "compiled": torch.compile(nets["compiled"], fullgraph=True)}
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    for bounds in ((1.5, 0.5), (1.0, 0.0), (2.5, 2.0)):
        outs = {}
        for name, step in steps.items():
            for m in nets[name].modules():
                if isinstance(m, brn.BatchRenorm2d):
                    m.r_max, m.d_max = bounds
            outs[name] = step(x)
        assert_close(outs["compiled"], outs["eager"], atol=1e-5, rtol=1e-5, msg=str(bounds))


def test_compiled_functional_training_step_matches_eager():
    torch.manual_seed(0)
    C = 6

    def f(x, w, b, rm, rv):
        return brn.batch_renorm(x, rm, rv, w, b, training=True, momentum=0.1, r_max=1.2,
                                d_max=0.1) * 2

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    x = (torch.randn(5, C, 4, 4) * 3 + 1).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(C) + 0.5, torch.rand(C) - 0.5
    outs = []
    for fn in (f, compiled):
        rm, rv = torch.zeros(C), torch.ones(C) * 4
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xr, wr, br, rm, rv)
        y.sum().backward()
        outs.append((y, xr.grad, wr.grad, br.grad, rm, rv))
    for a, e in zip(*outs):
        assert_close(a, e, atol=1e-4, rtol=1e-4)
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)


def _overloads(name):
    """An op's functional overload and its out= one (what Inductor's graphs call, see
    test_compiled_backward_calls_the_out_overloads)."""
    packet = getattr(torch.ops.batchrenorm, name)
    return (packet.default, packet.out)


def _compiled_code(net, x):
    """Inductor's output code for a training step of net: (forward, backward)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(net, backend="inductor", fullgraph=True)
        _, codes = run_and_get_code(lambda: compiled(x).square().sum().backward())
    return codes


def test_compiled_training_is_fused_and_recomputed_as_batchnorm_is(monkeypatch):
    """Under torch.compile the training forward is aten ops (_compiled.py), so Inductor fuses it
    with the ReLU after it and the partitioner recomputes both in the backward graph from the
    saved convolution output, as it does for nn.BatchNorm. Here nothing after the ReLU keeps its
    output (the pool's backward needs none), so with the opaque op (the path before, checked
    below) the forward graph saves ReLU's mask, a bool tensor, which Inductor's CPU code writes
    slowly; traced, it saves none. The backward is our kernel."""
    from batchrenorm_cuda import functional

    if not functional.TRACED_FORWARD:
        pytest.skip(f"torch {torch.__version__} < 2.12: compiled training keeps the opaque op "
                    "(functional.TRACED_FORWARD says why)")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        brn.BatchRenorm2d(8, **SCHEDULE), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(4, 3, 8, 8)
    forward, backward = _compiled_code(copy.deepcopy(net), x)
    assert "batchrenorm.forward_train" not in forward
    assert "torch.bool" not in forward, "the forward graph saves a ReLU mask"
    assert "batchrenorm.backward" in backward

    monkeypatch.setattr(functional, "_is_tracing_for_inductor", lambda: False)
    opaque_forward, _ = _compiled_code(copy.deepcopy(net), x)
    assert "batchrenorm.forward_train" in opaque_forward
    assert "torch.bool" in opaque_forward


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (2, 8, 64, 80)], ids=["small", "large"])
def test_cpu_layers_get_a_generated_backward(shape, monkeypatch):
    """By default a CPU layer of any size gets its compiled backward from Inductor (no call of
    ours in the backward graph), with eager's gradients (the tests above check that the
    fused_backward fixture's setting puts our kernel back)."""
    monkeypatch.undo()  # the module's default, not the fused_backward fixture's
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        brn.BatchRenorm2d(8, **SCHEDULE), nn.ReLU())
    x = torch.randn(shape[0], 3, *shape[2:])
    _, backward = _compiled_code(copy.deepcopy(net), x)
    assert "batchrenorm.backward" not in backward
    eager = copy.deepcopy(net)
    eager(x).square().mean().backward()
    compiled = copy.deepcopy(net)
    torch.compile(compiled, backend="inductor", fullgraph=True)(x).square().mean().backward()
    for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert_close(pc.grad, pe.grad, atol=1e-4, rtol=1e-4, msg=n)


# (dtype, shape, layout, affine, running statistics, momentum): each dtype, rank and layout the
# fused path takes, affine and running statistics off once each, the cumulative average once.
TRACED_CASES = [
    (torch.float32, (16, 6), torch.contiguous_format, True, True, 0.1),
    (torch.float64, (5, 6, 7), torch.contiguous_format, True, True, 0.1),
    (torch.float16, (4, 6, 5, 5), torch.channels_last, True, True, None),
    (torch.bfloat16, (2, 6, 3, 4, 5), torch.channels_last_3d, True, True, 0.1),
    (torch.float32, (4, 6, 5, 5), torch.contiguous_format, False, True, 0.1),
    (torch.float32, (4, 6, 5, 5), torch.channels_last, True, False, 0.1),
]


@pytest.mark.parametrize("backward", ["fused", "generated"])
@pytest.mark.parametrize("dtype,shape,layout,affine,running,momentum", TRACED_CASES)
def test_compiled_training_matches_the_reference(dtype, shape, layout, affine, running,
                                                 momentum, backward, monkeypatch):
    """Outputs, the three gradients, the buffers and the counter of compiled training steps
    (the traced forward, and the fused or the generated backward) against the reference, over
    a schedule whose bounds move and clip, with a non-finite channel in the last step (NaN for
    that channel, its buffers kept)."""
    from batchrenorm_cuda import _compiled
    from batchrenorm_cuda._testing import grad_tolerance, make_params, tolerance
    from batchrenorm_cuda.functional import batch_renorm_scheduled

    if backward == "generated":
        monkeypatch.setattr(_compiled, "GENERATED_BACKWARD_ON_CPU", True)

    C = shape[1]
    weight, bias, running_mean, running_var = make_params(C, dtype)
    if not affine:
        weight = bias = None
    if not running:
        running_mean = running_var = None
    counter = torch.zeros((), dtype=torch.long)
    args = dict(momentum=momentum, eps=1e-5, r_max=1.5, d_max=0.5, warmup_steps=1,
                r_max_ramp_steps=2, d_max_ramp_steps=2)

    def step(x, w, b, rm, rv, nbt, backend):
        return batch_renorm_scheduled(x, rm, rv, w, b, True, num_batches_tracked=nbt,
                                      backend=backend, **args)

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    runs = {}
    for name, fn, backend in (("compiled", compiled, "fused"), ("reference", step, "reference")):
        state = [None if t is None else t.clone() for t in (running_mean, running_var)]
        nbt = counter.clone()
        outs = []
        for i in range(4):
            gen = torch.Generator().manual_seed(i)
            x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + i) + i)
            if i == 3:
                x[:, 1] = float("nan")
            x = x.to(dtype).contiguous(memory_format=layout).requires_grad_()
            w, b = (None if t is None else t.clone().requires_grad_() for t in (weight, bias))
            y = fn(x, w, b, *state, nbt, backend)
            grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            y.backward(grad)
            outs.append((y, x.grad, w, b, *[None if t is None else t.clone() for t in state]))
        runs[name] = (outs, int(nbt))
    (got, got_count), (want, want_count) = runs["compiled"], runs["reference"]
    assert got_count == want_count == (4 if running else 0)
    m = got[0][0].numel() // C
    for i, (g, w) in enumerate(zip(got, want)):
        assert g[0].is_contiguous(memory_format=layout), f"step {i}: output layout"
        assert_close(g[0], w[0], equal_nan=True, **tolerance(dtype), msg=f"output, step {i}")
        assert_close(g[1], w[1], equal_nan=True, **tolerance(dtype), msg=f"grad_input, step {i}")
        if affine:
            for k, label in ((2, "weight"), (3, "bias")):
                assert_close(g[k].grad, w[k].grad, equal_nan=True, **grad_tolerance(dtype, m),
                             msg=f"grad_{label}, step {i}")
        if running:
            for k, label in ((4, "running_mean"), (5, "running_var")):
                assert_close(g[k], w[k], **tolerance(dtype), msg=f"{label}, step {i}")
    assert torch.isnan(got[3][0][:, 1]).all() and not torch.isnan(got[3][0][:, 0]).any()


def test_compiled_backward_gets_grad_output_in_input_layout():
    """Past the last convolution Inductor keeps the eager (NCHW) strides, while the layer's input,
    the convolution's output, is channels_last. _inductor.py asks Inductor for grad_output in
    input's stride order, so the kernel computing it (ReLU's backward) writes it that way, and
    neither argument is copied. Without the constraint Inductor's default for custom ops (the
    eager strides) copies the convolution output to NCHW, and grad_input back."""
    from torch._inductor import config as inductor_config
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class RecordBackward(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _overloads("backward"):
                seen.append(args[:2])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        brn.BatchRenorm2d(8, **SCHEDULE), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    twin = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    # A graph from the on-disk caches, compiled by an earlier build, would skip the lowering.
    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(net, backend="inductor", fullgraph=True)
        loss = compiled(x).sum()
        with RecordBackward():
            loss.backward()
    (grad_output, input), = seen
    channels_last = torch.channels_last
    assert input.is_contiguous(memory_format=channels_last), "the convolution output was copied"
    assert grad_output.is_contiguous(memory_format=channels_last), \
        f"grad_output reached batchrenorm::backward with strides {grad_output.stride()}"
    twin(x).sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_compiled_backward_with_a_computed_input_matches_eager():
    """The layer's input computed by a fused pointwise kernel, whose layout Inductor has not
    fixed when the backward's constraint runs (_inductor.py's first branch), in 2-D and 4-D,
    with static and dynamic (symbolic strides) shapes."""
    from torch._inductor import config as inductor_config

    for shape, dynamic in (((16, 6), False), ((4, 6, 5, 5), False), ((4, 6, 5, 5), True)):
        torch.manual_seed(0)
        layer = brn.BatchRenorm2d(6, **SCHEDULE) if len(shape) == 4 else \
            brn.BatchRenorm1d(6, **SCHEDULE)
        twin = copy.deepcopy(layer)
        x = torch.randn(shape, requires_grad=True)

        def step(t):
            return layer(t.relu() * 2).square().sum()

        with inductor_config.patch(force_disable_caches=True):
            torch.compile(step, backend="inductor", fullgraph=True, dynamic=dynamic)(x).backward()
        grad = x.grad
        x.grad = None
        twin(x.relu() * 2).square().sum().backward()
        assert_close(grad, x.grad, atol=1e-4, rtol=1e-4, msg=f"{shape}, dynamic={dynamic}")
        assert_close(layer.weight.grad, twin.weight.grad, atol=1e-4, rtol=1e-4)


def test_compiled_backward_without_the_layout_constraint_still_matches(monkeypatch):
    """Inductor's IR helpers differ across torch releases: if the constraint fails, it warns
    once and leaves the layouts to Inductor; the kernel converts them, and the gradients are
    the same."""
    import warnings

    from torch._inductor import config as inductor_config

    from batchrenorm_cuda import _inductor

    def broken(*args):
        raise AttributeError("an Inductor helper that moved")

    monkeypatch.setattr(_inductor, "_constrain", broken)
    monkeypatch.setattr(_inductor, "_WARNED", set())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        brn.BatchRenorm2d(8, **SCHEDULE), nn.ReLU(), nn.Flatten())
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 6, 6)
    with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings(record=True) \
            as caught:
        warnings.simplefilter("always")
        torch.compile(net, backend="inductor", fullgraph=True)(x).square().sum().backward()
    assert any("could not apply backward's layout constraint" in str(w.message) for w in caught)
    twin(x).square().sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)


class _Residual(nn.Module):
    """relu(norm(conv(x)) + skip(x)) -> conv: the masked gradient feeds the norm's backward and,
    through the sum, `skip`'s (another norm's, or a convolution's)."""

    def __init__(self, skip_norm: bool):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 8, 3, padding=1), brn.BatchRenorm2d(8, **SCHEDULE)
        self.skip = (nn.Sequential(nn.Conv2d(4, 8, 1), brn.BatchRenorm2d(8, **SCHEDULE))
                     if skip_norm else nn.Conv2d(4, 8, 1))
        self.head = nn.Conv2d(8, 2, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x)) + self.skip(x)))


# (network, backward_relu calls, backward calls) in one compiled training step.
RELU_CASES = [
    # The ReLU's output is the next convolution's input, saved for its backward: fused.
    (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), brn.BatchRenorm2d(8, **SCHEDULE),
                           nn.ReLU(), nn.Conv2d(8, 2, 3)), 1, 0),
    # Nothing keeps the ReLU's output (the pool's backward needs none): the partitioner
    # recomputes it in the backward, and fusing would make Inductor write it: left alone.
    (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), brn.BatchRenorm2d(8, **SCHEDULE),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1)), 0, 1),
    # The masked gradient feeds two norms' backwards: both fused.
    (lambda: _Residual(skip_norm=True), 2, 0),
    # ... a norm's and a convolution's: the convolution needs it written, so neither.
    (lambda: _Residual(skip_norm=False), 0, 1),
]


@pytest.mark.parametrize("make,n_fused,n_plain", RELU_CASES)
def test_compiled_relu_backward_is_fused_where_it_saves_a_pass(make, n_fused, n_plain):
    """_inductor.py rewrites ReLU's backward feeding ours into backward_relu, where that writes
    nothing new; the gradients stay eager's, and the user's own post-grad pass slots stay free
    (one is set here, and runs)."""
    from torch._inductor import config as inductor_config
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class RecordBackwards(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _overloads("backward") + _overloads("backward_relu"):
                calls.append(func._opname)
            if func in _overloads("backward_relu"):
                grad_output, relu_output, input = args[:3]
                assert grad_output.stride() == relu_output.stride() == input.stride()
            return func(*args, **(kwargs or {}))

    user_pass_runs = []
    torch.manual_seed(0)
    net = make()
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4, 6, 6)
    with inductor_config.patch(force_disable_caches=True,
                               post_grad_custom_post_pass=lambda g: user_pass_runs.append(1)):
        loss = torch.compile(net, backend="inductor", fullgraph=True)(x).square().sum()
        with RecordBackwards():
            loss.backward()
    assert user_pass_runs, "the user's post-grad pass did not run"
    assert calls.count("backward_relu") == n_fused, calls
    assert calls.count("backward") == n_plain, calls
    twin(x).square().sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("grad_shape,fused", [((2, 3, 4, 4), True), ((2, 3, 1, 1), False)])
def test_relu_rewrite_needs_every_tensor_in_input_shape(grad_shape, fused):
    """where() broadcasts; backward_relu does not: a gradient that where() would broadcast keeps
    the unfused pair (a graph built by hand: autograd itself always gives full-size ones)."""
    from batchrenorm_cuda import _inductor

    aten, ops = torch.ops.aten, torch.ops.batchrenorm
    _inductor._FUSED_RELU[ops.backward.default] = ops.backward_relu.default
    graph = torch.fx.Graph()

    def tensor(name, shape):
        node = graph.placeholder(name)
        node.meta["val"] = torch.empty(shape)
        return node

    z, grad, x = tensor("z", (2, 3, 4, 4)), tensor("grad", grad_shape), tensor("x", (2, 3, 4, 4))
    mean, invstd = tensor("mean", (3,)), tensor("invstd", (3,))
    zero = graph.call_function(aten.full.default, ([], 0.0))
    where = graph.call_function(aten.where.self,
                                (graph.call_function(aten.le.Scalar, (z, 0)), zero, grad))
    where.meta["val"] = torch.empty(2, 3, 4, 4)
    graph.output(graph.call_function(ops.backward.default, (where, x, None, mean, invstd, None,
                                                            None, True, [True] * 3)))
    _inductor._rewrite(where, z, zero, grad)
    targets = [n.target for n in graph.nodes]
    assert (ops.backward_relu.default in targets) == fused
    assert (ops.backward.default in targets) != fused
    assert (aten.where.self in targets) != fused


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_backward_calls_the_out_overloads(dynamic):
    """Inductor calls our backwards' out= overloads with buffers it plans, where shapes are
    static; with symbolic sizes the functional ops (_inductor.py: its out= lowering fails on
    them); eager's gradients either way."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    # One backward fused with its ReLU's (the next convolution keeps the ReLU output), one
    # plain (nothing keeps the last ReLU's output).
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), brn.BatchRenorm2d(8, **SCHEDULE),
                        nn.ReLU(), nn.Conv2d(8, 8, 3), brn.BatchRenorm2d(8, **SCHEDULE),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4, 6, 6)
    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(net, backend="inductor", fullgraph=True, dynamic=dynamic)
        _, (_, backward) = run_and_get_code(lambda: compiled(x).square().sum().backward())
    for name in ("backward_relu", "backward"):
        assert (f"batchrenorm.{name}.out(" in backward) != dynamic, backward
        assert (f"batchrenorm.{name}.default(" in backward) == dynamic, backward
    twin(x).square().sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)
