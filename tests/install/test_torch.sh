#!/usr/bin/env bash
# make test-torch TORCH=2.X: build the extension against torch 2.X from the registry, in its own
# fresh venv on a copy of the working tree, then the smoke test and the test suite.
#   TORCH        the torch release (required)
#   TEST_MARK    pytest -m expression; default "not cuda_emulation" (the emulated CUDA kernels
#                take most of the suite's time and do not depend on the torch release; "" runs all)
#   TEST_WORKERS pytest-xdist workers (default 1)
# Appends a row to $VENVS/torch-results.md: the release, the date, build and test times, the
# pytest summary.
source "$(dirname "$0")/common.sh"
TORCH="${TORCH:?make test-torch TORCH=2.X}"
TEST_MARK="${TEST_MARK-not cuda_emulation}"
TEST_WORKERS="${TEST_WORKERS:-1}"
venv="$VENVS/torch-$TORCH"
src="$venv/src"

log "test-torch $TORCH: venv $venv"
fresh_venv "$venv"
install_torch "$venv" "torch==$TORCH" "${TEST_PACKAGES[@]}"
log "installed $("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

copy_tree "$src"
start=$SECONDS
if ! (cd "$src" && nice -n 10 "$venv/bin/python" -m pip install -v --no-build-isolation --no-deps -e . \
      >"$venv/build.log" 2>&1); then
  grep -E 'error|Error' "$venv/build.log" | head -40 >&2
  echo "| $TORCH | $(date -u +%F) | build failed | | see $venv/build.log |" >>"$VENVS/torch-results.md"
  log "test-torch $TORCH: the build FAILED ($venv/build.log)"
  exit 1
fi
build_s=$((SECONDS - start))
log "built in ${build_s}s"
smoke "$venv"

start=$SECONDS
status=0
(cd "$src" && TORCH_EXTENSIONS_DIR="$venv/torch_extensions" nice -n 10 "$venv/bin/python" -m pytest \
   -q -p no:cacheprovider -n "$TEST_WORKERS" ${TEST_MARK:+-m "$TEST_MARK"} tests) \
   >"$venv/pytest.log" 2>&1 || status=$?
test_s=$((SECONDS - start))
summary="$(grep -E '(passed|failed|errors?)( |,).* in [0-9.]+s' "$venv/pytest.log" | tail -1 | sed 's/^=* //; s/ =*$//')"
grep -E '^(FAILED|ERROR) ' "$venv/pytest.log" | head -30 >&2 || true
echo "| $TORCH | $(date -u +%F) | ${build_s} s | ${test_s} s | ${TEST_MARK:-all}: ${summary:-no summary, see $venv/pytest.log} |" \
  >>"$VENVS/torch-results.md"
log "test-torch $TORCH: $summary (build ${build_s}s, tests ${test_s}s)"
exit "$status"
