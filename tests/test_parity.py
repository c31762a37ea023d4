"""Drop-in parity with nn.BatchNorm, tried as a new user would, on every backend: double
backward, torch.func (vmap, grad, jacrev), bias=, low-precision parameters and buffers, FX
tracing, TorchScript's error, torch.export, the module's backend=, and the documentation.

Backends: reference, fused (the CPU kernels), cuda_emulated (the CUDA kernels under the emulator,
through the same autograd Functions)."""
import inspect
import os

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference

NO_SCHEDULE = dict(warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
# Bounds tight enough that r and d are clipped for the inputs below (std ~3, mean ~1 against
# running statistics 0 and 1).
BOUNDS = dict(r_max=1.5, d_max=0.5)
F64 = dict(atol=1e-9, rtol=1e-8)


def _x(*shape, dtype=torch.float64):
    return (torch.randn(*shape, dtype=dtype) * 3 + 1).requires_grad_()


def _module(cls=brn.BatchRenorm2d, C=4, backend="auto", **kwargs):
    kwargs = {**NO_SCHEDULE, **BOUNDS, "momentum": 0.1, **kwargs}
    m = cls(C, backend=backend, **kwargs).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def _pair(backend, **kwargs):
    """The same module on `backend` and on the reference."""
    a = _module(backend=backend, **kwargs)
    b = _module(backend="reference", **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


# ---------------------------------------------------------------------------------------------
# Double backward.

@pytest.mark.parametrize("training", [True, False])
def test_double_backward_matches_reference(backend, training):
    results = []
    x0 = _x(3, 4, 5, 5)
    for m in _pair(backend):
        m.train(training)
        x = x0.detach().clone().requires_grad_()
        y = m(x)
        (g,) = torch.autograd.grad(y.pow(2).sum() + y.sin().sum(), x, create_graph=True)
        g.pow(2).sum().backward()  # a gradient penalty
        results.append((g, x.grad, m.weight.grad, m.bias.grad, m.running_mean.clone()))
    for a, b in zip(*results):
        assert_close(a, b, **F64)


def test_gradgradcheck_fused_training_and_eval(backend):
    # momentum 0: the buffers stay fixed across gradcheck's many calls. Running statistics far
    # from the batch's clip r and d in every channel, so that they are locally constant (as
    # autograd treats them) and finite differences agree.
    C = 3
    rm = torch.randn(C, dtype=torch.float64) * 0.1 - 3
    rv = torch.rand(C, dtype=torch.float64) + 0.5
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    b = torch.rand(C, dtype=torch.float64, requires_grad=True)
    x = _x(4, C, 3)
    for training in (True, False):
        def f(x, w, b):
            return brn.batch_renorm(x, rm, rv, w, b, training=training, momentum=0.0,
                                    backend=backend, **BOUNDS)
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


# ---------------------------------------------------------------------------------------------
# torch.func.

def _reference_member(x, w, b, rm, rv, nbt, **kwargs):
    return reference.batch_renorm(x, rm, rv, w, b, True, 0.1, 1e-5, num_batches_tracked=nbt,
                                  **BOUNDS, **kwargs)


@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("counter", ["shared", "per_member", None])
@pytest.mark.parametrize("buffer_dim", [0, 1])
def test_vmap_over_an_ensemble_matches_each_member(backend, shared_input, counter, buffer_dim):
    B, N, C = 3, 8, 4
    x = torch.randn(N, C, dtype=torch.float64) * 3 if shared_input else \
        torch.randn(B, N, C, dtype=torch.float64) * 3 + torch.arange(B).view(B, 1, 1)
    w, b = torch.rand(B, C, dtype=torch.float64) + 0.5, torch.rand(B, C, dtype=torch.float64)
    rm = torch.randn(B, C, dtype=torch.float64)
    rv = torch.rand(B, C, dtype=torch.float64) + 0.5
    nbt = {"shared": torch.tensor(3), "per_member": torch.tensor([0, 1, 5]), None: None}[counter]
    schedule = dict(warmup_steps=1, r_max_ramp_steps=4, d_max_ramp_steps=2)
    expected_rm, expected_rv = rm.clone(), rv.clone()
    expected = []
    for i in range(B):
        step = None if nbt is None else nbt.clone() if counter == "shared" else nbt[i].clone()
        expected.append(_reference_member(x if shared_input else x[i], w[i], b[i],
                                          expected_rm[i], expected_rv[i], step, **schedule))
    if buffer_dim == 1:  # (C, B) buffers: the member dim is not outermost
        rm, rv = rm.t().contiguous().t(), rv.t().contiguous().t()

    def member(x, w, b, rm, rv, nbt):
        return brn.batch_renorm(x, rm, rv, w, b, training=True, momentum=0.1, backend=backend,
                                **BOUNDS) if nbt is None else \
            brn.functional.batch_renorm_scheduled(x, rm, rv, w, b, True, 0.1, 1e-5, BOUNDS["r_max"],
                                         BOUNDS["d_max"], num_batches_tracked=nbt,
                                         backend=backend, **schedule)

    in_dims = (None if shared_input else 0, 0, 0, 0, 0,
               0 if counter == "per_member" else None)
    y = torch.func.vmap(member, in_dims=in_dims)(x, w, b, rm, rv, nbt)
    assert_close(y, torch.stack(expected), **F64)
    assert_close(rm, expected_rm, **F64)
    assert_close(rv, expected_rv, **F64)
    if counter == "shared":
        assert nbt.item() == 4
    elif counter == "per_member":
        assert nbt.tolist() == [1, 2, 6]


def test_vmap_rejects_unbatched_buffers_in_training(backend):
    x = torch.randn(2, 8, 4, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    f = torch.func.vmap(lambda x: brn.batch_renorm(x, rm, rv, training=True, backend=backend))
    # The reference meets torch's own error for the in-place update (as F.batch_norm does).
    words = "inplace" if backend == "reference" else "running_mean.*stack_module_state"
    with pytest.raises((ValueError, RuntimeError), match=words):
        f(x)


def test_vmap_eval_shares_unbatched_buffers(backend):
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w = torch.rand(2, 4, dtype=torch.float64)
    y = torch.func.vmap(lambda x, w: brn.batch_renorm(x, rm, rv, w, None, backend=backend))(x, w)
    expected = torch.stack([reference.batch_renorm(x[i], rm, rv, w[i]) for i in range(2)])
    assert_close(y, expected, **F64)


@pytest.mark.parametrize("training", [True, False])
def test_func_grad_and_jacrev_match_reference(backend, training):
    C = 3
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    w = torch.rand(C, dtype=torch.float64) + 0.5
    x = torch.randn(5, C, dtype=torch.float64) * 3

    # The buffers are arguments: a transformed function may not mutate captured tensors (nor
    # may F.batch_norm's). momentum 0: every call sees the same buffers.
    def f(x, w, rm, rv, backend):
        return brn.batch_renorm(x, rm, rv, w, None, training=training, momentum=0.0,
                                backend=backend, **BOUNDS)

    def loss(x, w, rm, rv, backend):
        return f(x, w, rm, rv, backend).sin().sum()

    for transform in (torch.func.grad, torch.func.jacrev):
        fn = loss if transform is torch.func.grad else f
        got = transform(fn, argnums=(0, 1))(x, w, rm, rv, backend)
        expected = transform(fn, argnums=(0, 1))(x, w, rm, rv, "reference")
        for a, e in zip(got, expected):
            assert_close(a, e, **F64)


def test_vmap_of_grad_trains_an_ensemble(backend):
    """The RL ensemble pattern: stacked critics, one vmapped grad for all their parameters."""
    B = 3
    members = [nn.Sequential(nn.Linear(5, 6), brn.BatchRenorm1d(6, backend=backend, **BOUNDS,
                                                                **NO_SCHEDULE),
                             nn.ReLU(), nn.Linear(6, 1)).double() for _ in range(B)]
    copies = [_copy_to_reference(m) for m in members]
    params, buffers = torch.func.stack_module_state(members)
    x = torch.randn(16, 5, dtype=torch.float64)

    def loss(params, buffers, x):
        return torch.func.functional_call(members[0], (params, buffers), (x,)).pow(2).mean()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, ref in enumerate(copies):
        ref(x).pow(2).mean().backward()
        for name, p in ref.named_parameters():
            assert_close(grads[name][i], p.grad, **F64, msg=name)
        for name, buf in ref.named_buffers():
            assert_close(buffers[name][i], buf, **F64, msg=name)


def _copy_to_reference(model):
    import copy
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, brn.BatchRenorm1d):
            m.backend = "reference"
    return ref


# ---------------------------------------------------------------------------------------------
# The modules as nn.BatchNorm users call them.

@pytest.mark.parametrize("cls,bn,shape", [(brn.BatchRenorm1d, nn.BatchNorm1d, (6, 4)),
                                          (brn.BatchRenorm2d, nn.BatchNorm2d, (3, 4, 5, 5)),
                                          (brn.BatchRenorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 2))])
def test_bias_false_like_batchnorm(backend, cls, bn, shape):
    if "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        pytest.skip(f"nn.BatchNorm has no bias= in torch {torch.__version__}: nothing to match")
    m = cls(4, bias=False, backend=backend, r_max=1.0, d_max=0.0)
    ref = bn(4, bias=False)
    assert m.bias is None and m.weight is not None and "bias=False" in repr(m)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(shape) * 2 + 1
    assert_close(m(x), ref(x))  # r_max = 1, d_max = 0: BatchNorm training
    m.load_state_dict(ref.state_dict())
    back = brn.revert_batchnorm(brn.convert_batchnorm(ref))
    assert back.bias is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_parameters_and_buffers(backend, dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), brn.BatchRenorm2d(4, backend=backend, momentum=0.1,
                                                              **BOUNDS, **NO_SCHEDULE))
    low = _copy(net).to(dtype)
    assert low[1].running_mean.dtype == dtype
    tol = dict(atol=5e-2, rtol=5e-2)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + step
        y = net(x)
        y_low = low(x.to(dtype))
        assert y_low.dtype == dtype
        assert_close(y_low.float(), y, **tol)
        y_low.float().sum().backward()
        assert low[1].weight.grad.dtype == dtype and low[0].weight.grad is not None
    assert low[1].running_mean.dtype == dtype and low[1].num_batches_tracked.item() == 3
    assert_close(low[1].running_mean.float(), net[1].running_mean, **tol)
    assert_close(low[1].running_var.float(), net[1].running_var, **tol)
    low.eval()
    x = torch.randn(2, 3, 5, 5)
    assert_close(low(x.to(dtype)).float(), net.eval()(x), **tol)


