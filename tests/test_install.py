"""How the package loads its compiled extension _C (batchrenorm_cuda/_loader.py): an extension
built for another torch release is refused, and the warning names the real cause and the fix.
The install paths themselves are make test-install (tests/install/); here, copies of the package
in a temp folder stand for a source tree, an install, and an install for another torch."""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import batchrenorm_cuda
from batchrenorm_cuda import _loader, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(batchrenorm_cuda.__file__))


@pytest.mark.parametrize("built, built_cuda, with_cuda, runtime, runtime_cuda, refused", [
    ("2.13.0+cpu", None, False, "2.13.0+cpu", None, False),
    ("2.14.0+cu130", None, False, "2.14.1+cpu", None, False),       # a patch release: same ABI
    ("2.14.1+cu130", "13.0", True, "2.14.1+cu130", "13.0", False),
    ("2.13.0+cpu", None, False, "2.14.1+cu130", "13.0", True),      # another release
    ("2.14.1", None, False, "2.13.0+cpu", None, True),
    ("2.14.1+cu130", "13.0", True, "2.14.1+cpu", None, True),       # CUDA kernels, CPU torch
    ("2.11.0+cu130", "13.0", True, "2.11.0a0+git1234", "13.0", False),
])
def test_build_and_runtime_torch(built, built_cuda, with_cuda, runtime, runtime_cuda, refused):
    why = _loader.mismatch(built, built_cuda, with_cuda, runtime, runtime_cuda)
    assert (why is not None) == refused, why
    if refused:
        assert built in why and runtime in why


def _copy_package(dest, with_extension):
    """A copy of the package's Python files, and of the loaded _C if asked for."""
    target = os.path.join(dest, "batchrenorm_cuda")
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns(
        "__pycache__", "_C*.so", "_build_info.py"))
    if with_extension:
        shutil.copy(_ops._C.__file__, target)
        import torch
        with open(os.path.join(target, "_build_info.py"), "w") as f:
            f.write(f"TORCH_VERSION = {torch.__version__!r}\nTORCH_CUDA = None\n"
                    "WITH_CUDA = False\n")
    return target


