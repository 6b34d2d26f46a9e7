"""System-prompt task exports (parquet, JSONL or a JSON array) -> records, through a field map.

OPCD's system-prompt settings read Hub exports (``ytz20/sys_medmcqa_{train,test}``,
``ytz20/sys_safety_{train,test}``) saved as parquet. We could not download them, so their layout is an
**assumption**, made configurable:

* ``prompt`` <- field ``content`` (OPCD's training script reads its prompts with ``data.prompt_key=content``):
  the user turn, a string; a list of chat messages ``[{"role": "user", "content": ...}]`` with exactly one
  user message is accepted too (a system message in the row is an error: the context is ours, from
  ``system_prompt_file``);
* ``answer`` <- field ``answer``, else ``reward_model.ground_truth`` (verl's usual place for the gold answer);
* ``id`` <- field ``id`` when present, else ``<id_prefix><row number>``.

``fields`` overrides any of these: ``{"prompt": "question", "answer": "label", "id": "uid"}``; a dotted name
reads a nested field (``reward_model.ground_truth``), and ``a|b`` tries ``a`` then ``b``. The task decides
how a gold answer is normalised (a letter, ``yes`` / ``no``); an answer it cannot read is an error naming
the file, row and field, never a guess.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import TASK_PREFIX, Task
from lightning_ctx.data.verifiers import Verifier, exact_match
from lightning_ctx.errors import ConfigError, DataError
from lightning_ctx.knobs import check_class_args, existing_file, one_of
from lightning_ctx.textfiles import file_problem, read_json_lines, read_text

__all__ = ["DEFAULT_FIELDS", "MISSING", "SCORINGS", "ExportTask", "convert_export_rows", "field_value",
           "read_export_rows", "read_context_file", "resolve_fields"]

SCORINGS = ("strict", "opcd")  # the scoring knob: our strict reading of the answer tag, or OPCD's
DEFAULT_FIELDS = {"prompt": "content", "answer": "answer|reward_model.ground_truth", "id": "id"}
MISSING = _MISSING = object()  # field_value's "no such field"


def resolve_fields(fields: Optional[Mapping[str, str]]) -> dict[str, str]:
    """``DEFAULT_FIELDS`` updated with ``fields``; unknown keys are an error."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(DEFAULT_FIELDS))
    if unknown:
        raise DataError(f"unknown key(s) {unknown}; the field map has {sorted(DEFAULT_FIELDS)}",
                        field=f"{TASK_PREFIX}fields")
    return {**DEFAULT_FIELDS, **{k: v for k, v in fields.items() if v}}


def field_value(row: Mapping, spec: str) -> Any:
    """The value of ``spec`` in ``row`` (dotted = nested, ``a|b`` = first present), or ``_MISSING``."""
    for name in (s.strip() for s in spec.split("|")):
        value: Any = row
        for part in name.split("."):
            if not isinstance(value, Mapping) or part not in value:
                value = _MISSING
                break
            value = value[part]
        if value is not _MISSING and value is not None:
            return value
    return _MISSING


