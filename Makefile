# Two commands on a fresh machine, each doing its own set-up:
#   make run    build a venv, install, run the main job (tiny UNet, patched, short DDIM loop)
#   make test   build a venv, install with test extras, run the test suite
# TORCH_SPEC picks how torch arrives: the default is the CPU build this workplace keeps on disk;
# on a GPU machine use e.g. TORCH_SPEC="torch" (a CUDA build from PyPI) or an already-installed torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q -n 2 --dist loadfile  # two workers; each test file stays on one (shared compiled models)

STAMP := $(VENV)/.bypass_kernels_installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.txt csrc/*/*.cpp csrc/*/*.cu)

.PHONY: run test install lint

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/bypass-kernels run

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