def _copy(module):
    import copy
    return copy.deepcopy(module)


def test_fx_symbolic_trace(backend):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), _module(C=4, backend=backend).float(), nn.ReLU())
    traced = torch.fx.symbolic_trace(net)
    twin = _copy(net)
    x = torch.randn(2, 3, 5, 5)
    assert_close(traced(x), twin(x))
    assert_close(traced.get_submodule("1").running_mean, twin[1].running_mean)
    traced.eval()
    twin.eval()
    assert_close(traced(x), twin(x))


def test_jit_script_says_what_to_use_instead():
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.compile.*revert_batchnorm"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 1), brn.BatchRenorm2d(8)))
    scripted = torch.jit.script(brn.revert_batchnorm(nn.Sequential(brn.BatchRenorm2d(8))))
    assert isinstance(scripted, torch.jit.ScriptModule)


@pytest.mark.parametrize("strict", [False, True])
def test_export_of_eval_decomposes_to_aten_batch_norm(backend, strict):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), _module(C=4, backend=backend).float()).eval()
    net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(net, (x,), strict=strict).run_decompositions()
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batchrenorm" in t for t in targets), targets
    assert any("batch_norm" in t for t in targets), targets
    assert_close(program.module()(x), net(x))


def test_module_backend_argument(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        brn.BatchRenorm2d(4, backend="gpu")
    from batchrenorm_cuda import _ops

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError("backend='reference' called a fused op")

    monkeypatch.setattr(_ops, "OPS", Forbidden())
    m = brn.BatchRenorm2d(4, backend="reference")
    m(torch.randn(2, 4, 3, 3)).sum().backward()
    m.eval()(torch.randn(2, 4, 3, 3))
    assert "backend='reference'" in repr(m)


@pytest.mark.parametrize("cls", [brn.BatchRenorm1d, brn.BatchRenorm2d, brn.BatchRenorm3d])
def test_every_argument_is_documented(cls):
    doc = inspect.getdoc(cls)
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"{name}:" in doc or f"{name}," in doc, f"{cls.__name__} documents {name}"
    assert "0.1" in doc and "5000" in doc  # why the defaults differ from BatchNorm's


def test_py_typed_is_shipped():
    package = os.path.dirname(brn.__file__)
    assert os.path.isfile(os.path.join(package, "py.typed"))
    with open(os.path.join(os.path.dirname(package), "setup.py")) as f:
        assert "py.typed" in f.read()
