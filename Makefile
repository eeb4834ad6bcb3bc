# fedssd: the few commands a person types. Each target sets up what it needs by itself.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; GPU users can install their own build first: make TORCH=torch ...
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv data demo smoke test test-fast walkthrough lint bench bench-quick clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install fedssd with its dev tools

data: $(STAMP)  ## make Fashion-MNIST available (Debian package, else download with checksums)
	@$(PY) -m fedssd.cli data fashion_mnist || { \
	  echo "Installing Debian's dataset-fashion-mnist package..."; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null); \
	  $(PY) -m fedssd.cli data fashion_mnist --download; }

demo: data  ## train SSD and FedAlignUniform on Fashion-MNIST and compare them (<10 min on 2 CPU cores)
	$(PY) -m fedssd.cli compare --config demo --methods ssd fedalignuniform --out runs/demo --overwrite

smoke: $(STAMP)  ## a run that takes seconds
	$(PY) -m fedssd.cli train --config smoke --out runs/smoke --overwrite

# pytest-xdist workers for make test: one more than the 2 cores of the machines it is sized for,
# as each Flower deployment, run alone, leaves about a third of the cores idle while it waits on
# Flower's polls. Each test file runs in one worker (its module-scoped fixtures built once), in
# the order tests/conftest.py gives.
TEST_WORKERS ?= 3

test: data  ## run the whole test suite
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: data  ## the suite without the tests marked slow (under 2 minutes on 2 CPU cores)
	$(PY) -m pytest -q -m "not slow"

walkthrough: data  ## run docs/deployment.md's commands as written, its install included, in runs/walkthrough (minutes)
	rm -rf runs/walkthrough
	$(PYTHON) tests/deployment_walkthrough.py runs/walkthrough --install

lint: $(STAMP)  ## ruff and mypy
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m mypy

bench: $(STAMP)  ## measure training efficiency, round overhead, DataLoader speed-up, GPU, a busy machine, scaling to 10,000 clients (minutes)
	$(PY) -m benchmarks.bench
	$(PY) -m benchmarks.scaling

bench-quick: $(STAMP)  ## the same benchmark at reduced sizes, without the 10,000 clients (under 2 minutes on 2 CPU cores)
	$(PY) -m benchmarks.bench --quick

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) runs
