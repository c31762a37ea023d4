#!/usr/bin/env bash
# make test-install: the ways users install, each in a fresh venv on a copy of the working tree,
# each ending with tests/smoke_install.py (the fused CPU kernels load and agree with the reference).
#   1. pip install .                          build isolation: pip puts the newest torch in the
#                                             build environment, and, in a new venv, the same one
#                                             in the venv
#   2. pip install --no-build-isolation .     against torch $TORCH_OLD (default 2.13.0, C++17)
#   3. pip install --no-build-isolation .     against torch $TORCH_NEW (default 2.14.1, C++20), and
#                                             again with no CUDA toolkit (CUDA_HOME pointing
#                                             nowhere, no nvcc on PATH)
#   4. python -m build --sdist: it carries the headers; python -m build --wheel (isolated), the
#      wheel installed into the venv of 1 (the same torch), where it runs, and into the venv of 2
#      (another torch release), where _C must be refused and the reference used
#   5. BATCHRENORM_FORCE_CUDA=1 with a CPU torch fails at once, saying why
#   6. Python started in the source tree's root warns that the tree hides the installed package
# Times go to $VENVS/install-results.md. On this machine a CUDA toolkit is on PATH and there is
# no GPU, so every build here is of the CPU kernels (setup.py's rule for no GPU and no
# TORCH_CUDA_ARCH_LIST); make gpu-build builds the CUDA ones.
#
# The isolated builds (1, 4) lift the machine's pip constraints file, as for a user who has
# none: pip does not apply it to the build environment, so the venv would get the capped torch
# and the build the newest, and _C would rightly be refused.
source "$(dirname "$0")/common.sh"
TORCH_OLD="${TORCH_OLD:-2.13.0}"
TORCH_NEW="${TORCH_NEW:-2.14.1}"
results="$VENVS/install-results.md"
work="$VENVS/install"
mkdir -p "$work"
echo "# make test-install, $(date -u '+%F %H:%M') UTC" >"$results"

step() {  # step NAME COMMAND...: run, time, record
  local name="$1"; shift
  local start=$SECONDS
  log "$name"
  if "$@"; then
    echo "| $name | ok | $((SECONDS - start)) s |" >>"$results"
  else
    echo "| $name | FAILED | $((SECONDS - start)) s |" >>"$results"
    log "FAILED: $name"
    exit 1
  fi
}

build_log_says() {  # build_log_says FILE TEXT: the build printed TEXT (setup.py's choice)
  grep -q "$2" "$1" || { echo "expected '$2' in $1:" >&2; tail -20 "$1" >&2; return 1; }
}

isolated() {
  local venv="$work/isolated"
  fresh_venv "$venv"
  copy_tree "$work/src-isolated"
  (cd "$work/src-isolated" && PIP_CONSTRAINT=/dev/null nice -n 10 "$venv/bin/python" -m pip install -v \
     --find-links "$WHEELHOUSE" . >"$venv/build.log" 2>&1) || { tail -30 "$venv/build.log" >&2; return 1; }
  build_log_says "$venv/build.log" "building the CPU kernels only"
  smoke "$venv"
}

no_isolation() {  # no_isolation TORCH [ENV...]
  local torch="$1"; shift
  local venv="$work/torch-$torch"
  fresh_venv "$venv"
  pip_in "$venv" install "torch==$torch" "setuptools>=77" ninja
  copy_tree "$work/src-$torch"
  (cd "$work/src-$torch" && env "$@" nice -n 10 "$venv/bin/python" -m pip install -v \
     --no-build-isolation . >"$venv/build.log" 2>&1) || { tail -30 "$venv/build.log" >&2; return 1; }
  smoke "$venv"
}

no_toolkit() {
  local venv="$work/torch-$TORCH_NEW"
  local path
  path="$(tr ':' '\n' <<<"$PATH" | while read -r d; do [ -x "$d/nvcc" ] || printf '%s:' "$d"; done)"
  (cd "$work/src-$TORCH_NEW" && rm -rf build && env CUDA_HOME=/nonexistent PATH="${path%:}" \
     nice -n 10 "$venv/bin/python" -m pip install -v --no-build-isolation --force-reinstall \
     --no-deps . >"$venv/build-no-toolkit.log" 2>&1) || { tail -30 "$venv/build-no-toolkit.log" >&2; return 1; }
  build_log_says "$venv/build-no-toolkit.log" "building the CPU kernels only (no CUDA toolkit"
  smoke "$venv"
}

