# `make demo` and `make test` work on a fresh clone: they create .venv, install fastdiff with its
# C++ extension and the test dependencies, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdiff-installed
# The torch wheel pip picks when none is installed yet (a CPU build where one is on disk).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install ext bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Rebuild only the C++ extension in place (serialised, so parallel rebuilds do not collide).
ext: $(STAMP)
	flock /tmp/fastdiff-build.lock $(PY) setup.py -q build_ext --inplace

demo: $(STAMP)
	$(PY) -m fastdiff demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/quality.py

clean:
	rm -rf build $(VENV) fastdiff/_C*.so