def read_export_rows(path: str | Path) -> list[tuple[int, Any]]:
    """``(row number, row)`` of a parquet file (1-based rows), a JSONL file (line numbers) or a JSON array."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".parquet", ".pq"):
        problem = file_problem(path)
        if problem is not None:
            raise DataError(problem, path=path)
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading parquet needs pyarrow (pip install pyarrow), or export to JSONL", path=path) \
                from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"cannot read as parquet ({err})", path=path) from None
        return list(enumerate(rows, start=1))
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg})", path=path, line=err.lineno) from None
    return read_json_lines(path)


def _prompt_text(value: Any, where: dict, spec: str) -> str:
    if isinstance(value, list):  # chat messages
        users = [m for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        if any(isinstance(m, Mapping) and m.get("role") == "system" for m in value):
            raise DataError("the row already holds a system message; the context comes from system_prompt_file "
                            "(export the user turn only)", field=spec, **where)
        if len(users) != 1 or len(value) != 1:
            raise DataError(f"expected one user message, got {len(value)} message(s)", field=spec, **where)
        value = users[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise DataError("missing or empty prompt text", field=spec, **where)
    return value.strip()


def convert_export_rows(rows: Iterable[tuple[int, Any]], context: str, normalize_answer: Callable[[Any], Optional[str]],
                        *, fields: Optional[Mapping[str, str]] = None, instruction: str = "",
                        id_prefix: str = "row-", skip_unlabeled: bool = False,
                        path: str | Path | None = None) -> list[dict]:
    """Export rows -> record dicts ``{id, context, prompt, answer}``.

    ``normalize_answer(value)`` returns the task's canonical gold answer or None when it cannot read it (an
    error). Rows without an answer are an error unless ``skip_unlabeled``. ``instruction`` (if any) is appended
    to the prompt as its own line. Duplicate ids are an error.
    """
    fmap = resolve_fields(fields)
    out, seen = [], {}
    for line, row in rows:
        where = {"path": path, "line": line}
        if not isinstance(row, Mapping):
            raise DataError(f"expected an object, got {type(row).__name__}", **where)
        prompt_value = field_value(row, fmap["prompt"])
        if prompt_value is _MISSING:
            raise DataError(f"no prompt field {fmap['prompt']!r} (fields in this row: {sorted(row)}); set fields "
                            "to map yours", field=fmap["prompt"], **where)
        prompt = _prompt_text(prompt_value, where, fmap["prompt"])
        if instruction:
            prompt = f"{prompt}\n{instruction}"
        raw_answer = field_value(row, fmap["answer"])
        if raw_answer is _MISSING or raw_answer == "":
            if skip_unlabeled:
                continue
            raise DataError(f"no gold answer in {fmap['answer']!r} (set skip_unlabeled to drop such rows)",
                            field=fmap["answer"], **where)
        answer = normalize_answer(raw_answer)
        if answer is None:
            raise DataError(f"cannot read gold answer {raw_answer!r}", field=fmap["answer"], **where)
        raw_id = field_value(row, fmap["id"])
        rec_id = str(raw_id) if raw_id is not _MISSING and str(raw_id).strip() else f"{id_prefix}{line}"
        if rec_id in seen:
            raise DataError(f"duplicate id {rec_id!r} (first seen in row {seen[rec_id]})", field="id", **where)
        seen[rec_id] = line
        out.append({"id": rec_id, "context": context, "prompt": prompt, "answer": answer})
    if not out:
        raise DataError("no labeled rows", path=path)
    return out


def read_context_file(system_prompt: Optional[str], system_prompt_file: Optional[str | Path]) -> str:
    """The context: ``system_prompt`` or the stripped content of ``system_prompt_file`` (exactly one of them)."""
    if (system_prompt is None) == (system_prompt_file is None):
        raise DataError("set exactly one of system_prompt_file (a prompt file, e.g. "
                        "experiments/data/sys_safety_prompt.txt) and system_prompt",
                        field=f"{TASK_PREFIX}system_prompt_file")
    if system_prompt is not None:
        if not system_prompt.strip():
            raise DataError("is empty", field=f"{TASK_PREFIX}system_prompt")
        return system_prompt.strip()
    text = read_text(system_prompt_file, field=f"{TASK_PREFIX}system_prompt_file").strip()
    if not text:
        raise DataError("system prompt file is empty", path=system_prompt_file,
                        field=f"{TASK_PREFIX}system_prompt_file")
    return text


class ExportTask(Task):
    """Base of the system-prompt tasks: export files (parquet / JSONL / JSON) converted on the fly.

    Subclasses set ``VERIFIERS`` (the verifier each scoring uses, built without arguments) and ``normalize_answer``.

    Args:
        train_file / val_file / test_file: export files: parquet, JSONL or a JSON array (see the module docs).
        system_prompt / system_prompt_file: the context, exactly one of them: the text itself, or a UTF-8 text file
            read whole and stripped of leading and trailing whitespace (line breaks inside are kept; a context and
            prompt longer than data.max_prompt_length tokens is an error). OPCD's published prompt files
            (``opcd/system_prompts/{medmcqa,safety}.txt`` in microsoft/LMOps, downloaded by you) can be given as
            they are; a split where neither the context nor any prompt asks for the ``<answer>`` tag is an error.
        scoring: how a response is scored: ``strict`` (exactly one ``<answer>`` tag, exactly the letter /
            verdict inside; anything else is wrong) or ``opcd`` (OPCD's scorer: the last ``<answer>`` tag,
            read leniently; the task's verifier module documents every case).
        fields: the field map (see the module docs).
        instruction: a line appended to every prompt; empty by default: in OPCD's protocol the answer format
            lives in the system prompt or the exported prompt.
        skip_unlabeled: drop rows without a gold answer instead of failing.
    """

    VERIFIERS: dict[str, Callable[[], Verifier]] = {"strict": lambda: exact_match}  # scoring -> verifier factory
    ANSWER_TAG: Optional[str] = None  # the tag the verifiers read; the context or the prompts must ask for it
    FORMAT_EXAMPLE = ""  # an instruction line asking for it, for the error message
    ID_PREFIX = "row-"
    KNOB_CHECKS = (existing_file("train_file"), existing_file("val_file"), existing_file("test_file"),
                   existing_file("system_prompt_file"), one_of("scoring", SCORINGS))

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, system_prompt: Optional[str] = None,
                 system_prompt_file: Optional[str] = None, scoring: str = "strict",
                 fields: Optional[dict[str, str]] = None, instruction: str = "", skip_unlabeled: bool = False):
        check_class_args(ExportTask, locals(), TASK_PREFIX)
        if scoring not in self.VERIFIERS:
            raise ConfigError(f"{type(self).__name__} has no {scoring!r} scoring; choose one of "
                              f"{', '.join(self.VERIFIERS)}", field=f"{TASK_PREFIX}scoring")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.context = read_context_file(system_prompt, system_prompt_file)
        self.scoring = scoring
        self.verifier = self.VERIFIERS[scoring]()
        self.fields = resolve_fields(fields)
        self.instruction = instruction
        self.skip_unlabeled = skip_unlabeled
        self._converted: dict[str, list[TaskRecord]] = {}

    @staticmethod
    def normalize_answer(value: Any) -> Optional[str]:
        return str(value).strip() or None

    def convert(self, rows: Iterable[tuple[int, Any]], path: str | Path | None = None) -> list[dict]:
        return convert_export_rows(rows, self.context, self.normalize_answer, fields=self.fields,
                                   instruction=self.instruction, id_prefix=self.ID_PREFIX,
                                   skip_unlabeled=self.skip_unlabeled, path=path)

    def load(self, split: str) -> list[TaskRecord] | None:
        path = self.files[split]
        if not path:
            return None
        if path not in self._converted:
            records = [TaskRecord.from_dict(r, path=path) for r in self.convert(read_export_rows(path), path=path)]
            self._check_format_is_asked(records, path)
            self._converted[path] = records
        return self._converted[path]

    def source(self, split: str) -> str:
        return str(self.files[split])

    def _check_format_is_asked(self, records: list[TaskRecord], path: str) -> None:
        """A model never told to write ``ANSWER_TAG`` scores 0 under either scoring: refuse such a split."""
        tag = self.ANSWER_TAG
        if tag is None or any(tag in r.context or tag in r.prompt for r in records):
            return
        raise DataError(f"neither the system prompt nor any prompt of this file asks for the answer as {tag}...: "
                        "the verifier would score every response wrong. Write the format into the system prompt, or "
                        f"add it to every prompt with instruction (e.g. {self.FORMAT_EXAMPLE!r})",
                        path=path, field=f"{TASK_PREFIX}instruction")
