# Two commands on a fresh machine, each doing its own set-up:
#   make run    build a venv, install, run the main job (tiny UNet, patched, short DDIM loop)
#   make test   build a venv, install with test extras, run the test suite
#   make docs   build the documentation site (MkDocs, strict) into site/
# TORCH_SPEC is the torch requirement pip installs, from your configured package index (on a plain
# Linux machine, torch==2.13.0 from PyPI is a CUDA build); e.g. TORCH_SPEC="torch" for the newest.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q -n 2 --dist loadfile --no-loadscope-reorder  # two workers; each file on one, longest first (conftest)

STAMP := $(VENV)/.bypass_kernels_installed
DEV_STAMP := $(VENV)/.bypass_kernels_dev_installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.txt csrc/*/*.cpp csrc/*/*.cu)

.PHONY: run test install lint docs

install: $(DEV_STAMP)

# --no-compile: pip would byte-compile every file of every package (a minute or more here for torch and
# the dev extras); Python compiles the modules a program imports when it first imports them, a fraction
# of them for `make run`. (For `make test` it is even: the suite's first imports compile what it uses.)
# Each long step says what it does first; pip runs without -q so its progress shows. numpy arrives with
# torch, before the extension builds (torch's import at build time warns without it). `run` needs the
# package alone; the dev extras (tests, lint, docs, optional backends) come with `test` and `install`.
# The last line of each says which kernels were built, and why one is missing (bypass-kernels info).
$(STAMP): $(SOURCES)
	@echo "==> [1/4] Python virtual environment in $(VENV)"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] pip, setuptools, wheel and ninja"
	$(VENV)/bin/python -m pip install --upgrade pip "setuptools>=77" wheel ninja
	@echo "==> [3/4] $(TORCH_SPEC) and numpy (torch is a large package: minutes on a first install)"
	$(VENV)/bin/python -m pip install --no-compile "$(TORCH_SPEC)" numpy
	@echo "==> [4/4] bypass_kernels, building its C++ extension (a few minutes the first time)"
	$(VENV)/bin/python -m pip install --no-compile --no-build-isolation -e .
	@touch $(STAMP)
	@echo "==> installed into $(VENV); the kernels:"
	@$(VENV)/bin/bypass-kernels info

# The dev extras as requirements (pyproject.toml's [project.optional-dependencies] dev): installing
# ".[dev]" would build the extension a second time
$(DEV_STAMP): $(STAMP) pyproject.toml
	@echo "==> the dev extras: tests, lint, documentation and the optional backends (onnx, triton...)"
	$(VENV)/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev'], sep='\n')" > $(VENV)/dev-requirements.txt
	$(VENV)/bin/python -m pip install --no-compile -r $(VENV)/dev-requirements.txt
	@touch $(DEV_STAMP)

run: $(STAMP)
	@echo "==> bypass-kernels run: a tiny UNet, patched, a 20-step DDIM loop (bypass-kernels --help for more)"
	$(VENV)/bin/bypass-kernels run

test: $(DEV_STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site
