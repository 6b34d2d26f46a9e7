"""MLflow defaults: a local SQLite store under ``./mlruns/`` (no server), config as params + artifact.

``MLFLOW_TRACKING_URI`` overrides the store. Lightning's own ``MLFlowLogger()`` defaults to the file
store (which MLflow 3 refuses) and LightningCLI's ``SaveConfigCallback`` asserts on a logger without a
``save_dir``; both are handled here.

Every run records the installed versions of the main libraries as tags ``version/<name>``
(:data:`VERSION_PACKAGES`, plus ``version/python``); ``lightning-ctx compare`` (``lightning_ctx.compare``)
warns when the compared runs differ in them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from lightning_ctx.store import reroot_artifacts

DEFAULT_STORE_DIR = "mlruns"
DEFAULT_EXPERIMENT = "lightning-ctx"

#: Distributions whose installed version every run records as the tag ``version/<name>`` (with ``python``).
VERSION_PACKAGES = ("torch", "lightning", "transformers", "tokenizers", "mlflow", "torchmetrics", "peft",
                    "bitsandbytes", "lightning-ctx")
VERSION_TAG_PREFIX = "version/"
NOT_INSTALLED = "not installed"


def installed_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.13.0+cpu", ..., "peft": "not installed"}`` for :data:`VERSION_PACKAGES`."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = NOT_INSTALLED
    return out


def version_tags() -> dict[str, str]:
    """:func:`installed_versions` as MLflow tags: ``{"version/torch": "2.13.0+cpu", ...}``."""
    return {f"{VERSION_TAG_PREFIX}{k}": v for k, v in installed_versions().items()}


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable, read-only, a kind MLflow refuses); raised before any training
    starts."""


