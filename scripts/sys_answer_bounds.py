#!/usr/bin/env python
"""Ceiling and floor of the system-prompt settings' scoring on their data, under both scorings.

    python scripts/sys_answer_bounds.py                          # the 8 paper settings, on their configured data
    python scripts/sys_answer_bounds.py --config my.yaml         # other configs (paths relative to the repo root)

* **ceiling**: every gold answer written as a model following the prompt writes it (reasoning, then
  ``<answer>GOLD</answer>``, then a closing remark), run through the verifier: the fraction it accepts. Below 1.0 a
  setting cannot reach full accuracy whatever the model does (a gold the verifier cannot read at all stops the run
  before training instead).
* **floor**: an answer policy that knows nothing, in the same format through the same verifier: uniformly random over
  the item's choices (``yes`` / ``no``; the option letters listed in the question), as an exact expectation, and the
  best constant answer (the majority gold answer).

Only the data and the verifiers are involved: no tokenizer, no model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import re
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "experiments" / "paper"
SETTINGS = sorted(PAPER.glob("sys_*.yaml"))
SCORINGS = ("strict", "opcd")
_OPTION = re.compile(r"^\s*\(?([A-J])[).:]\s", re.MULTILINE)


def as_model_answers(answer: str) -> str:
    """A response in the settings' format: reasoning before the tag, a remark after it."""
    return f"Let me think about what is asked and weigh it.\n<answer>{answer}</answer>\nThat is my final answer."


def choices_of(prompt: str, task: str) -> tuple[str, ...]:
    """What a random policy picks from: the verdicts, or the option letters the question lists (A-D if none)."""
    if task == "safety":
        return ("yes", "no")
    return tuple(dict.fromkeys(_OPTION.findall(prompt))) or tuple("ABCD")


def bounds(records, verifier: Callable[[str, str], bool], task: str) -> dict:
    """``{items, ceiling, random, constant, constant_answer}`` of ``records`` through ``verifier``."""
    n = len(records)
    ceiling = sum(verifier(as_model_answers(r.answer), r.answer) for r in records) / n
    random = sum(sum(verifier(as_model_answers(c), r.answer) for c in cs) / len(cs)
                 for r in records for cs in [choices_of(r.prompt, task)]) / n
    candidates = dict.fromkeys(c for r in records for c in choices_of(r.prompt, task))
    scores = {c: sum(verifier(as_model_answers(c), r.answer) for r in records) / n for c in candidates}
    best = max(scores, key=scores.get)
    return {"items": n, "ceiling": ceiling, "random": random, "constant": scores[best], "constant_answer": best}


def printed_config(config: Path, *overrides: str) -> dict:
    """What ``lightning-ctx fit --config config [overrides] --print_config`` prints, parsed (what a run would use)."""
    import yaml

    from lightning_ctx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["fit", "--config", str(config), *overrides, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise RuntimeError(f"--print_config failed for {config}: {err.getvalue().strip()}") from None
    return yaml.safe_load(out.getvalue())


def build_task(data_cfg: dict, scoring: str):
    """The config's task with ``scoring``; relative paths are taken from the repository root."""
    module, name = data_cfg["task"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    accepted = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in data_cfg["task"]["init_args"].items() if k in accepted}
    for key in ("train_file", "val_file", "test_file", "system_prompt_file"):  # the tasks' shared arguments
        if args.get(key) and not Path(args[key]).is_absolute():
            args[key] = str(REPO / args[key])
    return cls(**{**args, "scoring": scoring})


def task_of(task) -> str:
    from lightning_ctx.tasks.safety import SafetyTask

    return "safety" if isinstance(task, SafetyTask) else "medmcqa"


def measure(config: Path, *overrides: str, printed: dict | None = None) -> dict[str, dict[str, dict]]:
    """``{scoring: {split: bounds}}`` of one config's data (``printed``: its already printed config)."""
    data_cfg = (printed or printed_config(config, *overrides))["data"]
    out: dict[str, dict[str, dict]] = {}
    for scoring in SCORINGS:
        task = build_task(data_cfg, scoring)
        out[scoring] = {"verifier": task.verifier_name}
        for split in ("train", "val", "test"):
            records = task.load(split)
            if records:
                out[scoring][split] = bounds(records, task.verifier, task_of(task))
    return out


def _cells(result: dict) -> list[str]:
    splits = [s for s in ("train", "val", "test") if s in result]
    per_split = {
        "items": lambda b: str(b["items"]),
        "ceiling": lambda b: f"{b['ceiling']:.3f}",
        "random": lambda b: f"{b['random']:.3f}",
        "constant": lambda b: f"{b['constant']:.3f} (`{b['constant_answer']}`)",
    }
    cells = [" / ".join(fmt(result[s]) for s in splits) for fmt in per_split.values()]
    cells[0] += f" ({' / '.join(splits)})"
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", type=Path, help="a config (repeatable; default: the 8 paper settings)")
    p.add_argument("overrides", nargs="*", help="extra CLI arguments for every config, after --")
    args = p.parse_args(argv)
    print("| setting | scoring (verifier) | items | ceiling | floor: random | floor: best constant |")
    print("| --- | --- | --- | --- | --- | --- |")
    for config in args.config or SETTINGS:
        for scoring, result in measure(config, *args.overrides).items():
            print(f"| {config.stem} | {scoring} (`{result['verifier']}`) | {' | '.join(_cells(result))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