def _import_warnings(path):
    """The RuntimeWarnings of `import batchrenorm_cuda` in a fresh Python whose sys.path starts
    with `path`, and from which the source tree under test (editable installs put it on sys.path)
    and the editable finder are removed; and whether the fused CPU kernels are available there."""
    script = textwrap.dedent(f"""
        import os, sys, warnings
        root = os.path.realpath({ROOT!r})
        sys.path[:] = {path!r} + [p for p in sys.path if p and os.path.realpath(p) != root]
        # An editable install's finder would resolve batchrenorm_cuda._C to the source tree's.
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "__editable__" not in getattr(f, "__module__", "")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import batchrenorm_cuda
        for w in caught:
            if issubclass(w.category, RuntimeWarning):
                print("WARNING", w.message)
        print("FROM", os.path.dirname(batchrenorm_cuda.__file__))
        print("CPU", batchrenorm_cuda.extension_available("cpu"))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=path[0], timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_not_built_says_so_and_how_to_build(tmp_path):
    tree = _copy_package(tmp_path, with_extension=False)
    out = _import_warnings([str(tmp_path)])
    assert f"FROM {tree}" in out
    # A non-editable install of the package elsewhere on sys.path is what the copy hides.
    elsewhere = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(ROOT)
                 and glob.glob(os.path.join(p, "batchrenorm_cuda", "_C*.so"))]
    if elsewhere:
        assert "hides the installed one in" in out
    else:
        assert "the compiled extension _C is not built in" in out
        assert "pip install --no-build-isolation ." in out
    assert "circular import" not in out
    assert "CPU False" in out


@pytest.mark.skipif(_ops._C is None, reason="needs the compiled extension to copy")
def test_source_tree_that_hides_the_install_says_so(tmp_path):
    tree = _copy_package(tmp_path / "tree", with_extension=False)
    installed = _copy_package(tmp_path / "site", with_extension=True)
    out = _import_warnings([str(tmp_path / "tree"), str(tmp_path / "site")])
    assert f"FROM {tree}" in out
    assert f"hides the installed one in {installed}" in out
    assert "pip install --no-build-isolation -e ." in out


@pytest.mark.skipif(_ops._C is None, reason="needs the compiled extension to copy")
def test_extension_for_another_torch_is_refused(tmp_path):
    target = _copy_package(tmp_path, with_extension=True)
    with open(os.path.join(target, "_build_info.py"), "w") as f:
        f.write("TORCH_VERSION = '1.0.0'\nTORCH_CUDA = None\nWITH_CUDA = False\n")
    out = _import_warnings([str(tmp_path)])
    assert "it was built for torch 1.0.0" in out
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in out
    assert "CPU False" in out


@pytest.mark.skipif(_ops._C is None, reason="needs the compiled extension to copy")
def test_extension_for_this_torch_loads(tmp_path):
    _copy_package(tmp_path, with_extension=True)
    out = _import_warnings([str(tmp_path)])
    assert "WARNING" not in out
    assert "CPU True" in out


@pytest.fixture
def setup_rules(monkeypatch):
    """setup.py's functions (its source up to the setup() call), with the environment restored
    afterwards, and no GPU, toolkit or override unless a test sets one."""
    saved = dict(os.environ)
    for name in ("BATCHRENORM_CPU_ONLY", "BATCHRENORM_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    path = os.path.join(ROOT, "setup.py")
    with open(path) as f:
        source = f.read()
    namespace = {"__file__": path, "__name__": "batchrenorm_setup"}
    try:
        exec(compile(source[:source.index("\nsetup(")], path, "exec"), namespace)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    namespace["_gpu_count"] = lambda: 0
    return namespace


def _cuda_machine(rules, monkeypatch, gpus=0):
    import torch
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    rules["_nvcc"] = lambda: "/opt/cuda/bin/nvcc"
    rules["_gpu_count"] = lambda: gpus


def test_setup_builds_cpu_only_without_gpu_or_arch_list(setup_rules, monkeypatch):
    _cuda_machine(setup_rules, monkeypatch)
    use_cuda, why = setup_rules["_use_cuda"]()
    assert not use_cuda
    assert "TORCH_CUDA_ARCH_LIST" in why and "BATCHRENORM_FORCE_CUDA=1" in why


@pytest.mark.parametrize("env, gpus", [({"TORCH_CUDA_ARCH_LIST": "9.0"}, 0),
                                       ({"BATCHRENORM_FORCE_CUDA": "1"}, 0), ({}, 1)])
def test_setup_builds_cuda_when_asked_or_a_gpu_is_there(setup_rules, monkeypatch, env, gpus):
    _cuda_machine(setup_rules, monkeypatch, gpus)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert setup_rules["_use_cuda"]()[0]
    monkeypatch.setenv("BATCHRENORM_CPU_ONLY", "1")
    assert setup_rules["_use_cuda"]() == (False, "BATCHRENORM_CPU_ONLY=1")


def test_setup_without_toolkit_or_cuda_torch(setup_rules, monkeypatch):
    import torch
    monkeypatch.setattr(torch.version, "cuda", None)
    setup_rules["_nvcc"] = lambda: None
    use_cuda, why = setup_rules["_use_cuda"]()
    assert not use_cuda and "CPU build" in why and "no CUDA toolkit" in why
    monkeypatch.setenv("BATCHRENORM_FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="BATCHRENORM_FORCE_CUDA=1 needs a CUDA build of torch"):
        setup_rules["_use_cuda"]()


def test_setup_default_arch_list_is_torchs_that_nvcc_knows(setup_rules, monkeypatch):
    import torch
    monkeypatch.setattr(torch._C, "_cuda_getArchFlags",
                        lambda: "sm_75 sm_80 sm_86 sm_90 sm_90a sm_100 sm_120", raising=False)
    setup_rules["_nvcc"] = lambda: "nvcc"

    class Listed:
        stdout = "compute_75\ncompute_80\ncompute_86\ncompute_90\ncompute_100\n"

    monkeypatch.setattr(setup_rules["subprocess"], "run", lambda *a, **k: Listed())
    assert setup_rules["_default_arch_list"]() == "7.5;8.0;8.6;9.0;10.0+PTX"
