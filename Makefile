# `make demo` and `make test` work on a fresh clone: they create .venv, install fastdiff with its
# C++ extension and the test dependencies, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdiff-installed
EXT_STAMP := build/.ext-built
# The torch wheel pip picks when none is installed yet (a CPU build where one is on disk). Later
# installs pin torch to the installed version, so no dependency (torchvision, via k-diffusion) can
# swap it for another build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIN = torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')

.PHONY: demo test install ext bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
	touch $(STAMP)

# The C++ extension, rebuilt in place whenever csrc/ changes (serialised, so parallel rebuilds do
# not collide).
$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/torch/*.cpp)
	flock /tmp/fastdiff-build.lock $(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $(EXT_STAMP)

install: $(EXT_STAMP)

ext: $(EXT_STAMP)

demo: $(EXT_STAMP)
	$(PY) -m fastdiff demo

test: $(EXT_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(EXT_STAMP)
	$(PY) bench/quality.py

clean:
	rm -rf build $(VENV) fastdiff/_C*.so fastdiff/_ops*.so
