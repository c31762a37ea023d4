# make test   set up .venv, build the extension, run the whole suite (the emulated CUDA
#             kernels included, and their AddressSanitizer run)
# make test-cuda-emulation   build the emulated CUDA kernels and run only their tests
# make bench  set up .venv, build, run the benchmark on the default device (CUDA if present),
#             then the module-level one (CPU: BatchRenormNd vs nn.BatchNormNd, 1 and 2 threads)
# make fuzz   the reliability campaign (README, "Reliability"): 5,000 differential cases on every
#             backend, 600 SyncBatchRenorm cases over gloo world sizes 1-4, 12,000 adversarial op calls (and 1,000 on the emulated CUDA ops), the op
#             calls again under an AddressSanitizer + UBSan build of the CPU extension, and a
#             training step on a float16 input of more than 2^31 elements (needs ~9 GB)
#
# The venv sees the system's site-packages, so a torch that is already installed (a CUDA
# build, say) is reused; only when none imports is $(TORCH_SPEC) installed.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
BENCH_ARGS ?=
# pytest-xdist workers for make test: one per core (the AddressSanitizer run alone takes a few
# minutes, and the rest goes on beside it).
TEST_WORKERS ?= auto
SOURCES    := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: test test-cuda-emulation bench accuracy fuzz build venv clean system-deps

# Boost.Fiber runs the emulated CUDA threads (tests/cuda_emulation.py); installed when missing.
system-deps:
	@test -f /usr/include/boost/fiber/all.hpp || { \
	  (apt-get update -qq && apt-get install -y -qq libboost-fiber-dev) >/dev/null || \
	  { echo "make: needs Boost.Fiber (Debian: apt-get install libboost-fiber-dev)" >&2; exit 1; }; }

venv: $(VENV)/.ready
$(VENV)/.ready:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja pybind11 pytest pytest-xdist hypothesis matplotlib tqdm numpy scikit-learn onnx
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.ready $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: build system-deps
	BRN_REQUIRE_CUDA_EMULATION=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-cuda-emulation: build system-deps
	BRN_REQUIRE_CUDA_EMULATION=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m cuda_emulation tests

fuzz: build system-deps
	$(PY) tests/fuzz_campaign.py --cases 5000 --jobs 2
	$(PY) tests/fuzz_sync.py --cases 600
	$(PY) tests/fuzz_ops.py --calls 12000
	$(PY) tests/fuzz_ops.py --calls 1000 --namespace batchrenorm_emulated_cuda
	$(PY) tests/fuzz_ops.py --asan --calls 12000
	$(PY) tests/fuzz_big.py

bench: build
	$(PY) benchmarks/bench_batchrenorm.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_modules.py $(BENCH_MODULES_ARGS)

accuracy: build
	$(PY) benchmarks/accuracy.py $(ACCURACY_ARGS)

clean:
	rm -rf build *.egg-info batchrenorm_cuda/_C*.so $(VENV)
