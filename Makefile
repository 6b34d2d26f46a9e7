# lightning-ctx: `make demo`, `make test` (both install into .venv on first use), `make install`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so pip takes the local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The tested versions of every package `make install` resolves (`make lock` regenerates it).
# `make install LOCK=` installs without it: the newest versions pyproject.toml allows.
LOCK ?= requirements/lock.txt
PYTEST_ARGS ?=
# "Installed?" is this stamp, never `import lightning_ctx` (that succeeds from the repo root with nothing
# installed). It is older than pyproject.toml, this Makefile (its pins) or the lock -> install again.
STAMP := $(VENV)/.installed
LOCK_ARGS = $(if $(LOCK),-c $(LOCK))

# The lower-bounds environment: torch as above, every other direct dependency at the minimum pyproject.toml
# declares (scripts/min_constraints.py turns each `>=X` into `==X`; the lock is not used).
VENV_MIN ?= .venv-min
PY_MIN := $(VENV_MIN)/bin/python
MIN_TESTS ?= tests/test_install.py tests/test_compare.py tests/tasks/world tests/test_cli.py \
	tests/eval/test_metrics.py tests/test_objectives.py tests/test_scale.py tests/data/test_records.py
MIN_RUN_DIR ?= $(VENV_MIN)/fit

.PHONY: install test demo bench lock test-min clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

define install_into
	$(1) -m pip install $(2) "$(TORCH_SPEC)"
	$(1) -m pip install $(2) -e '.[dev]'
endef

# Always installs (e.g. `make install LOCK=` after a locked install); `demo`/`test`/`bench` only when stale.
install: | $(PY)
	$(call install_into,$(PY),$(LOCK_ARGS))
	touch $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK) | $(PY)
	$(call install_into,$(PY),$(LOCK_ARGS))
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m lightning_ctx.demo

# The game family on the built-in game base: OPD and anchored OPD on TextArena FrozenLake (README "The built-in game world").
.PHONY: demo-games
demo-games: $(STAMP)
	$(PY) -m lightning_ctx.demo_games

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

# Resolve pyproject.toml afresh (no lock) in a scratch venv and write what it installed to the lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --upgrade pip
	$(call install_into,.venv-lock/bin/python,)
	@mkdir -p $(dir $(LOCK))
	{ echo "# Tested versions: what \`make install\` resolved from pyproject.toml on $$(date -u +%F)"; \
	  echo "# ($$(.venv-lock/bin/python -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())')). Regenerate: make lock"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -e '^#' -e '^-e' -e '^lightning-ctx==' \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK) ($$(grep -vc '^#' $(LOCK)) packages)"

$(VENV_MIN)/.installed: pyproject.toml Makefile scripts/min_constraints.py
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install --upgrade pip
	$(PY_MIN) scripts/min_constraints.py --extras dev --skip torch > $(VENV_MIN)/min-constraints.txt
	$(call install_into,$(PY_MIN),-c $(VENV_MIN)/min-constraints.txt)
	$(PY_MIN) -m pip check
	touch $@

# The declared lower bounds, tested: a core test subset and a 2-step fit of the built-in world via the CLI.
test-min: $(VENV_MIN)/.installed
	$(PY_MIN) -m pip freeze | grep -i -E '^(torch|lightning|transformers|tokenizers|safetensors|mlflow|torchmetrics|jsonargparse|matplotlib|peft|bitsandbytes)=='
	$(PY_MIN) -m pytest $(PYTEST_ARGS) $(MIN_TESTS)
	rm -rf $(MIN_RUN_DIR) && mkdir -p $(MIN_RUN_DIR)
	cd $(MIN_RUN_DIR) && MLFLOW_TRACKING_URI=sqlite:///$(abspath $(MIN_RUN_DIR))/mlflow.db \
	  $(abspath $(VENV_MIN))/bin/lightning-ctx fit --config $(CURDIR)/experiments/world_opd.yaml \
	  --trainer.max_steps 2 --data.init_args.batch_size 8 --data.init_args.n_val 20 \
	  --data.init_args.retention_contexts 2 --data.init_args.retention_items 5 \
	  --trainer.enable_progress_bar false --trainer.enable_model_summary false
	cd $(MIN_RUN_DIR) && $(abspath $(VENV_MIN))/bin/lightning-ctx compare --experiment world \
	  --tracking-uri sqlite:///$(abspath $(MIN_RUN_DIR))/mlflow.db --out-dir compare

clean:
	rm -rf mlruns demo_runs .pytest_cache .venv-lock
