# Helpers for the install tests (make test-install, test-torch, gpu-build); sourced, not run.
# Each test works in fresh venvs under $VENVS on a copy of the working tree, so it never touches
# the developer's .venv, build/ or in-place _C.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENVS="$(mkdir -p "${VENVS:-$ROOT/.venvs}" && cd "${VENVS:-$ROOT/.venvs}" && pwd)"
# Downloaded wheels (torch and its CUDA libraries: gigabytes) are kept here between runs; pip
# fills it again when it is missing or empty.
WHEELHOUSE="${WHEELHOUSE:-$HOME/.cache/batchrenorm_cuda/wheels}"
mkdir -p "$WHEELHOUSE"
# Builds share the machine: one compile at a time unless told otherwise.
export MAX_JOBS="${MAX_JOBS:-1}"
# The packages a test venv needs besides torch (the Makefile's venv list).
TEST_PACKAGES=("setuptools>=77" ninja pybind11 pytest pytest-xdist hypothesis matplotlib tqdm
               numpy scikit-learn)

# pip_in VENV ARGS...: quiet pip, less the machine's notes about local index folders it skips.
pip_in() {
  local venv="$1"; shift
  "$venv/bin/python" -m pip -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# fresh_venv DIR: a new venv, without the system's site-packages (a user's clean environment).
fresh_venv() {
  rm -rf "$1"
  "$PYTHON" -m venv "$1"
  pip_in "$1" install --upgrade pip
}

# copy_tree DEST: the working tree's tracked and untracked, not ignored, files, as git sees them.
copy_tree() {
  rm -rf "$1"
  mkdir -p "$1"
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -cf - -T -) | tar -xf - -C "$1"
}

# install_torch VENV SPEC [PACKAGE...]: torch from the registry, through $WHEELHOUSE, and the
# other packages in the same resolve (torch may cap one, e.g. 2.11's setuptools<82). The
# machine's pip constraints file (if any) caps torch at the releases stored locally; the version
# matrix lifts it for this install only.
install_torch() {
  local venv="$1" spec="$2"; shift 2
  PIP_CONSTRAINT=/dev/null pip_in "$venv" download -d "$WHEELHOUSE" "$spec"
  PIP_CONSTRAINT=/dev/null pip_in "$venv" install --find-links "$WHEELHOUSE" "$spec" "$@"
}

# smoke VENV [ARGS...]: tests/smoke_install.py from outside the tree (so the install is imported).
smoke() {
  local venv="$1"; shift
  (cd "$VENVS" && "$venv/bin/python" "$ROOT/tests/smoke_install.py" "$@" 2>&1 | grep -v '^W[0-9]\{4\} ')
}
