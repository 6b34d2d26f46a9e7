# lightning-ctx: `make install`, `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so pip takes the local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[dev]'

test: $(PY)
	@$(PY) -c "import lightning_ctx, pytest" 2>/dev/null || $(MAKE) install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(PY)
	@$(PY) -c "import lightning_ctx" 2>/dev/null || $(MAKE) install
	$(PY) -m lightning_ctx.demo

bench: $(PY)
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf mlruns demo_runs .pytest_cache