sdist() {
  local venv="$work/torch-$TORCH_OLD"
  pip_in "$venv" install build
  copy_tree "$work/src-build"
  rm -rf "$work/dist"
  (cd "$work/src-build" && "$venv/bin/python" -m build --sdist --no-isolation --outdir "$work/dist" \
     >"$work/build-sdist.log" 2>&1) || { tail -30 "$work/build-sdist.log" >&2; return 1; }
  local listing
  listing="$(tar -tzf "$work"/dist/*.tar.gz)"
  for f in csrc/batchrenorm.h csrc/batchrenorm_autograd.h csrc/cpu/batchrenorm_cpu_kernels.h \
           csrc/cuda/batchrenorm_cuda.h setup.py pyproject.toml; do
    grep -q "/$f\$" <<<"$listing" || { echo "the sdist lacks $f" >&2; return 1; }
  done
}

build_wheel() {
  local venv="$work/torch-$TORCH_OLD"
  (cd "$work/src-build" && PIP_CONSTRAINT=/dev/null PIP_FIND_LINKS="$WHEELHOUSE" nice -n 10 \
     "$venv/bin/python" -m build --wheel --outdir "$work/dist" >"$work/build-wheel.log" 2>&1) \
     || { tail -30 "$work/build-wheel.log" >&2; return 1; }
  ls "$work"/dist/*.whl >&2
}

wheel_same_torch() {
  pip_in "$work/isolated" install --force-reinstall --no-deps "$work"/dist/*.whl
  smoke "$work/isolated"
}

wheel_other_torch() {
  local built
  built="$(cd "$VENVS" && "$work/isolated/bin/python" -c \
    'from batchrenorm_cuda import _build_info as b; print(b.TORCH_VERSION)' 2>/dev/null)"
  pip_in "$work/torch-$TORCH_OLD" install --force-reinstall --no-deps "$work"/dist/*.whl
  smoke "$work/torch-$TORCH_OLD" --expect-warning "built for torch $built"
}

force_cuda_without_cuda() {
  local out
  if out="$(cd "$work/src-$TORCH_OLD" && BATCHRENORM_FORCE_CUDA=1 "$work/torch-$TORCH_OLD/bin/python" \
      -m pip install --no-build-isolation --no-deps . 2>&1)"; then
    echo "BATCHRENORM_FORCE_CUDA=1 with a CPU torch built" >&2; return 1
  fi
  grep -q "BATCHRENORM_FORCE_CUDA=1 needs a CUDA build of torch" <<<"$out" \
    || { echo "$out" | tail -20 >&2; return 1; }
}

shadowed() {
  local out
  out="$(cd "$work/src-$TORCH_NEW" && "$work/torch-$TORCH_NEW/bin/python" -c 'import batchrenorm_cuda' 2>&1)"
  grep -q "hides the installed one" <<<"$out" || { echo "$out" >&2; return 1; }
}

echo "| install path | result | time |" >>"$results"
echo "|---|---|---|" >>"$results"
step "pip install . (isolated)" isolated
step "pip install --no-build-isolation . (torch $TORCH_OLD)" no_isolation "$TORCH_OLD"
step "pip install --no-build-isolation . (torch $TORCH_NEW)" no_isolation "$TORCH_NEW"
step "the same, no CUDA toolkit (CUDA_HOME=/nonexistent, no nvcc on PATH)" no_toolkit
step "python -m build --sdist: the headers are in it" sdist
step "python -m build --wheel (isolated)" build_wheel
step "the wheel into the venv of pip install . (same torch)" wheel_same_torch
step "the wheel into torch $TORCH_OLD: _C refused, reference used" wheel_other_torch
step "BATCHRENORM_FORCE_CUDA=1 with a CPU torch: fails, says why" force_cuda_without_cuda
step "python in the source tree's root: warns that it hides the install" shadowed
cat "$results"
