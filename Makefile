# make test   set up .venv, build the extension, run the whole suite (the emulated CUDA
#             kernels included, and their AddressSanitizer run; the RL libraries too, for the
#             peers' check and the CrossQ smoke run)
# make lint   ruff over the Python sources (pyproject.toml), also run by make test
# make test-cuda-emulation   build the emulated CUDA kernels and run only their tests
# make bench  set up .venv, build, run the benchmark on the default device (CUDA if present),
#             then the module-level one (CPU: BatchRenormNd vs nn.BatchNormNd, 1 and 2 threads,
#             with sb3-contrib's and torchrl's BatchRenorm1d at the RL shapes), then gpu-model
# make accuracy   BatchNorm vs Batch Renorm (the modules' defaults) and the candidate defaults
#             on small and non-i.i.d. batches, 5 seeds (benchmarks/results/accuracy.*; about
#             10 minutes of CPU per core on 2 cores)
# make rl     CrossQ (sb3-contrib) on Pendulum-v1 and HalfCheetah-v5 with its own BatchRenorm
#             and with ours swapped in: returns and time per gradient step
#             (benchmarks/results/crossq.*; about 30 minutes on 2 cores)
# make gpu-model  the CUDA kernels' work counted on the emulated H100 and priced with public
#             H100 figures against ATen's native kernels: modelled, not measured
#             (benchmarks/results/gpu_model_h100.*; 5-10 minutes on 2 cores)
# make fuzz   the reliability campaign (README, "Reliability"): 5,000 differential cases on every
#             backend, 600 SyncBatchRenorm cases over gloo world sizes 1-4, 12,000 adversarial
#             op calls (and 1,000 on the emulated CUDA ops), the op calls again under an AddressSanitizer + UBSan build of the CPU extension, and a
#             training step on a float16 input of more than 2^31 elements (needs ~9 GB)
# make test-install   the ways users install (pip install ., --no-build-isolation with two torch
#             releases, with no CUDA toolkit, python -m build and its wheel, a wheel run with
#             another torch), each in a fresh venv under $(VENVS), each ending with a smoke test
#             of the fused CPU kernels against the reference (tests/install/test_install.sh)
# make test-torch TORCH=2.X   build against torch 2.X from the registry in its own venv, then
#             the smoke test and the suite (less the emulated CUDA kernels unless TEST_MARK=)
# make gpu-build   the CUDA extension for TORCH_CUDA_ARCH_LIST=9.0 against torch 2.11.0+cu130
#             (the GPU machines' build), linked and imported here: every op has a CUDA kernel
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
# The install tests' venvs and tree copies (several GB each: CUDA builds of torch). Downloaded
# torch wheels are kept in $(HOME)/.cache/batchrenorm_cuda/wheels (WHEELHOUSE=... to move it).
VENVS      ?= .venvs

.PHONY: test test-cuda-emulation bench gpu-model accuracy rl fuzz build venv clean system-deps \
        rl-deps test-install test-torch gpu-build lint

# Boost.Fiber runs the emulated CUDA threads (tests/cuda_emulation.py); installed when missing.
system-deps:
	@test -f /usr/include/boost/fiber/all.hpp || { \
	  (apt-get update -qq && apt-get install -y -qq libboost-fiber-dev) >/dev/null || \
	  { echo "make: needs Boost.Fiber (Debian: apt-get install libboost-fiber-dev)" >&2; exit 1; }; }

# The stamp's name changes with what the venv must hold, so an older .venv is brought up to date
# (setuptools>=77: setup.py stops on an older one).
READY      := $(VENV)/.ready-setuptools77
venv: $(READY)
$(READY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=77" ninja pybind11 pytest pytest-xdist hypothesis matplotlib tqdm numpy scikit-learn onnx
	touch $@

# What our RL users run, for make rl and for the peers in bench_modules.py: sb3-contrib's and
# torchrl's own BatchRenorm1d, gymnasium with the headless MuJoCo wheel. Pinned, so the peers
# measured are the ones named in the results; torch itself is never replaced.
RL_SPEC    ?= sb3-contrib==2.9.2 stable-baselines3==2.9.2 gymnasium[mujoco]==1.4.0 torchrl==0.14.1
RL_READY   := $(VENV)/.ready-rl
rl-deps: $(RL_READY)
$(RL_READY): $(READY)
	$(PY) -m pip install -q $(RL_SPEC)
	$(PY) -c "import torch, sb3_contrib, torchrl, gymnasium, mujoco; print('rl deps: torch', torch.__version__)"
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(READY) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: build system-deps rl-deps lint
	BRN_REQUIRE_CUDA_EMULATION=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests

# ruff (pyproject.toml's [tool.ruff]) over the Python sources; make test runs it first.
lint: $(READY)
	$(PY) -m pip install -q "ruff>=0.6"
	$(PY) -m ruff check .

test-cuda-emulation: build system-deps
	BRN_REQUIRE_CUDA_EMULATION=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m cuda_emulation tests

fuzz: build system-deps
	$(PY) tests/fuzz_campaign.py --cases 5000 --jobs 2
	$(PY) tests/fuzz_sync.py --cases 600
	$(PY) tests/fuzz_ops.py --calls 12000
	$(PY) tests/fuzz_ops.py --calls 1000 --namespace batchrenorm_emulated_cuda
	$(PY) tests/fuzz_ops.py --asan --calls 12000
	$(PY) tests/fuzz_big.py

bench: build system-deps rl-deps
	$(PY) benchmarks/bench_batchrenorm.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_modules.py $(BENCH_MODULES_ARGS)
	$(MAKE) gpu-model

gpu-model: build system-deps
	$(PY) benchmarks/gpu_model.py $(GPU_MODEL_ARGS)

accuracy: build
	$(PY) benchmarks/accuracy.py $(ACCURACY_ARGS)

rl: build rl-deps
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(PY) benchmarks/crossq_sb3.py $(RL_ARGS)

test-install:
	VENVS=$(VENVS) PYTHON=$(PYTHON) bash tests/install/test_install.sh

test-torch:
	@test -n "$(TORCH)" || { echo "make: test-torch needs TORCH=2.X (a torch release)" >&2; exit 2; }
	VENVS=$(VENVS) PYTHON=$(PYTHON) TORCH=$(TORCH) bash tests/install/test_torch.sh

gpu-build:
	VENVS=$(VENVS) PYTHON=$(PYTHON) bash tests/install/gpu_build.sh

clean:
	rm -rf build *.egg-info batchrenorm_cuda/_C*.so batchrenorm_cuda/_build_info.py $(VENV) $(VENVS)
