# Set-up and entry points. Each target creates .venv and installs .[dev] when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c 'from jquant.kernels.native import build_at_install; build_at_install()'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m interop.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check jquant interop tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/int8_inference.py
	$(PY) benchmarks/qat_step.py
	$(PY) benchmarks/peers.py
	$(PY) benchmarks/transform_overhead.py
	$(PY) benchmarks/native_kernels.py
	$(PY) benchmarks/llm_decode.py

clean:
	rm -rf $(VENV) build *.egg-info jquant/kernels/csrc/build
