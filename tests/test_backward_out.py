"""The out= overloads of batchrenorm::backward and backward_relu (what torch.compile's graphs
call: Inductor lowers a functional custom op to its overload tagged `out`), on every backend:
the functional op's values, bit for bit, written into the given tensors in each layout, rank and
dtype; outputs whose mask entry is false left as they were; given tensors in another layout or
overlapping an argument written through a copy; their checks. The lowering itself is tested in
test_compile.py.

The out= path is the glue's, shared by every dtype: the dtypes here are float64 (float64
per-channel gradients) and bfloat16 (a low-precision input with float32 ones); float32 is in
the other tests, and every dtype's kernels in test_backward_relu.py."""
import pytest
import torch

from fused_cases import backend_fixture  # noqa: F401 - autouse: every test on every backend
from test_backward_relu import CASES, _inputs

MASKS = ([True, True, True], [True, False, False], [False, True, True])


def _call(backend, relu, out, g, z, x, w, mean, invstd, r, d, train, mask):
    """backward(_relu) or its .out overload on the same arguments."""
    op = backend.ops.backward_relu if relu else backend.ops.backward
    args = ((g, z) if relu else (g,)) + (x, w, mean, invstd, r, d, train, mask)
    if out is None:
        return op(*args)
    names = ("grad_input", "grad_weight", "grad_bias")
    return op.out(*args, **dict(zip(names, out)))


def _poisoned(x, C, stat_dtype, memory_format=torch.preserve_format):
    nan = float("nan")
    return [torch.full_like(x, nan, memory_format=memory_format),
            torch.full((C,), nan, dtype=stat_dtype, device=x.device),
            torch.full((C,), nan, dtype=stat_dtype, device=x.device)]


@pytest.mark.parametrize("relu", [False, True], ids=["backward", "backward_relu"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,kind", CASES)
def test_out_overload_writes_the_functional_results(shape, kind, dtype, train, relu, backend):
    x, g, z, (w, mean, invstd, r, d) = _inputs(shape, kind, dtype, backend)
    for mask in MASKS:
        expected = _call(backend, relu, None, g, z, x, w, mean, invstd, r, d, train, mask)
        # The layout the functional op gives (the fake's), so the kernels write in place.
        out = _poisoned(expected[0] if mask[0] else x, shape[1], mean.dtype)
        returned = _call(backend, relu, out, g, z, x, w, mean, invstd, r, d, train, mask)
        for name, given, got, want, wanted in zip(("grad_input", "grad_weight", "grad_bias"),
                                                  out, returned, expected, mask):
            assert got is given, name
            if wanted:
                diff = (given.double() - want.double()).abs().max()
                assert torch.equal(given, want), f"{name}: {diff}"
            else:
                assert given.isnan().all(), f"{name} was written with its mask entry false"


def test_out_in_another_layout_or_overlapping_an_argument(backend):
    x, g, z, (w, mean, invstd, r, d) = _inputs((3, 16, 6, 7), "channels_last", torch.float32,
                                               backend)
    mask = [True, True, True]
    expected = _call(backend, True, None, g, z, x, w, mean, invstd, r, d, True, mask)
    contiguous = _poisoned(x, 16, mean.dtype, torch.contiguous_format)
    contiguous[1] = torch.full((32,), float("nan"), device=x.device)[::2]  # strided
    _call(backend, True, contiguous, g, z, x, w, mean, invstd, r, d, True, mask)
    # grad_input written over grad_output, as an in-place backward would.
    g_copy = g.clone()
    in_place = [g_copy] + _poisoned(x, 16, mean.dtype)[1:]
    _call(backend, True, in_place, g_copy, z, x, w, mean, invstd, r, d, True, mask)
    for out in (contiguous, in_place):
        for got, want in zip(out, expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("index,bad,error,match", [
    (0, lambda t: t[:1], ValueError, r"grad_input must have shape \[2, 4, 3, 3\]"),
    (0, lambda t: t.double(), TypeError, "grad_input must be Float"),
    (1, lambda t: t[:3], ValueError, r"grad_weight must have shape \[4\]"),
    (2, lambda t: t.half(), TypeError, "grad_bias must be Float"),
])
def test_out_checks_name_the_argument(index, bad, error, match, backend):
    x = torch.randn(2, 4, 3, 3, device=backend.device)
    w = torch.rand(4, device=backend.device) + 0.5
    out = _poisoned(x, 4, torch.float32)
    out[index] = bad(out[index])
    with pytest.raises(error, match=match):
        _call(backend, False, out, torch.randn_like(x), None, x, w, w, w, None, None, True,
              [True, True, True])


def test_out_on_another_device_is_refused(backend):
    x = torch.randn(2, 4, 3, 3, device=backend.device)
    w = torch.rand(4, device=backend.device) + 0.5
    out = _poisoned(x, 4, torch.float32)
    out[1] = out[1].to("meta")
    with pytest.raises(RuntimeError, match="grad_weight is on meta"):
        _call(backend, False, out, torch.randn_like(x), None, x, w, w, w, None, None, True,
              [True, True, True])