def default_tracking_uri(store_dir: str | Path = DEFAULT_STORE_DIR) -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<abs>/mlruns/mlflow.db`` (the folder is created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = Path(store_dir).resolve()
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(f"cannot create the MLflow store folder {store} ({err.strerror}); run from a writable "
                            "folder or set MLFLOW_TRACKING_URI=sqlite:////a/writable/path/mlflow.db") from None
    return f"sqlite:///{store / 'mlflow.db'}"


def check_store_kind(uri: str) -> None:
    """MLflow 3 refuses its file store (a folder path or ``file://``) unless ``MLFLOW_ALLOW_FILE_STORE`` is set: say
    what to use instead, before MLflow fails deep inside a logger."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if (scheme in ("", "file") or len(scheme) == 1) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
            "1", "true"):
        folder = Path(urlparse(uri).path if scheme == "file" else uri).expanduser().resolve()
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri} is MLflow's file store, which MLflow 3 no longer opens; use "
                            f"a SQLite store: MLFLOW_TRACKING_URI=sqlite:///{folder / 'mlflow.db'} (or unset it for "
                            "./mlruns/mlflow.db); an existing file store converts with `mlflow migrate-filestore`")


def _schema_is_current(db: Path) -> bool:
    """Whether the SQLite file ``db`` holds MLflow's schema at this MLflow's revision (read-only look)."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)) as conn:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return False
    return [r[0] for r in rows] == [_latest_schema_revision()]


@functools.lru_cache(maxsize=1)
def _latest_schema_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def prepare_store(uri: str) -> None:
    """Make a new SQLite store ready before MLflow opens it: two processes creating the same store at once would both
    run MLflow's schema migrations and one would crash; here the first creates it under a file lock
    (``mlflow.db.lock`` beside it) and the others wait. Also :func:`check_store_kind`."""
    import fcntl

    from lightning_ctx.store import sqlite_path

    check_store_kind(uri)
    db = sqlite_path(uri)
    if db is None or _schema_is_current(db):
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115 - held for the block below
    except OSError as err:
        raise TrackingError(f"cannot create the MLflow store {db} ({err.strerror}); point MLFLOW_TRACKING_URI at a "
                            "writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _schema_is_current(db):
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(uri).search_experiments(max_results=1)  # the store's constructor creates the schema
            except MlflowException as err:
                raise TrackingError(f"cannot open the MLflow store {db}: {' '.join(str(err).split())}") from None


def check_store_writable(uri: str) -> None:
    """A SQLite store a run is about to be written to must be writable (checked with a write lock that is released
    at once), else one :class:`TrackingError` instead of MLflow's traceback at the first write."""
    import sqlite3

    from lightning_ctx.store import sqlite_path

    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return
    problem = None
    if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
        problem = "no write permission"
    else:
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
        except sqlite3.OperationalError as err:
            problem = str(err)
    if problem:
        raise TrackingError(f"the MLflow store {db} is read-only ({problem}), so no run can be recorded there; point "
                            "MLFLOW_TRACKING_URI at a writable store (a copy of this folder works: lightning-ctx "
                            "re-roots moved stores), or unset it for ./mlruns/mlflow.db")


def check_store_exists(uri: str, knob: str = "--tracking-uri") -> None:
    """For commands that only read runs: a SQLite store that does not exist is a mistyped path (MLflow would create
    an empty store there and report no runs)."""
    from lightning_ctx.store import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"{knob}: no MLflow store at {db} (the file does not exist); check the path, or the "
                            "folder you run from (the default store is ./mlruns/mlflow.db)")


def open_store(uri: Optional[str] = None, *, must_exist: bool = False, knob: str = "--tracking-uri") -> str:
    """The tracking URI to use (``uri``, else :func:`default_tracking_uri`), checked (a server that does not answer,
    a store kind MLflow refuses, with ``must_exist`` a SQLite file that is not there), made ready
    (:func:`prepare_store`) and with the artifact locations of a moved or copied SQLite store pointed at its folder
    (:func:`lightning_ctx.store.reroot_artifacts`)."""
    uri = uri or default_tracking_uri()
    check_tracking_reachable(uri)
    if must_exist:
        check_store_exists(uri, knob)
    prepare_store(uri)
    reroot_artifacts(uri)
    return uri


def _sqlite_dir(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with SQLite defaults; checkpoints go next to the store.

    Under DDP/FSDP the MLflow experiment and run exist on global rank 0 only (other ranks get Lightning's
    dummy experiment): every method overridden here that talks to MLflow is rank-zero-only, like the ones it
    overrides (docs/design.md, "Pitfalls we design around").

    Args mirror ``MLFlowLogger``; ``tracking_uri=None`` means :func:`default_tracking_uri`.
    """

    def __init__(self, experiment_name: str = DEFAULT_EXPERIMENT, run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
                 artifact_location: Optional[str] = None, run_id: Optional[str] = None,
                 log_model: bool = False, prefix: str = "", synchronous: Optional[bool] = None):
        uri = tracking_uri or default_tracking_uri()
        prepare_store(uri)  # every rank: MLflow opens the store in each process's logger
        if rank_zero_only.rank == 0:
            reroot_artifacts(uri)  # a moved or copied store: its artifacts stay reachable (lightning_ctx.store)
        tags = {**(tags or {}), **version_tags()}  # a new run gets them at creation (see ``experiment``)
        store = _sqlite_dir(uri)
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
            if artifact_location is None:
                artifact_location = str(store / "artifacts")
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, tags=tags,
                         save_dir=str(store) if store is not None else None, log_model=log_model, prefix=prefix,
                         artifact_location=artifact_location, run_id=run_id, synchronous=synchronous)
        self._store_dir = store
        self._versions_tagged = False

    @property
    @rank_zero_experiment
    def experiment(self):
        """The MlflowClient (rank 0 only; other ranks get Lightning's dummy). On first use the run gets the tags
        ``version/<library>`` (:func:`version_tags`); a resumed run whose versions changed keeps its original tags
        and gets the new ones as ``resumed/version/<library>``."""
        client = MLFlowLogger.experiment.fget(self)
        if not self._versions_tagged and self._run_id is not None:
            self._versions_tagged = True
            existing = client.get_run(self._run_id).data.tags
            for key, value in version_tags().items():
                if key not in existing:
                    client.set_tag(self._run_id, key, value)
                elif existing[key] != value and existing.get(f"resumed/{key}") != value:
                    client.set_tag(self._run_id, f"resumed/{key}", value)
        return client

    @property
    def save_dir(self) -> Optional[str]:
        """The store folder (checkpoints themselves go to ``<default_root_dir>/checkpoints``)."""
        if self._store_dir is not None:
            return str(self._store_dir)
        return super().save_dir

    def continue_run(self, run_id: str, progressed: Optional[Callable[[], bool]] = None) -> None:
        """Log into an existing run (a resumed fit) instead of creating a new one. ``progressed``: whether the resumed
        fit has trained a step; until it has, a failure leaves the run's status as it was (a finished run that fails
        to resume stays FINISHED, so ``compare`` still finds it)."""
        if self._experiment_id is not None and self._run_id != run_id:
            raise RuntimeError("continue_run must be called before the logger creates its run")
        self._run_id = run_id
        self._resume_progressed = progressed

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        progressed = getattr(self, "_resume_progressed", None)
        if status == "failed" and progressed is not None and not progressed():
            return  # a resume that failed before its first step: the run is left as it was
        super().finalize(status)

    @rank_zero_only
    def end_killed(self) -> None:
        """End the run KILLED (a fit stopped by SIGTERM), unless it is a resume that had not trained a step yet."""
        progressed = getattr(self, "_resume_progressed", None)
        if self.run_id and (progressed is None or progressed()):
            self.experiment.set_terminated(self.run_id, "KILLED")

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """Like MLFlowLogger's, but a resumed run may re-log params: equal ones are skipped, changed
        ones (MLflow forbids changing a param) are kept under ``resumed/<name>`` instead of crashing."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        flat = _flatten_dict(_convert_params(params))
        existing = self.experiment.get_run(self.run_id).data.params
        if not existing:
            return super().log_hyperparams(params)
        fresh = {}
        for key, value in flat.items():
            text = str(value)[:250]  # what MLFlowLogger.log_hyperparams stores
            if key not in existing:
                fresh[key] = value
            elif existing[key] != text and f"resumed/{key}" not in existing:
                fresh[f"resumed/{key}"] = value
        if fresh:
            super().log_hyperparams(fresh)


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"model.anchor_weight": 0.5, ...}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
    elif isinstance(cfg, (list, tuple)) and cfg and any(isinstance(v, (dict, list)) for v in cfg):
        for i, v in enumerate(cfg):
            out.update(flatten_config(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = cfg
    return out


# Keys that legitimately change between a run and its resumption (MLflow forbids changing a param).
_VOLATILE_KEYS = ("ckpt_path", "config", "print_config")


class MLflowConfigCallback(SaveConfigCallback):
    """Logs the resolved CLI config to every MLflow logger: flattened params + ``config.yaml`` artifact."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:  # SaveConfigCallback calls it on rank 0 only; the run exists only there
            return
        config_yaml = self.parser.dump(self.config, skip_none=False)
        import yaml

        cfg = yaml.safe_load(config_yaml)
        params = {k: v for k, v in flatten_config(cfg).items() if k.split(".")[0] not in _VOLATILE_KEYS}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.log_hyperparams({f"cfg/{k}": v for k, v in params.items()})
                artifacts = {a.path for a in logger.experiment.list_artifacts(logger.run_id)}
                # A resumed run keeps its original config.yaml and adds the one it resumed with.
                name = ("config.yaml" if "config.yaml" not in artifacts
                        else f"config_resumed_step{trainer.global_step}.yaml")
                logger.experiment.log_text(logger.run_id, config_yaml, name)


def check_tracking_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an MLflow server URI does not answer (SQLite/file stores are always local).

    A TCP connect with a short timeout, instead of MLflow's own retries, which take minutes.
    """
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise TrackingError(f"MLflow tracking server {uri} does not answer ({err}); start it, or unset "
                            f"MLFLOW_TRACKING_URI to use the local SQLite store under ./mlruns") from None
