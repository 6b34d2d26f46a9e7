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

DATA_MODULES = (
    ("lightning_ctx.data.datamodule.ContextPairDataModule", "JSONL files with `{id, context, prompt, answer}` records "
                                                            "(the default)"),
    ("lightning_ctx.tasks.world.WorldDataModule", "the built-in rule world, records generated from seeds"),
    ("lightning_ctx.tasks.mcqa.MCQADataModule",
     "raw MedMCQA-style multiple-choice files, the context = a system prompt"),
    ("lightning_ctx.tasks.mcqa.SysMCQADataModule",
     "MedMCQA in OPCD's system-prompt protocol: export files (parquet / JSONL), the answer as `<answer>X</answer>`"),
    ("lightning_ctx.tasks.safety.SafetyDataModule",
     "safety verdicts in OPCD's system-prompt protocol: export files, the answer as `<answer>yes|no</answer>`"),
    ("lightning_ctx.tasks.frozenlake.FrozenLakeDataModule", "the FrozenLake text game, maps generated from seeds"),
    ("lightning_ctx.tasks.games.GamesDataModule",
     "multi-turn TextArena games (Sokoban, FrozenLake), the context = an experience text"),
)
CALLBACK = "lightning_ctx.eval.ContextRemovabilityCallback"
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


# Knobs the data modules inherit without documenting them.
COMMON_DOCS = {
    "num_workers": "DataLoader worker processes",
    "shuffle": "shuffle the training records (seeded epoch permutations; a resumed run continues the same order)",
    "seed": "seed of the training order (and of per-draw choices such as the retention context)",
}


def signature_defaults(cls) -> dict:
    """``{parameter: default}`` of ``cls.__init__`` (the class's own defaults).

    Used for classes picked by ``class_path``: LightningCLI's ``--print_config`` of a non-default data class
    shows the *default* class's values for shared arguments (jsonargparse issue #460), not the class's own.
    """
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "args", "kwargs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def class_docs(cls, base=None) -> dict[str, str]:
    """The ``Args:`` of ``base``, then of every class between it and ``cls`` (an intermediate base such as
    ``ExportDataModule`` documents the knobs its subclasses share), the most derived winning."""
    docs = dict(COMMON_DOCS)
    if base is not None:
        docs.update(arg_docs(base))
    mro = cls.__mro__
    for klass in reversed(mro[: mro.index(base)] if base in mro else (cls,)):
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
        "## `data.*`: data modules",
        "",
        "Pick one with `data.class_path` (default `ContextPairDataModule`); its knobs go under `data.init_args`",
        "(on the command line `--data.init_args.batch_size 16`, or `--data.batch_size 16`). Defaults below are each",
        "class's own; when you switch the class, set the knobs you rely on explicitly (the shipped configs do):",
        "LightningCLI may keep the default class's value for an argument both classes share.",
        "",
    ]
    base_data = resolve(DATA_MODULES[0][0])
    for path, what in DATA_MODULES:
        cls = resolve(path)
        values = base["data"]["init_args"] if cls is base_data else signature_defaults(cls)
        out += [f"### `{path}`", "", f"{what[0].upper()}{what[1:]}.", "",
                *_table("data.", values, class_docs(cls, base_data)), ""]
    out += [
        f"## `trainer.callbacks`: `{CALLBACK}`",
        "",
        "The context-removability evaluation (metrics `eval/*`, `ref/*`, per-example tables and plots). "
        "Add it in YAML:",
        "",
        "```yaml",
        "trainer:",
        "  callbacks:",
        f"    - class_path: {CALLBACK}",
        "      init_args: {every_n_steps: 50, eval_at_start: true}",
        "```",
        "",
        *_table("", signature_defaults(resolve(CALLBACK)), arg_docs(resolve(CALLBACK))),
        "",
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
