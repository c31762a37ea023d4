#!/usr/bin/env bash
# make gpu-build: the CUDA extension (CPU + CUDA kernels) built as the GPU machines build it,
# torch $GPU_TORCH (default 2.11.0, a CUDA 13.0 build from the registry) with the local CUDA
# toolkit for TORCH_CUDA_ARCH_LIST (default 9.0), then linked and imported here without a GPU:
# every op must have a CUDA kernel registered, and the CPU kernels must work as before (the
# smoke test, then the fused-op tests). The headers the toolkit lacks (cuBLAS, cuSPARSE) come
# from the nvidia-* packages torch installs (setup.py finds them).
source "$(dirname "$0")/common.sh"
GPU_TORCH="${GPU_TORCH:-2.11.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
venv="$VENVS/gpu-build-$GPU_TORCH"
src="$venv/src"

# The venv is kept while its torch is the one asked for (unpacking a CUDA torch takes minutes);
# the build is always from a fresh copy of the tree.
if [ "$(cat "$venv/.torch" 2>/dev/null)" != "$GPU_TORCH" ]; then
  log "gpu-build: venv $venv with torch $GPU_TORCH"
  fresh_venv "$venv"
  install_torch "$venv" "torch==$GPU_TORCH" "setuptools>=77" ninja numpy pytest hypothesis
  echo "$GPU_TORCH" >"$venv/.torch"
fi
"$venv/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__' 2>/dev/null \
  || { echo "gpu-build: torch $GPU_TORCH in $venv is not a CUDA build" >&2; exit 1; }

copy_tree "$src"
start=$SECONDS
log "gpu-build: building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! (cd "$src" && nice -n 10 "$venv/bin/python" -m pip install -v --no-build-isolation --no-deps -e . \
      >"$venv/build.log" 2>&1); then
  grep -E -B2 -A8 'error' "$venv/build.log" | head -60 >&2
  log "gpu-build: the build FAILED ($venv/build.log)"
  exit 1
fi
grep -q "building the CPU and CUDA kernels" "$venv/build.log" \
  || { echo "gpu-build: setup.py did not build the CUDA kernels:" >&2; grep 'batchrenorm_cuda setup' "$venv/build.log" >&2; exit 1; }
so="$(ls "$src"/batchrenorm_cuda/_C*.so)"
log "gpu-build: built in $((SECONDS - start))s: $so ($(du -h "$so" | cut -f1))"
# Device code is in it (the toolkit here has no cuobjdump to list the architectures).
fatbin="$(readelf -S -W "$so" | awk '{for (i = 1; i < NF; i++) if ($i == ".nv_fatbin") print $(i + 4)}')"
[ -n "$fatbin" ] && [ "$((16#$fatbin))" -gt 0 ] \
  || { echo "gpu-build: $so has no .nv_fatbin section: no CUDA device code" >&2; exit 1; }
gencode="$(grep -o 'code=sm_[0-9a-z]*' "$venv/build.log" | sort -u | tr '\n' ' ')"
log "gpu-build: .nv_fatbin holds $((16#$fatbin / 1024)) KiB of device code (nvcc: $gencode)"
smoke "$venv" --cuda-registered
(cd "$src" && nice -n 10 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
   -m "not cuda_emulation" tests/test_fused_ops.py tests/test_op_boundary.py 2>&1 | tail -3)
