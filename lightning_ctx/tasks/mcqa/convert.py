"""Multiple-choice QA (MedMCQA-style) with a system prompt as the context to internalize.

A raw row is converted to a task record ``{id, context, prompt, answer}``:

* ``context`` = the system prompt text (the same for every record: system-prompt distillation);
* ``prompt`` = the question and its lettered options plus a one-line answer instruction::

      Question: Which organ produces insulin?
      Options:
      A) Liver
      B) Pancreas
      ...
      Answer with the letter of the correct option.

* ``answer`` = the gold letter (verifier ``choice``).

Accepted raw rows (one JSON object per line, or one JSON array):

* MedMCQA: ``question``, ``opa`` .. ``opd`` (``ope`` too if present), ``cop`` = index of the correct
  option. The Hugging Face ``medmcqa`` export counts ``cop`` from 0 (``cop_base=0``, the default);
  the original MedMCQA release counts from 1 (``cop_base=1``). Rows whose ``cop`` is -1 / missing
  (MedMCQA's unlabeled test split) are an error unless ``skip_unanswered``.
* generic: ``question``, ``options`` = a list of strings or a ``{"A": ..., "B": ...}`` dict, and
  ``answer`` = a letter, a 0-based index or the text of one option (``answer_idx`` = a letter also
  works, as in MedQA exports).

``id`` is kept when the row has one, else ``<id_prefix><line>``; ``subject_name`` / ``topic_name``
are kept as extra fields. Convert files with::

    python -m lightning_ctx.tasks.mcqa.convert raw.jsonl records.jsonl \
        --system-prompt-file experiments/data/medmcqa_system_prompt.txt

or read raw files directly with :class:`~lightning_ctx.tasks.mcqa.MCQATask` (``data.task.class_path:
lightning_ctx.tasks.mcqa.MCQATask``), which converts on the fly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_ctx.data.records import DataError, TaskRecord, write_jsonl
from lightning_ctx.textfiles import read_json_lines, read_text

__all__ = ["MEDICAL_SYSTEM_PROMPT", "ANSWER_INSTRUCTION", "format_mcq_prompt", "row_to_record", "convert_rows",
           "read_rows", "load_mcqa", "read_system_prompt", "main"]

LETTERS = "ABCDEFGHIJ"
MEDMCQA_OPTION_KEYS = ("opa", "opb", "opc", "opd", "ope")
KEPT_FIELDS = ("subject_name", "topic_name")

#: Default context: the system prompt of ``experiments/data/medmcqa_system_prompt.txt``.
MEDICAL_SYSTEM_PROMPT = (
    "You are a careful and experienced medical doctor. Read the question and every option, recall the "
    "relevant anatomy, physiology, pharmacology and pathology, and rule out the wrong options before you "
    "choose. Answer with the letter of the single best option."
)
ANSWER_INSTRUCTION = "Answer with the letter of the correct option."


def format_mcq_prompt(question: str, options: Sequence[str], instruction: str = ANSWER_INSTRUCTION) -> str:
    """``Question: ...`` / ``Options:`` / ``A) ...`` lines / the instruction (no context)."""
    lines = [f"Question: {question.strip()}", "Options:"]
    lines += [f"{LETTERS[i]}) {str(opt).strip()}" for i, opt in enumerate(options)]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def _options_of(row: dict, where: dict) -> list[str]:
    if "options" in row:
        opts = row["options"]
        if isinstance(opts, dict):
            keys = sorted(opts, key=lambda k: str(k).upper())
            if [str(k).upper() for k in keys] != list(LETTERS[: len(keys)]):
                raise DataError(f"option keys must be consecutive letters A, B, ...; got {list(opts)}",
                                field="options", **where)
            opts = [opts[k] for k in keys]
        if not isinstance(opts, list):
            raise DataError(f"must be a list or a dict of letters, got {type(opts).__name__}", field="options",
                            **where)
    else:
        opts = _medmcqa_options(row, where)
    if not 2 <= len(opts) <= len(LETTERS):
        raise DataError(f"needs 2 to {len(LETTERS)} options, got {len(opts)}", field="options", **where)
    for i, opt in enumerate(opts):
        if not isinstance(opt, (str, int, float)) or not str(opt).strip():
            raise DataError(f"option {LETTERS[i]} is empty or not text", field="options", **where)
    return [str(o) for o in opts]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _medmcqa_options(row: dict, where: dict) -> list:
    """``opa``, ``opb``, ... in order. Trailing missing or null options are fine (a row without ``ope``); a missing,
    null or empty option *before* a given one is an error: the letters after it, and the gold letter ``cop`` points
    to, would shift."""
    values = [row.get(k) for k in MEDMCQA_OPTION_KEYS]
    while values and _blank(values[-1]):
        values.pop()
    if not values:
        raise DataError("no options: a row needs 'options' or MedMCQA's 'opa'..'opd'", field="options", **where)
    for key, value in zip(MEDMCQA_OPTION_KEYS, values):
        if _blank(value):
            raise DataError(f"option {key} is {'missing' if key not in row else repr(value)} while a later option is "
                            f"given: the later options' letters, and the gold letter cop points to, would shift; fill "
                            "it in or drop the row", field=key, **where)
    return values


def _integer(value: Any) -> Optional[int]:
    """An integer written as an int, an integral float (2.0) or digits ("2"); None for anything else (True, 1.9)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _answer_index(row: dict, options: list[str], cop_base: int, where: dict) -> Optional[int]:
    """Index of the gold option; None when the row is unlabeled (MedMCQA test: cop = -1 or missing)."""
    if "cop" in row:
        cop = row["cop"]
        if cop is None or cop == -1 or cop == "":
            return None
        if _integer(cop) is None:
            raise DataError(f"cop must be an integer, got {cop!r}", field="cop", **where)
        idx = _integer(cop) - cop_base
        if not 0 <= idx < len(options):
            raise DataError(f"cop={cop} is out of range for {len(options)} options (cop_base={cop_base}; the "
                            f"original MedMCQA release counts from 1: use cop_base 1)", field="cop", **where)
        return idx
    key = "answer_idx" if "answer_idx" in row else "answer" if "answer" in row else None
    if key is None:
        return None
    ans = row[key]
    if ans is None or ans == "":
        return None
    if isinstance(ans, bool):
        raise DataError(f"cannot read answer {ans!r}", field=key, **where)
    if isinstance(ans, int):
        if not 0 <= ans < len(options):
            raise DataError(f"answer index {ans} is out of range for {len(options)} options", field=key, **where)
        return ans
    text = str(ans).strip()
    letter = text.rstrip(").:").strip().upper()
    if len(letter) == 1 and letter in LETTERS[: len(options)]:
        return LETTERS.index(letter)
    matches = [i for i, o in enumerate(options) if o.strip() == text]
    if len(matches) == 1:
        return matches[0]
    raise DataError(f"cannot read answer {ans!r}: expected a letter A-{LETTERS[len(options) - 1]}, an index or "
                    f"the text of one option", field=key, **where)


