"""Reading user files: one clear :class:`DataError` for a missing, unreadable or non-UTF-8 file, or a bad line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_ctx.errors import DataError


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a data file (None when it can)."""
    path = Path(path).expanduser()
    if not path.exists():
        return "file does not exist"
    if path.is_dir():
        return "is a folder, not a file"
    if not path.is_file():
        return "is not a regular file"
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    return None


def read_text(path: str | Path, *, field: str | None = None) -> str:
    """A UTF-8 text file (a leading BOM is dropped); a bad byte is reported with its line and column."""
    path = Path(path).expanduser()
    problem = file_problem(path)
    if problem is not None:
        raise DataError(problem, path=path, field=field)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); save the file as "
                        "UTF-8", path=path, line=line, field=field) from None


def read_json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of a JSONL file."""
    rows = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 inside a JSON string
    for lineno, raw in enumerate(read_text(path).split("\n"), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are harmless
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", path=path, line=lineno) from None
        if "\\u" in raw:  # only an escape can make a lone surrogate (the file itself is valid UTF-8)
            bad = _lone_surrogate(value)
            if bad is not None:
                raise DataError(f"a string holds {bad}, half of a UTF-16 surrogate pair, which is not text (no "
                                "tokenizer can encode it); write the character itself, or its full pair",
                                path=path, line=lineno)
        rows.append((lineno, value))
    return rows


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate (as ``\\udXXX``) in the strings of a parsed JSON value, or None."""
    if isinstance(value, str):
        for ch in value:
            if 0xD800 <= ord(ch) <= 0xDFFF:
                return f"\\u{ord(ch):04x}"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if isinstance(value, dict):
        items = [*value.keys(), *items]
    for item in items:
        bad = _lone_surrogate(item)
        if bad is not None:
            return bad
    return None
