#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the whole test suite, run the
# sanitizers over every op, time the kernels. Logs go to $OUT (default ./gpu_out).
#   bash tests/gpu/run_all.sh            (from the repository root)
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), PYTHON (default python3), SKIP_SLOW=1 to leave
# out the >2^31-element test, SKIP_BUILD=1 to reuse an existing build.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }

{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  command -v nvcc && nvcc --version | tail -2
  command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  start=$(date +%s)
  if ! MAX_JOBS="${MAX_JOBS:-8}" BATCHRENORM_FORCE_CUDA=1 "$PY" -m pip install \
      --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1; then
    step "BUILD FAILED"; tail -80 "$OUT/build.log"; exit 1
  fi
  step "build ok in $(( $(date +%s) - start )) s"
  grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 >"$OUT/ptxas.txt" || true
fi
"$PY" -c "import batchrenorm_cuda as b; assert b.extension_available('cuda'), 'CUDA kernels not registered'" \
  2>&1 | tee -a "$OUT/summary.txt" || { step "EXTENSION NOT USABLE"; exit 1; }

step "pytest tests/test_cuda.py"
slow=()
[ "${SKIP_SLOW:-0}" = 1 ] && slow=(-m "not slow")
"$PY" -m pytest -q -rfE --durations=15 tests/test_cuda.py "${slow[@]}" >"$OUT/pytest_cuda.log" 2>&1 || status=1
tail -25 "$OUT/pytest_cuda.log" | tee -a "$OUT/summary.txt"

step "pytest (rest of the suite)"
"$PY" -m pytest -q -rfE tests --ignore=tests/test_cuda.py >"$OUT/pytest_rest.log" 2>&1 || status=1
tail -15 "$OUT/pytest_rest.log" | tee -a "$OUT/summary.txt"

SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ -x "$SAN" ]; then
  for tool in memcheck racecheck initcheck synccheck; do
    step "compute-sanitizer --tool $tool"
    extra=()
    [ "$tool" = memcheck ] && extra=(--leak-check no)
    if "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 "$PY" tests/gpu/sanitize.py \
        >"$OUT/sanitizer_$tool.log" 2>&1; then
      tail -3 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
    else
      status=1; tail -40 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
    fi
  done
else
  step "compute-sanitizer not found: sanitizers NOT run"; status=1
fi

step "quick benchmark"
"$PY" tests/gpu/quick_bench.py >"$OUT/quick_bench.md" 2>&1 || status=1
cat "$OUT/quick_bench.md"
step "done, status $status"
exit "$status"