def row_to_record(row: Any, system_prompt: str, *, index: int = 0, cop_base: int = 0, id_prefix: str = "mcqa-",
                  instruction: str = ANSWER_INSTRUCTION, path: str | Path | None = None,
                  line: int | None = None) -> Optional[dict]:
    """One raw MCQ row -> a record dict; None for an unlabeled row. Bad rows raise ``DataError``."""
    where = {"path": path, "line": line}
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", **where)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError("missing or empty question", field="question", **where)
    options = _options_of(row, where)
    idx = _answer_index(row, options, cop_base, where)
    if idx is None:
        return None
    rec_id = row.get("id")
    rec = {"id": str(rec_id) if rec_id not in (None, "") else f"{id_prefix}{index}", "context": system_prompt,
           "prompt": format_mcq_prompt(question, options, instruction), "answer": LETTERS[idx]}
    rec.update({k: row[k] for k in KEPT_FIELDS if k in row})
    return rec


def read_rows(path: str | Path) -> list[tuple[int, Any]]:
    """``(line, row)`` pairs of a JSONL file (or a JSON array file: line = 1-based item number)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg})", path=path, line=err.lineno) from None
        return list(enumerate(items, start=1))
    return read_json_lines(path)


def convert_rows(rows: Iterable[tuple[int, Any]] | Iterable[Any], system_prompt: str, *, cop_base: int = 0,
                 skip_unanswered: bool = False, id_prefix: str = "mcqa-", instruction: str = ANSWER_INSTRUCTION,
                 path: str | Path | None = None) -> list[dict]:
    """Raw rows (or ``(line, row)`` pairs) -> record dicts; duplicate ids and unlabeled rows are errors."""
    out, seen = [], {}
    for i, item in enumerate(rows, start=1):
        line, row = item if isinstance(item, tuple) else (i, item)
        rec = row_to_record(row, system_prompt, index=line, cop_base=cop_base, id_prefix=id_prefix,
                            instruction=instruction, path=path, line=line)
        if rec is None:
            if skip_unanswered:
                continue
            raise DataError("no gold answer (cop is -1 or missing; MedMCQA's test split is unlabeled): set "
                            "skip_unanswered to drop such rows", path=path, line=line, field="cop")
        if rec["id"] in seen:
            raise DataError(f"duplicate id {rec['id']!r} (first seen on line {seen[rec['id']]})", path=path,
                            line=line, field="id")
        seen[rec["id"]] = line
        out.append(rec)
    if not out:
        raise DataError("no labeled rows", path=path)
    return out


def read_system_prompt(system_prompt: Optional[str] = None, system_prompt_file: Optional[str | Path] = None) -> str:
    """The context text: ``system_prompt``, else the file's content (stripped), else the default."""
    if system_prompt is not None and system_prompt_file is not None:
        raise DataError("give system_prompt or system_prompt_file, not both", field="system_prompt")
    if system_prompt_file is not None:
        p = Path(system_prompt_file)
        text = read_text(p, field="system_prompt_file").strip()
        if not text:
            raise DataError("system prompt file is empty", path=p, field="system_prompt_file")
        return text
    return MEDICAL_SYSTEM_PROMPT if system_prompt is None else system_prompt


