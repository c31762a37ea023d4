"""Loads the compiled extension batchrenorm_cuda._C, or says why it cannot, and what to do.

An extension is compiled against one torch release's C++ headers, and torch's C++ ABI changes
between releases: one built for another release may fail to load, or load and misbehave. So, as
torchvision and xformers do, _C is loaded only into the torch release (major.minor) that
setup.py recorded in _build_info.py; otherwise the package runs on the pure-PyTorch reference and
the warning names both releases and the rebuild command (README, "Install").
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Optional, Tuple

import torch

PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

REBUILD = ("rebuild it against the torch you run: from the source, `pip install "
           "--no-build-isolation --force-reinstall --no-deps .` (`-e .` for development)")


def _release(version: str) -> Optional[Tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _installed_elsewhere() -> Optional[str]:
    """Another batchrenorm_cuda on sys.path that has a compiled _C: the one that a source tree
    in the current directory (first on sys.path) hides."""
    here = os.path.realpath(PACKAGE_DIR)
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), PACKAGE)
        if os.path.realpath(candidate) != here and glob.glob(os.path.join(candidate, "_C*.so")):
            return candidate
    return None


def mismatch(built_version: str, built_cuda: Optional[str], with_cuda: bool,
             runtime_version: str, runtime_cuda: Optional[str]) -> Optional[str]:
    """Why an extension built for one torch must not load into another, or None if it may."""
    if _release(built_version) != _release(runtime_version):
        return (f"it was built for torch {built_version}, and torch {runtime_version} is running "
                f"(an extension loads only into the torch release it was compiled against)")
    if with_cuda and runtime_cuda is None:
        return (f"it was built with the CUDA kernels for torch {built_version} (CUDA "
                f"{built_cuda}), and torch {runtime_version} is a CPU build")
    return None


def load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """(the module, None), or (None, why it is not loaded and the fix)."""
    name = f"{PACKAGE}._C"
    if name in sys.modules:  # put there on purpose, e.g. an AddressSanitizer build (fuzz_asan)
        return sys.modules[name], None
    if importlib.util.find_spec(name) is None:
        other = _installed_elsewhere()
        if other is not None:
            return None, (
                f"the package imported is the source tree {PACKAGE_DIR}, which has no compiled _C "
                f"and hides the installed one in {other} (Python looks in the current directory "
                "first). Run from another directory, or install the source tree in place: "
                "`pip install --no-build-isolation -e .`")
        return None, (
            f"the compiled extension _C is not built in {PACKAGE_DIR}. Build it with `pip install "
            "--no-build-isolation .` (`-e .` for development), which needs torch, a C++ compiler "
            "and ninja (README, \"Install\")")
    try:
        info = importlib.import_module(f"{PACKAGE}._build_info")
    except ImportError:  # built by other means than setup.py (tests build their own)
        info = None
    if info is not None:
        why = mismatch(info.TORCH_VERSION, info.TORCH_CUDA, info.WITH_CUDA, torch.__version__,
                       torch.version.cuda)
        if why is not None:
            return None, f"the compiled extension _C is not loaded: {why}; {REBUILD}"
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError) as error:
        hint = ("it was probably built against another torch" if "undefined symbol" in str(error)
                else "it needs the libraries of the torch it was built with")
        return None, f"the compiled extension _C failed to load ({error}): {hint}; {REBUILD}"
