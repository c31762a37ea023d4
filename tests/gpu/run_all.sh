#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the whole test suite, run the
# sanitizers over every op, run the benchmark harness on CUDA.
#   bash tests/gpu/run_all.sh            (from the repository root)
# What comes back in $OUT (default ./gpu_out) is at most four files, because the device tool
# returns at most 8: summary.txt, logs.tar.gz (every log), and the benchmark's results
# (bench_results.tar.gz: benchmarks/results/cuda_*.{json,md,png}, to commit).
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), PYTHON (default python3), SKIP_SLOW=1 to leave
# out the >2^31-element test, SKIP_BUILD=1 to reuse an existing build, SKIP_TESTS=1,
# SKIP_SANITIZE=1, BENCH=quick|full|none (default quick) to split the work over several calls
# of at most 10 minutes each.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$(mktemp -d)"
finish() {
  tar czf "$OUT/logs.tar.gz" -C "$LOG" . 2>/dev/null
  cp "$LOG/summary.txt" "$OUT/summary.txt" 2>/dev/null
  if ls benchmarks/results/cuda_* >/dev/null 2>&1; then
    tar czf "$OUT/bench_results.tar.gz" benchmarks/results/cuda_* 2>/dev/null
  fi
}
trap finish EXIT
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
status=0
step() { echo "== $*" | tee -a "$LOG/summary.txt"; }

{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  command -v nvcc && nvcc --version | tail -2
  command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
} >"$LOG/env.txt" 2>&1
cat "$LOG/env.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  start=$(date +%s)
  if ! MAX_JOBS="${MAX_JOBS:-8}" BATCHRENORM_FORCE_CUDA=1 "$PY" -m pip install \
      --no-build-isolation --no-deps -v -e . >"$LOG/build.log" 2>&1; then
    step "BUILD FAILED"; tail -80 "$LOG/build.log"; exit 1
  fi
  step "build ok in $(( $(date +%s) - start )) s"
  grep -E "spill|registers" "$LOG/build.log" | sort | uniq -c | sort -rn | head -20 >"$LOG/ptxas.txt" || true
fi
"$PY" -c "import batchrenorm_cuda as b; assert b.extension_available('cuda'), 'CUDA kernels not registered'" \
  2>&1 | tee -a "$LOG/summary.txt" || { step "EXTENSION NOT USABLE"; exit 1; }

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "pytest tests/test_fused_kernels.py"
  slow=()
  [ "${SKIP_SLOW:-0}" = 1 ] && slow=(-m "not slow")
  "$PY" -m pytest -q -rfE --durations=15 tests/test_fused_kernels.py "${slow[@]}" >"$LOG/pytest_cuda.log" 2>&1 || status=1
  tail -25 "$LOG/pytest_cuda.log" | tee -a "$LOG/summary.txt"

  step "pytest (rest of the suite)"
  "$PY" -m pytest -q -rfE tests --ignore=tests/test_fused_kernels.py >"$LOG/pytest_rest.log" 2>&1 || status=1
  tail -15 "$LOG/pytest_rest.log" | tee -a "$LOG/summary.txt"
fi

SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ "${SKIP_SANITIZE:-0}" = 1 ]; then
  step "sanitizers skipped (SKIP_SANITIZE=1)"
elif [ -x "$SAN" ]; then
  for tool in memcheck racecheck initcheck synccheck; do
    step "compute-sanitizer --tool $tool"
    extra=()
    [ "$tool" = memcheck ] && extra=(--leak-check no)
    if "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 "$PY" tests/gpu/sanitize.py \
        >"$LOG/sanitizer_$tool.log" 2>&1; then
      tail -3 "$LOG/sanitizer_$tool.log" | tee -a "$LOG/summary.txt"
    else
      status=1; tail -40 "$LOG/sanitizer_$tool.log" | tee -a "$LOG/summary.txt"
    fi
  done
else
  step "compute-sanitizer not found: sanitizers NOT run"; status=1
fi

step "quick kernel timing"
"$PY" tests/gpu/quick_bench.py >"$LOG/quick_bench.md" 2>&1 || status=1
cat "$LOG/quick_bench.md" | tee -a "$LOG/summary.txt"

case "${BENCH:-quick}" in
  none) step "benchmark harness skipped (BENCH=none)" ;;
  quick|full)
    step "benchmark harness on CUDA (${BENCH:-quick})"
    args=(--device cuda)
    [ "${BENCH:-quick}" = quick ] && args+=(--quick)
    "$PY" benchmarks/bench_batchrenorm.py "${args[@]}" >"$LOG/bench.log" 2>&1 || status=1
    tail -40 "$LOG/bench.log" | tee -a "$LOG/summary.txt" ;;
esac
step "done, status $status"
exit "$status"
