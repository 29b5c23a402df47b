# `make demo` and `make test` work on a fresh clone: they create .venv, install fastdiff with its C++ extension
# and what the job needs (the demo: the `demo` extra; the tests: the `dev` extra, every peer), then run.
# Every install is pinned by requirements/lock.txt (`make lock` refreshes it on purpose; `make test-latest` tries
# the newest releases in .venv-latest without touching the lock).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
# The torch the lock is resolved with: a CPU build where one is on disk (see docs/installation.md).
TORCH_SPEC ?= torch==2.13.0
KDIFF_SPEC ?= k-diffusion
# The build tools come from the lock too, and the package builds against the environment's own torch.
PIP_LOCKED := $(PY) -m pip install -q -c $(LOCK)
PIP_INSTALL := $(PY) -m pip install -q
# The editable installs compile nothing; the extensions are built in place once ($(EXT_STAMP)).
EDITABLE := FASTDIFF_SKIP_EXTENSIONS=1
BASE_STAMP := $(VENV)/.base-installed
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed
EXT_STAMP := build/.ext-built-$(notdir $(VENV))
# .venv-latest (make test-latest) takes the newest release of everything but torch; the tests then skip the lock check.
LATEST := $(filter .venv-latest,$(VENV))
PIN := $(if $(LATEST),$(PIP_INSTALL) "$(TORCH_SPEC)",$(PIP_LOCKED))

.PHONY: demo test gpu-test gpu-check test-latest lint install ext bench lock clean

$(BASE_STAMP): $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIN) torch setuptools wheel pybind11 ninja numpy
	touch $@

$(DEMO_STAMP): $(BASE_STAMP) pyproject.toml setup.py
	$(EDITABLE) $(PIN) --no-build-isolation -e ".[demo]"
	touch $@

# k-diffusion (a test peer) without its declared dependencies: see pyproject.toml's dev extra.
$(TEST_STAMP): $(DEMO_STAMP)
	$(EDITABLE) $(PIN) --no-build-isolation -e ".[dev]"
	$(PIN) --no-deps "$(KDIFF_SPEC)"
	touch $@

# The C++ extensions, rebuilt in place whenever csrc/ changes (serialised, so parallel rebuilds do not collide).
$(EXT_STAMP): $(DEMO_STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/torch/*.cpp)
	flock /tmp/fastdiff-build.lock $(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

install: $(TEST_STAMP) $(EXT_STAMP)

ext: $(EXT_STAMP)

demo: $(EXT_STAMP)
	$(PY) -m fastdiff demo

# The installed package is tested: the pytest script (not `python -m pytest`) and importlib mode put no repository
# folder on sys.path.
test: $(TEST_STAMP) $(EXT_STAMP) lint
	TRITON_INTERPRET=1 FASTDIFF_UNLOCKED=$(if $(LATEST),1,0) $(VENV)/bin/pytest -q tests

# The CUDA tests (marked `cuda`) on a machine with a GPU, with the Triton kernels compiled: under `make test`'s
# TRITON_INTERPRET=1 Triton runs them on the host (it copies CUDA arguments there), so they skip there, saying so.
# TRITON_INTERPRET=0 rather than unset: test modules that default it to 1 for their CPU kernels leave it alone.
gpu-test: $(TEST_STAMP) $(EXT_STAMP)
	TRITON_INTERPRET=0 FASTDIFF_UNLOCKED=$(if $(LATEST),1,0) $(VENV)/bin/pytest -q -m cuda tests

# Everything a lent GPU should measure, in at most 8 minutes (docs/benchmarks.md#the-gpu-check): the CUDA tests, the
# step, bandwidth, end-to-end (digits, SD-shaped UNet) and serving benchmarks, into bench/results/gpu-<device>.json.
# `make gpu-check GPU_CHECK_ARGS=--dry-run` checks the plan on a machine without CUDA and writes the JSON skeleton.
gpu-check: $(TEST_STAMP) $(EXT_STAMP)
	$(PY) -m fastdiff.bench gpu-check --json 'bench/results/gpu-{device}.json' $(GPU_CHECK_ARGS)

# ruff: lint (pycodestyle, pyflakes, import order, pyupgrade, bugbear) and format, as pyproject.toml sets them.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite against the newest release of every dependency, in its own environment.
test-latest:
	$(MAKE) VENV=.venv-latest test

lock:
	$(PYTHON) tools/lock.py "$(TORCH_SPEC)" "$(KDIFF_SPEC)"

bench: $(TEST_STAMP) $(EXT_STAMP)
	$(PY) bench/quality.py

clean:
	rm -rf build $(VENV) .venv-latest fastdiff/_C*.so fastdiff/_ops*.so
