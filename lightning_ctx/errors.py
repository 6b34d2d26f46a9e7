"""Errors a user can cause. Each names what to fix; the CLI prints it as one line and exits 2."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with user data; the message names file, line and field."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")
        self.message, self.path, self.line, self.field = message, path, line, field


class ConfigError(DataError):
    """A knob out of its range; ``field`` is the dotted knob name (``model.lr``)."""


class ModelError(ValueError):
    """A user-fixable problem with a model or tokenizer (path, vocab, pad token, quantizable shapes)."""


class WriteError(Exception):
    """A file could not be written (full disk, no permission, a folder in the way). Nothing half-written is left at
    ``path``: writes go to a temporary file that replaces it only when complete (:mod:`lightning_ctx.writing`)."""

    def __init__(self, path: str | Path, reason: str, hint: str = ""):
        super().__init__(f"cannot write {path}: {reason}" + (f"; {hint}" if hint else ""))
        self.path, self.reason, self.hint = Path(path), reason, hint

    def with_hint(self, hint: str) -> WriteError:
        return WriteError(self.path, self.reason, hint)
