# lightning-ctx: `make demo` (installs the runtime into .venv on first use), `make test` (installs everything),
# `make install`, `make install-min`.
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
# The runtime-only install (`make install-min`: what `lightning-ctx fit/compare/export` and `make demo` need, no
# dev/games extras) has its own stamp; a full install that is fresh serves it too.
STAMP_RUNTIME := $(VENV)/.installed-runtime
# The runtime plus the games extra (TextArena): what `make demo-games` needs; a full install that is fresh serves it.
STAMP_GAMES := $(VENV)/.installed-games

# uv resolves (never installs torch): the lock, the minimums and the co-install check. It sees the wheel pip
# installs torch from (pip's find-links, e.g. a local CPU build) and is pinned to the exact torch installed, so
# nothing it writes asks for a CUDA build.
UV := $(VENV)/bin/uv
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_FIND_LINKS = $(foreach d,$(FIND_LINKS),--find-links $(d))
installed_torch = $$($(1) -c 'from importlib.metadata import version; print(version("torch"))')

# The lower-bounds environment: torch as above, every other direct dependency at the minimum pyproject.toml
# declares (uv's lowest-direct resolution, checked by scripts/min_constraints.py; the lock is not used).
VENV_MIN ?= .venv-min
PY_MIN := $(VENV_MIN)/bin/python
MIN_TESTS ?= tests/test_install.py tests/test_compare.py tests/tasks/world tests/test_cli.py \
	tests/eval/test_metrics.py tests/test_objectives.py tests/test_scale.py tests/data/test_records.py tests/test_resume.py
# The compatibility environment: the lock, but transformers at the newest release vLLM allows (vllm 0.33.0:
# <5.21; `make coinstall` prints what each stack resolves to), with the transformers-facing core of the tests.
VENV_COMPAT ?= .venv-compat
PY_COMPAT := $(VENV_COMPAT)/bin/python
COMPAT_TRANSFORMERS ?= 5.20.2
COMPAT_TESTS ?= tests/tasks/world/test_tokenizer_asset.py tests/tasks/world/test_model.py tests/test_scale.py \
	tests/test_rollout.py tests/test_objectives.py
# GPU stacks we must install beside (scripts/coinstall.py): resolution only, no download.
COINSTALL ?= vllm==0.33.0 sglang==0.5.23 trl[vllm]

.PHONY: install install-min test demo demo-games bench lock test-min test-compat coinstall clean

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

# Runtime only: torch as above, then `pip install -e .` with the lock (no jupyter, pytest, ruff, peft,
# bitsandbytes or TextArena); `make test` adds the rest later.
define install_runtime
	$(1) -m pip install $(2) "$(TORCH_SPEC)"
	$(1) -m pip install $(2) -e .$(3)
endef

install-min: | $(PY)
	$(call install_runtime,$(PY),$(LOCK_ARGS))
	touch $(STAMP_RUNTIME)

# "yes" when the full install's stamp exists and is newer than everything it depends on
full_install_current = $(shell [ -f $(STAMP) ] && [ -z "$$(find pyproject.toml Makefile $(LOCK) -newer $(STAMP))" ] \
	&& echo yes)

$(STAMP_RUNTIME): pyproject.toml Makefile $(LOCK) | $(PY)
	$(if $(full_install_current),@echo "the full install in $(VENV) is current",$(call install_runtime,$(PY),$(LOCK_ARGS)))
	touch $@

$(STAMP_GAMES): pyproject.toml Makefile $(LOCK) | $(PY)
	$(if $(full_install_current),@echo "the full install in $(VENV) is current",$(call install_runtime,$(PY),$(LOCK_ARGS),'[games]'))
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP_RUNTIME)
	$(PY) -m lightning_ctx.demo

# The game family on the built-in game base: OPD and anchored OPD on TextArena FrozenLake (docs/results.md).
demo-games: $(STAMP_GAMES)
	$(PY) -m lightning_ctx.demo_games

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

# uv and packaging for the resolver scripts (the dev extra has both; this also serves `make lock` before any install).
$(UV): | $(PY)
	$(PY) -m pip install $(LOCK_ARGS) uv packaging

