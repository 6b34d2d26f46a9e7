#!/usr/bin/env python
"""Generate ``docs/config_reference.md`` from ``lightning-ctx fit --print_config`` and the classes' docstrings.

    python scripts/gen_config_reference.py            # (re)write docs/config_reference.md
    python scripts/gen_config_reference.py --check    # exit 1 if the file is out of date

Defaults come from ``--print_config`` (what a run really uses), descriptions from the ``Args:`` section
of each class docstring. ``tests/test_docs.py`` fails when the file is stale or misses a knob.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "docs" / "config_reference.md"

DATA_MODULE = "lightning_ctx.data.datamodule.TaskDataModule"
TASKS = (
    ("lightning_ctx.data.task.JSONLTask", "JSONL files with `{id, context, prompt, answer}` records (the default)"),
    ("lightning_ctx.tasks.world.WorldTask", "the built-in rule world, records generated from seeds"),
    ("lightning_ctx.tasks.mcqa.MCQATask", "raw MedMCQA-style multiple-choice files, the context = a system prompt"),
    ("lightning_ctx.tasks.mcqa.SysMCQATask",
     "MedMCQA in OPCD's system-prompt protocol: export files (parquet / JSONL), the answer as `<answer>X</answer>`"),
    ("lightning_ctx.tasks.safety.SafetyTask",
     "safety verdicts in OPCD's system-prompt protocol: export files, the answer as `<answer>yes|no</answer>`"),
    ("lightning_ctx.tasks.frozenlake.FrozenLakeTask", "the FrozenLake text game, maps generated from seeds"),
    ("lightning_ctx.tasks.games.GamesTask",
     "multi-turn TextArena games (Sokoban, FrozenLake), the context = an experience text"),
)
#: Bases other tasks build on, not configured themselves (their knobs are listed with each subclass).
TASK_BASES = ("lightning_ctx.data.task.Task", "lightning_ctx.data.exports.ExportTask")
CALLBACKS = (
    ("lightning_ctx.eval.ContextRemovabilityCallback",
     "the context-removability evaluation (metrics `eval/*`, `ref/*`, per-example tables and plots)",
     "builtin:eval/removability.yaml"),
    ("lightning_ctx.tasks.games.GameEvalCallback",
     "the text games' evaluation (pass rates with and without the experience, the oracle's ceiling and the random "
     "player's floor, transcripts)", "builtin:eval/games.yaml"),
)
#: The base of the evaluation callbacks (its knobs are listed with each of them).
CALLBACK_BASES = ("lightning_ctx.eval.base_callback.EvaluationCallback",)
#: Callbacks the CLI configures itself, documented elsewhere on this page or not configurable.
CLI_CALLBACKS = ("lightning_ctx.checkpointing.RunCheckpoint", "lightning_ctx.progress.StepProgressBar",
                 "lightning_ctx.progress.StepLogProgress", "lightning_ctx.tracking.MLflowConfigCallback",
                 "lightning_ctx.export.ModelExport", "lightning_ctx.console.CompactModelSummary")
LOGGER = "lightning_ctx.tracking.MLflowLogger"
MODULE = "lightning_ctx.module.OnPolicyDistillation"
CHECKPOINT = "lightning_ctx.checkpointing.RunCheckpoint"
EXPORT = "lightning_ctx.export.ModelExport"

# Trainer arguments worth listing (every Lightning Trainer argument is accepted).
TRAINER_KNOBS = {
    "max_steps": "optimizer steps of the run (the CLI's default is 50)",
    "accelerator": "`auto` | `cpu` | `gpu` ...",
    "devices": "number (or list) of devices; several GPUs with `strategy: ddp` (or `fsdp`)",
    "strategy": "`auto` | `ddp` | `fsdp` | `deepspeed_stage_2` ...: multi-GPU training",
    "num_nodes": "machines for multi-node training",
    "precision": "`bf16-mixed` on GPUs (bf16 compute, fp32 master weights); `32-true` on CPUs",
    "accumulate_grad_batches": "micro-batches per optimizer step (each gets its own on-policy rollout)",
    "gradient_clip_val": "gradient norm clipping (1.0 in the shipped configs)",
    "log_every_n_steps": "logging interval (the CLI's default is 1: every step)",
    "val_check_interval": "Lightning's validation loop interval (shipped configs evaluate with the callback instead)",
    "limit_val_batches": "0 turns the validation-loss loop off (the callback still evaluates)",
    "num_sanity_val_steps": "validation batches run before training (0 in the shipped configs)",
    "enable_checkpointing": "false turns the `checkpoint.*` callback off",
    "default_root_dir": "where checkpoints go (`<default_root_dir>/checkpoints`)",
    "callbacks": "extra callbacks, e.g. the context-removability evaluation above",
}


def printed_config(*extra: str) -> dict:
    """The YAML ``lightning-ctx fit [extra] --print_config`` prints, parsed."""
    import yaml

    from lightning_ctx.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(["fit", *extra, "--print_config"])
        except SystemExit as err:
            if err.code not in (0, None):
                raise RuntimeError(f"--print_config failed for {extra}") from None
    return yaml.safe_load(buf.getvalue())


def resolve(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def package_subclasses(base: type) -> set[str]:
    """Dotted paths of every class in ``lightning_ctx`` that derives from ``base`` (by its defining module)."""
    import pkgutil

    import lightning_ctx

    for info in pkgutil.walk_packages(lightning_ctx.__path__, "lightning_ctx."):
        if not info.name.endswith(".__main__"):  # a command, not a module to import
            importlib.import_module(info.name)
    found, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("lightning_ctx."):
                found.add(f"{sub.__module__}.{sub.__qualname__}")
    return found


def canonical(path: str) -> str:
    """``path`` as its defining module names it (``lightning_ctx.tasks.world.WorldTask`` ->
    ``lightning_ctx.tasks.world.task.WorldTask``)."""
    cls = resolve(path)
    return f"{cls.__module__}.{cls.__qualname__}"


_ENTRY = re.compile(r"^    (?P<names>[A-Za-z_`][^:]*?):\s+(?P<text>.*)$")


def arg_docs(cls) -> dict[str, str]:
    """``{parameter: description}`` from the ``Args:`` section of ``cls``'s docstring.

    Entries may name several parameters (``lr / weight_decay: ...``); a parameter only mentioned inside
    another entry (``...; ``detach_anchor``: ...``) gets that entry's text.
    """
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Args:") + 1
    except StopIteration:
        return {}
    entries: list[tuple[list[str], list[str]]] = []
    closed = False
    for ln in lines[start:]:
        if ln and not ln.startswith("    "):
            break  # the next section
        if ln.strip().startswith("Other arguments"):
            closed = True  # "Other arguments as in ...": not part of the entry above
            continue
        m = _ENTRY.match(ln)
        bare = re.sub(r"\s*\([^)]*\)", "", m.group("names")) if m else ""
        if m and " " not in bare.replace(" / ", "/").replace(", ", ",").strip():
            names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare)
            entries.append((names, [m.group("text").strip()]))
            closed = False
        elif entries and ln.strip() and not closed:
            entries[-1][1].append(ln.strip())
    out: dict[str, str] = {}
    texts = []
    for names, text in entries:
        joined = " ".join(text)
        texts.append(joined)
        for n in names:
            out.setdefault(n, joined)
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    for p in params:
        if p not in out:
            pat = rf"``{re.escape(p)}``|(?<!\w){re.escape(p)}[:=]"
            hit = next((t for t in texts if re.search(pat, t)), None)
            if hit is not None:
                out[p] = hit
    return out


def signature_defaults(cls) -> dict:
    """``{parameter: default}`` of ``cls.__init__`` and of the bases it passes ``**kwargs`` on to (the class's own
    defaults, for classes picked by ``class_path``: ``--print_config`` shows the default class's only)."""
    out = {}
    for klass in _passes_kwargs_to(cls):
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if name in ("self", "args", "kwargs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def _passes_kwargs_to(cls) -> list:
    """``cls`` and the bases its ``__init__`` passes ``**kwargs`` on to (jsonargparse reads their arguments too),
    the most basic first."""
    chain = [cls]
    for klass in cls.__mro__[1:]:
        params = inspect.signature(chain[-1].__init__).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params) or "__init__" not in vars(klass):
            continue
        chain.append(klass)
    return chain[::-1]


def class_docs(cls) -> dict[str, str]:
    """The ``Args:`` of ``cls`` and of its bases (an intermediate base such as ``ExportTask`` documents the knobs its
    subclasses share), the most derived winning."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(arg_docs(klass))
    return docs


def _cell(text: str) -> str:
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    return f"`{text}`"


def _table(prefix: str, values: dict, docs: dict[str, str], fallback: str = "") -> list[str]:
    rows = ["| knob | default | meaning |", "| --- | --- | --- |"]
    for key, value in values.items():
        rows.append(f"| `{prefix}{key}` | {_default(value)} | {_cell(docs.get(key, fallback))} |")
    return rows


def render() -> str:
    base = printed_config()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from `lightning-ctx fit --print_config` and the",
        "     docstrings; do not edit by hand (tests/test_docs.py checks that it is current). -->",
        "",
        "Every knob below has a typed default in code; `lightning-ctx fit --print_config` prints them all, and",
        "`lightning-ctx fit --config cfg.yaml --print_config` prints a config with its overrides resolved. Set a",
        "knob in YAML (`model: {anchor_weight: 0.5}`) or on the command line (`--model.anchor_weight 0.5`);",
        "configs are read with `parser_mode=omegaconf`, so values can be shared with `${...}` interpolation.",
        "",
        f"## `model.*`: `{MODULE.rsplit('.', 1)[1]}`",
        "",
        *_table("model.", base["model"], arg_docs(resolve(MODULE))),
        "",
        f"## `data.*`: `{DATA_MODULE.rsplit('.', 1)[1]}`",
        "",
        "The one DataModule: what every task shares (batching, rendering, the retention term's contexts, the eval",
        "cap, resumable sharded sampling). On the command line `--data.batch_size 16`.",
        "",
        *_table("data.", {k: v for k, v in base["data"].items() if k != "task"}, class_docs(resolve(DATA_MODULE))),
        "",
        "## `data.task`: tasks",
        "",
        "Pick one by class path; its knobs go under `data.task.init_args` (on the command line",
        "`--data.task.init_args.n_train 64` or `--data.task.n_train 64`). A task from outside the package is named",
        "the same way (`class_path: mypackage.MyTask`, a `lightning_ctx.data.task.Task` subclass).",
        "",
        "```yaml",
        "data:",
        "  task:",
        "    class_path: lightning_ctx.tasks.world.WorldTask",
        "    init_args: {target_context: SHOW}",
        "  batch_size: 64",
        "```",
        "",
    ]
    for path, what in TASKS:
        cls = resolve(path)
        out += [f"### `{path}`", "", f"{what[0].upper()}{what[1:]}.", "",
                *_table("data.task.init_args.", signature_defaults(cls), class_docs(cls)), ""]
    out += [
        "## `trainer.callbacks`: evaluations",
        "",
        "Each evaluation file of the `eval` group appends its callback with jsonargparse's list append",
        "(`callbacks+:`), so evaluations stack without restating each other; a plain `callbacks:` list replaces",
        "every callback configured before it:",
        "",
        "```yaml",
        "trainer:",
        "  callbacks+:",
        f"    - class_path: {CALLBACKS[0][0]}",
        "      init_args: {every_n_steps: 50, eval_at_start: true}",
        "```",
        "",
    ]
    for path, what, config in CALLBACKS:
        out += [f"### `{path}`", "", f"{what[0].upper()}{what[1:]}; shipped as `{config}`.", "",
                *_table("", signature_defaults(resolve(path)), class_docs(resolve(path))), ""]
    out += [
        f"## `trainer.logger`: `{LOGGER}` (the default)",
        "",
        *_table("", signature_defaults(resolve(LOGGER)), arg_docs(resolve(LOGGER)),
                fallback="as in Lightning's `MLFlowLogger`; `tracking_uri: null` = `$MLFLOW_TRACKING_URI` or "
                         "`sqlite:///./mlruns/mlflow.db`"),
        "",
        f"## `checkpoint.*`: `{CHECKPOINT}`",
        "",
        "Lightning's `ModelCheckpoint` with resume-friendly defaults (every N steps plus `last.ckpt`, under "
        "`<trainer.default_root_dir>/checkpoints`); `--ckpt_path last` resumes the run and its MLflow run.",
        "",
        *_table("checkpoint.", base["checkpoint"], {}, fallback="see Lightning's `ModelCheckpoint`"),
        "",
        f"## `export.*`: `{EXPORT}`",
        "",
        "At the end of fit, the student as a `save_pretrained` folder (merged LoRA unless `adapter_only`); "
        "`lightning-ctx export` writes the same from a checkpoint or a run afterwards.",
        "",
        *_table("export.", base["export"], arg_docs(resolve(EXPORT))),
        "",
        "## `trainer.*`: Lightning `Trainer` (selection)",
        "",
        "Every `lightning.pytorch.Trainer` argument is accepted; the ones that matter most here:",
        "",
        *_table("trainer.", {k: base["trainer"][k] for k in TRAINER_KNOBS
                             if k in base["trainer"] and k != "logger"}, TRAINER_KNOBS),
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config_reference.md is out of date")
    p.add_argument("--out", default=str(OUTPUT))
    args = p.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            print(f"{out} is out of date: run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