def load_mcqa(path: str | Path, system_prompt: str, **kwargs) -> list[TaskRecord]:
    """Read a raw MCQ file and convert it to validated ``TaskRecord``s."""
    return [TaskRecord.from_dict(r, path=path) for r in convert_rows(read_rows(path), system_prompt, path=path,
                                                                      **kwargs)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_ctx.tasks.mcqa.convert",
                                description="Convert MedMCQA-style rows to {id, context, prompt, answer} records.")
    p.add_argument("input", help="raw JSONL (or JSON array) file")
    p.add_argument("output", help="records JSONL to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--system-prompt", default=None, help="the context text")
    g.add_argument("--system-prompt-file", default=None, help="file holding the context text")
    p.add_argument("--cop-base", type=int, default=0, choices=(0, 1),
                   help="0: HF medmcqa export (default); 1: original MedMCQA release")
    p.add_argument("--skip-unanswered", action="store_true", help="drop rows without a gold answer")
    p.add_argument("--id-prefix", default="mcqa-", help="id of rows without one: <prefix><line>")
    args = p.parse_args(argv)
    try:
        system_prompt = read_system_prompt(args.system_prompt, args.system_prompt_file)
        rows = read_rows(args.input)
        records = convert_rows(rows, system_prompt, cop_base=args.cop_base, skip_unanswered=args.skip_unanswered,
                               id_prefix=args.id_prefix, path=args.input)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_jsonl(records, args.output)
    print(f"wrote {len(records)} records ({len(rows) - len(records)} unlabeled skipped) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
