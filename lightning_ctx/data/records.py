"""Task records ``{id, context, prompt, answer}`` and a JSONL loader that validates before training.

Every user-caused problem raises :class:`DataError` naming the file, the line and the field, so a
bad line is found in the first second of a run, not at step 900.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_ctx.errors import DataError
from lightning_ctx.textfiles import read_json_lines

REQUIRED_FIELDS = ("id", "context", "prompt", "answer")


@dataclass(frozen=True)
class TaskRecord:
    """One task item. ``context`` is the privileged text the student must internalize."""

    id: str
    context: str
    prompt: str
    answer: str
    # Optional extra fields from the JSONL (kept for the per-example tables).
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, obj: Any, *, path: str | Path | None = None, line: int | None = None) -> TaskRecord:
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
        for name in REQUIRED_FIELDS:
            if name not in obj:
                raise DataError(f"missing required field (a record needs {', '.join(REQUIRED_FIELDS)})",
                                path=path, line=line, field=name)
            value = obj[name]
            if name == "id" and isinstance(value, int) and not isinstance(value, bool):
                continue  # integer ids are common in exported datasets; stored as str
            if not isinstance(value, str):
                raise DataError(f"must be a string, got {type(value).__name__}", path=path, line=line, field=name)
        for name in ("id", "prompt", "answer"):
            if not str(obj[name]).strip():
                raise DataError("must not be empty", path=path, line=line, field=name)
        meta = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
        return cls(id=str(obj["id"]), context=obj["context"], prompt=obj["prompt"], answer=obj["answer"], meta=meta)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        meta = out.pop("meta")
        out.update(meta)
        return out


def load_jsonl(path: str | Path) -> list[TaskRecord]:
    """Read and validate a JSONL task file (invalid JSON, fields, empty file, duplicate ids)."""
    records: list[TaskRecord] = []
    first_line_of: dict[str, int] = {}
    for lineno, obj in read_json_lines(path):
        record = TaskRecord.from_dict(obj, path=path, line=lineno)
        if record.id in first_line_of:
            raise DataError(f"duplicate id {record.id!r} (first seen on line {first_line_of[record.id]})",
                            path=path, line=lineno, field="id")
        first_line_of[record.id] = lineno
        records.append(record)
    if not records:
        raise DataError("file is empty: no records", path=path)
    return records


def write_jsonl(records: Iterable[TaskRecord | dict], path: str | Path) -> Path:
    """One JSON object per line, written atomically (:mod:`lightning_ctx.writing`)."""
    from lightning_ctx.writing import atomic_file

    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as fh:
        for rec in records:
            obj = rec.to_dict() if isinstance(rec, TaskRecord) else rec
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path
