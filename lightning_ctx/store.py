"""Portable MLflow stores: a moved or copied ``mlruns/`` keeps its artifacts reachable.

MLflow's SQLite store records every artifact location as an absolute path, fixed when the experiment or run was created
(relative ones are resolved against the working directory right away): ``/app/mlruns/artifacts/<run>/artifacts`` in
the Docker image, ``/home/a/repo/mlruns/...`` on a colleague's machine. After the folder moves, metrics and params are
still there but ``list_artifacts`` silently finds nothing.

:func:`reroot_artifacts` resolves the recorded locations against the store's own folder: a location that no longer
exists, whose tail does exist under the folder holding ``mlflow.db`` (``artifacts/<run>/artifacts``), is rewritten to
that path, and so is every other missing location under the same old folder. Locations that exist, or that live
outside the old store folder (a bucket, another disk), are left alone, so a copy beside its original keeps reading
the original's files until the original goes away. Every entry point that opens a store calls it
(:func:`lightning_ctx.tracking.open_store`: the MLflow logger of ``fit``/``validate``/``test``, ``compare``,
``export``, ``ui``, the notebook), so ``mlflow ui`` on a moved store works once any of them has run;
``lightning-ctx ui`` does both.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

# (table, column, key) of every artifact location the SQLite store records
LOCATION_COLUMNS = (("experiments", "artifact_location", "experiment_id"), ("runs", "artifact_uri", "run_uuid"),
                    ("logged_models", "artifact_location", "model_id"))


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` tracking URI (None for servers and other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().resolve()


def _local_path(location: str) -> Optional[Path]:
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    if "://" in location or not location.startswith("/"):
        return None  # s3://, mlflow-artifacts:/, ... or not a path we can reason about
    return Path(location)


def _with_path(location: str, path: Path) -> str:
    return path.as_uri() if location.startswith("file:") else str(path)


def _old_store_dir(path: Path, store: Path) -> Optional[Path]:
    """The folder ``path`` was written under, if its longest possible tail exists under ``store`` now."""
    parts = path.parts
    for k in range(len(parts) - 1, 0, -1):
        if (store.joinpath(*parts[-k:])).exists():
            old = Path(*parts[:-k])
            # a missing path inside the store itself (deleted files, not a move) must not map onto its parent
            return None if old == store or store in old.parents else old
    return None


def reroot_artifacts(uri: str) -> int:
    """Point the artifact locations of a moved SQLite store at its folder; returns how many were rewritten."""
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return 0
    store = db.parent
    with sqlite3.connect(db, timeout=30) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = []
        for table, column, key in LOCATION_COLUMNS:
            if table in tables:
                rows += [(table, column, key, k, v) for k, v in conn.execute(f"SELECT {key}, {column} FROM {table}")]
        gone = [(row, path) for row in rows if (path := _local_path(row[4] or "")) is not None and not path.exists()]
        old_dirs = {old for _, path in gone if (old := _old_store_dir(path, store)) is not None}
        updates = []
        for (table, column, key, ident, location), path in gone:
            for old in old_dirs:
                if path == old or old in path.parents:
                    updates.append((table, column, key, ident, _with_path(location, store / path.relative_to(old))))
                    break
        for table, column, key, ident, location in updates:
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (location, ident))
    return len(updates)
