#!/usr/bin/env bash
# The first GPU day (issue 19) in two device calls of at most 10 minutes each, most valuable
# first. Run from the repository root:
#   bash tests/gpu/run_all.sh 1     build for sm_90 only, the CUDA tests, a compute-sanitizer slice
#   bash tests/gpu/run_all.sh 2     the benchmark against cuDNN and native, the model calibration,
#                                   the rest of the sanitizers
#   bash tests/gpu/run_all.sh all   both, one after the other
# Part 2 reuses part 1's build when the machine is still warm, else builds again.
#
# Every step runs under its own time limit; a failing or timed-out step is recorded and the
# next one still runs. What comes back in $OUT (default ./gpu_out): summary.txt (each step's
# status and seconds, and the tail of its log), steps.jsonl (one JSON line per step),
# logs.tar.gz (every log), calibration.json, bench_results.tar.gz (benchmarks/results/cuda_*,
# to commit). The machines have Python 3.12, torch 2.11+cu130, pytest, pytest-xdist,
# hypothesis, and no network.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (16),
# BUDGET_S (default 570: the steps' limits are cut to what is left of it, so a call of the
# device tool's 600 s still returns this script's files).
set -uo pipefail
cd "$(dirname "$0")/../.."
PART="${1:-1}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$(mktemp -d)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-570}"
failures=0

finish() {
  echo "== part $PART done in $(( $(date +%s) - T0 )) s, $failures step(s) failed" | tee -a "$LOG/summary.txt"
  cp "$LOG/summary.txt" "$OUT/summary_part$PART.txt" 2>/dev/null
  cp "$LOG/steps.jsonl" "$OUT/steps_part$PART.jsonl" 2>/dev/null
  tar czf "$OUT/logs_part$PART.tar.gz" -C "$LOG" . 2>/dev/null
  if ls benchmarks/results/cuda_* >/dev/null 2>&1; then
    tar czf "$OUT/bench_results.tar.gz" benchmarks/results/cuda_* 2>/dev/null
  fi
}
trap finish EXIT

# step NAME LIMIT_S CMD...: runs CMD with a time limit, logs to $LOG/NAME.log, records the
# status and the seconds, prints the log's tail; never stops the script.
step() {
  local name="$1" limit="$2"; shift 2
  local start rc status left
  start=$(date +%s)
  left=$(( T0 + BUDGET_S - start ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: SKIPPED, the budget of $BUDGET_S s is spent" | tee -a "$LOG/summary.txt"
    printf '{"part": "%s", "step": "%s", "status": "skipped", "rc": -1, "seconds": 0}\n' \
      "$PART" "$name" >>"$LOG/steps.jsonl"
    failures=$((failures + 1))
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)" | tee -a "$LOG/summary.txt"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$LOG/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$status" = ok ] || failures=$((failures + 1))
  local secs=$(( $(date +%s) - start ))
  tail -n "${TAIL:-15}" "$LOG/$name.log" | tee -a "$LOG/summary.txt"
  echo "-- $name: $status (rc $rc) in $secs s" | tee -a "$LOG/summary.txt"
  printf '{"part": "%s", "step": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' \
    "$PART" "$name" "$status" "$rc" "$secs" >>"$LOG/steps.jsonl"
  return 0
}

built() { "$PY" -c "import batchrenorm_cuda as b, sys; sys.exit(0 if b.extension_available('cuda') else 1)" 2>/dev/null; }

build() {
  step env 30 bash -c 'nvidia-smi; '"$PY"' -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version | tail -2; command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"'
  if built; then
    echo "== build: the CUDA extension is already built (warm machine)" | tee -a "$LOG/summary.txt"
  else
    # sm_90 only: one architecture compiles in about half the time of the default list.
    TAIL=40 step build 300 env BATCHRENORM_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation \
      --no-deps -v -e .
    grep -E "spill|Used [0-9]+ registers" "$LOG/build.log" | sort | uniq -c | sort -rn | head -20 \
      >"$LOG/ptxas.txt" || true
  fi
  built || { echo "== the CUDA extension is NOT usable: nothing else can run" | tee -a "$LOG/summary.txt"; exit 1; }
}

SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
sanitize() {  # sanitize TOOL LIMIT
  if [ ! -x "$SAN" ]; then
    echo "== compute-sanitizer not found: $1 NOT run" | tee -a "$LOG/summary.txt"; failures=$((failures + 1)); return
  fi
  local extra=()
  [ "$1" = memcheck ] && extra=(--leak-check no)
  # float32 and bfloat16 only: a sanitizer slows the ops tenfold or more.
  step "sanitizer_$1" "$2" "$SAN" --tool "$1" "${extra[@]}" --error-exitcode 99 "$PY" \
    tests/gpu/sanitize.py --dtypes float32,bfloat16
}

part1() {
  build
  # The CUDA tests: the fused-kernel tests on the GPU backend only (the emulated and CPU ones
  # ran in CI), the >2^31-element test left to part 2's time if any.
  step pytest_cuda 150 "$PY" -m pytest -q -x -rfE -n 8 --durations=10 tests/test_fused_kernels.py \
    tests/test_op_calls.py tests/test_backward_relu.py \
    -k "cuda and not cuda_emulated" -m "not slow" -p no:cacheprovider
  # A sanitizer slice: memory errors and barrier misuse first (racecheck and initcheck: part 2).
  sanitize memcheck 60
  sanitize synccheck 30
}

part2() {
  build
  # The model's calibration first: it is what the issue cannot get any other way.
  step calibrate 180 "$PY" tests/gpu/calibrate.py --out "$OUT" --quick
  step bench_cuda 180 "$PY" benchmarks/bench_batchrenorm.py --device cuda --quick
  step quick_bench 60 "$PY" tests/gpu/quick_bench.py
  sanitize racecheck 60
  sanitize initcheck 60
}

case "$PART" in
  1) part1 ;;
  2) part2 ;;
  all) part1; part2 ;;
  *) echo "usage: bash tests/gpu/run_all.sh 1|2|all" >&2; exit 2 ;;
esac
[ "$failures" -eq 0 ]
