"""The smoke test that ends each install path (make test-install, test-torch, gpu-build): the
installed package imports, its fused CPU kernels load and agree with the reference on a training
step (forward, buffers, backward) and in eval.

    python tests/smoke_install.py                      the fused CPU kernels must be loaded
    python tests/smoke_install.py --expect-warning S   _C must not load, with a RuntimeWarning
                                                       that contains S; the reference must work
    python tests/smoke_install.py --cuda-registered    also: every op has a CUDA kernel

Run it from outside the source tree: from its root, Python would import the tree instead.
"""
import argparse
import os
import sys
import warnings

# This file's folder (tests/) is first on sys.path; the repository root is not, unless run from it.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(HERE)]

import torch  # noqa: E402

def training_step(brn, backend: str, x: torch.Tensor):
    torch.manual_seed(1)  # the same parameters and buffers for every backend
    layer = brn.BatchRenorm2d(x.shape[1], warmup_steps=0, r_max_ramp_steps=0,
                              d_max_ramp_steps=0, backend=backend).double()
    with torch.no_grad():
        layer.running_mean.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    layer.eval()
    return [y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
            layer.running_var, layer(x)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-warning", metavar="TEXT")
    parser.add_argument("--cuda-registered", action="store_true")
    args = parser.parse_args()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import batchrenorm_cuda as brn
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                and "batchrenorm_cuda" in str(w.message)]
    where = os.path.dirname(brn.__file__)
    print(f"smoke: torch {torch.__version__}, batchrenorm_cuda from {where}")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 0.3
    expected = training_step(brn, "reference", x)

    if args.expect_warning is not None:
        assert not brn.extension_available("cpu"), "smoke: _C loaded, expected it not to"
        assert any(args.expect_warning in m for m in messages), (
            f"smoke: expected a warning containing {args.expect_warning!r}, got {messages}")
        got = training_step(brn, "auto", x)  # must fall back to the reference
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e)
        print(f"smoke: OK, _C refused as expected: {messages[0]}")
        return 0

    assert not messages, f"smoke: unexpected warning: {messages}"
    assert brn.extension_available("cpu"), "smoke: the fused CPU kernels are not loaded"
    from batchrenorm_cuda import _ops
    print(f"smoke: _C is {_ops._C.__file__}")
    got = training_step(brn, "fused", x)
    for name, e, g in zip(["output", "grad_input", "grad_weight", "grad_bias", "running_mean",
                           "running_var", "eval output"], expected, got):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"smoke: {name}: {m}")
    print("smoke: fused CPU kernels agree with the reference (train step, backward, buffers, eval)")

    if args.cuda_registered:
        # Every op the schemas define, so that an op added later is checked too.
        ops = sorted(n for n in torch._C._dispatch_get_all_op_names()
                     if n.startswith("batchrenorm::"))
        assert ops, "smoke: no batchrenorm:: op is defined"
        for key in ("CPU", "CUDA"):
            missing = [op for op in ops
                       if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
            assert not missing, f"smoke: no {key} kernel registered for {missing}"
        print(f"smoke: all {len(ops)} ops have CPU and CUDA kernels registered; "
              f"extension_available('cuda') = {brn.extension_available('cuda')} "
              f"(torch.cuda.is_available() = {torch.cuda.is_available()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