# Resolve pyproject.toml afresh (newest versions, extra dev) with uv, torch pinned to what TORCH_SPEC installs.
lock: | $(UV)
	$(PY) -m pip install "$(TORCH_SPEC)"
	echo "torch==$(call installed_torch,$(PY))" > $(VENV)/torch-pin.txt
	@mkdir -p $(dir $(LOCK))
	{ echo "# Tested versions: uv pip compile of pyproject.toml (extra dev) on $$(date -u +%F), for"; \
	  echo "# $$($(PY) -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())'); torch as TORCH_SPEC installs it, without its local label. Regenerate: make lock"; \
	  $(UV) pip compile pyproject.toml --extra dev --python $(PY) -c $(VENV)/torch-pin.txt $(UV_FIND_LINKS) \
	    --no-header --no-annotate --quiet | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@echo "wrote $(LOCK) ($$(grep -vc '^#' $(LOCK)) packages)"

# A scratch venv: torch by pip as TORCH_SPEC says, then the project by uv under the constraints $(2) writes.
define scratch_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install "$(TORCH_SPEC)"
	$(2)
	$(UV) pip install --python $(1)/bin/python -c $(1)/constraints.txt -e '.[dev]'
	$(1)/bin/python -m pip check
	touch $(1)/.installed
endef

# $(1): a scratch venv; $(2): tests. The tests, then a 2-step fit of the built-in world via the CLI and `compare`.
define venv_checks
	$(1)/bin/python -m pip freeze | grep -i -E '^(torch|lightning|transformers|tokenizers|safetensors|mlflow|sqlalchemy|torchmetrics|jsonargparse|matplotlib|peft|bitsandbytes)=='
	$(1)/bin/python -m pytest $(PYTEST_ARGS) $(2)
	rm -rf $(1)/fit && mkdir -p $(1)/fit
	cd $(1)/fit && MLFLOW_TRACKING_URI=sqlite:///$(abspath $(1))/fit/mlflow.db \
	  $(abspath $(1))/bin/lightning-ctx fit --config $(CURDIR)/experiments/world_opd.yaml \
	  --trainer.max_steps 2 --data.batch_size 8 --data.task.n_val 20 \
	  --data.task.eval_other_contexts 2 --data.task.eval_other_items 5 \
	  --trainer.enable_progress_bar false --trainer.enable_model_summary false
	cd $(1)/fit && $(abspath $(1))/bin/lightning-ctx compare --experiment world \
	  --tracking-uri sqlite:///$(abspath $(1))/fit/mlflow.db --out-dir compare
endef

$(VENV_MIN)/.installed: pyproject.toml Makefile scripts/min_constraints.py | $(UV)
	$(call scratch_venv,$(VENV_MIN),$(PY) scripts/min_constraints.py --uv $(UV) --python $(PY_MIN) --extras dev \
	  --torch "$(call installed_torch,$(PY_MIN))" $(UV_FIND_LINKS) > $(VENV_MIN)/constraints.txt)

# The declared lower bounds, tested: MIN_TESTS, the 2-step world fit and compare.
test-min: $(VENV_MIN)/.installed
	$(call venv_checks,$(VENV_MIN),$(MIN_TESTS))

$(VENV_COMPAT)/.installed: pyproject.toml Makefile $(LOCK) | $(UV)
	$(call scratch_venv,$(VENV_COMPAT),{ grep -v -i '^transformers==' $(LOCK); \
	  echo "transformers==$(COMPAT_TRANSFORMERS)"; } > $(VENV_COMPAT)/constraints.txt)

# The lock with transformers at vLLM's newest allowed release: COMPAT_TESTS, the 2-step world fit and compare.
test-compat: $(VENV_COMPAT)/.installed
	$(call venv_checks,$(VENV_COMPAT),$(COMPAT_TESTS))

# Does `pip install -e . <stack>` still resolve, without moving the stack? (scripts/coinstall.py)
coinstall: | $(UV)
	$(PY) scripts/coinstall.py --uv $(UV) --python $(PY) $(foreach s,$(COINSTALL),'$(s)')

clean:
	rm -rf mlruns demo_runs .pytest_cache
