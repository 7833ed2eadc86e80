# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv, install torch (a CPU build unless you pass TORCH_SPEC/TORCH_PIP_ARGS) and
# alignkit with its test extra, then run.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch: the +cpu local version never resolves to a CUDA wheel. Where pip has no
# CPU wheel at hand, add the PyTorch CPU index:
#   make test TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

STAMP := $(VENV)/.alignkit-installed
# `make demo` also installs the plot extra (matplotlib, for curves.png). DEMO_ARGS: e.g. "--seed 1".
PLOT_STAMP := $(VENV)/.alignkit-plot-installed
DEMO_ARGS ?=

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/core/*.cpp csrc/core/*.h)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(VENV)/bin/pip install --quiet -e ".[test,lint]"
	touch $@

$(PLOT_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[plot]"
	touch $@

demo: $(PLOT_STAMP)
	$(VENV)/bin/alignkit info
	$(VENV)/bin/alignkit demo $(DEMO_ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/run.py --device cpu

lint: setup
	$(VENV)/bin/ruff check alignkit kernels tests bench
	$(VENV)/bin/ruff format --check alignkit kernels tests bench

clean:
	rm -rf $(VENV) build
