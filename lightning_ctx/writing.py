"""Writing files: never half-written, and a folder or file in the way found before the work starts.

The files this package writes for a user to keep (checkpoints, exported models, ``compare`` outputs, converted data,
experience files, evaluation tables) go to a temporary file beside their target, are flushed to disk, and only then
replace the target (``os.replace``: atomic within one filesystem). A full disk or a kill mid-write leaves the
previous file (or none), never a truncated one; the temporary file is removed. A failed write raises
:class:`~lightning_ctx.errors.WriteError` naming the path and the reason, which the commands print as one line.

:func:`check_output_file` / :func:`check_output_dir` say before a long computation that its output cannot be written
there (a folder where a file goes, a file where a folder goes, a read-only folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Optional

from lightning_ctx.errors import ConfigError, WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


def os_reason(err: OSError) -> str:
    """``No space left on device`` (the OS's own words), with the errno's name."""
    import errno

    name = errno.errorcode.get(err.errno or 0, "")
    text = err.strerror or str(err)
    return f"{text} ({name})" if name else text


def _remove(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(path, f"cannot create its folder ({os_reason(err)})") from None


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """An open temporary file beside ``path`` that replaces ``path`` when the block ends without an error."""
    path = Path(path)
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(path, os_reason(err)) from None
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=encoding, newline="" if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise WriteError(path, os_reason(err)) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text, encoding="utf-8")``, atomically."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; when the block ends without an error it takes ``path``'s place (an
    existing folder there is replaced as a whole). On an error ``path`` is left as it was."""
    path = Path(path)
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise WriteError(path, os_reason(err)) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(path, os_reason(err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent(path: Path, knob: str) -> None:
    above = _nearest_existing(path.parent)
    if not above.is_dir():
        raise ConfigError(f"{above} is a file, so no folder can be made there; give another path", path=path,
                          field=knob)
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"the folder {above} is not writable; give a path you can write to", path=path,
                          field=knob)


def check_output_file(path: str | Path, knob: str) -> Path:
    """``path`` can be written as a file: not a folder, and its folder exists or can be made and is writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError("is a folder; give the path of the file to write", path=path, field=knob)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError("exists and is not writable", path=path, field=knob)
    _check_parent(path, knob)
    return path


def check_output_dir(path: str | Path, knob: str) -> Path:
    """``path`` can hold output files: a folder (or nothing yet) that is, or can be made, writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("is a file; give a folder", path=path, field=knob)
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("is not writable; give a folder you can write to", path=path, field=knob)
    if not path.exists():
        _check_parent(path, knob)
    return path
