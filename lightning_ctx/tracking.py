"""MLflow defaults: a local SQLite store under ``./mlruns/`` (no server), config as params + artifact.

``MLFLOW_TRACKING_URI`` overrides the store. Lightning's own ``MLFlowLogger()`` defaults to the file
store (which MLflow 3 refuses) and LightningCLI's ``SaveConfigCallback`` asserts on a logger without a
``save_dir``; both are handled here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_STORE_DIR = "mlruns"
DEFAULT_EXPERIMENT = "lightning-ctx"


def default_tracking_uri(store_dir: str | Path = DEFAULT_STORE_DIR) -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<abs>/mlruns/mlflow.db`` (the folder is created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _sqlite_dir(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with SQLite defaults; checkpoints go next to the store.

    Args mirror ``MLFlowLogger``; ``tracking_uri=None`` means :func:`default_tracking_uri`.
    """

    def __init__(self, experiment_name: str = DEFAULT_EXPERIMENT, run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
                 artifact_location: Optional[str] = None, run_id: Optional[str] = None,
                 log_model: bool = False, prefix: str = "", synchronous: Optional[bool] = None):
        uri = tracking_uri or default_tracking_uri()
        store = _sqlite_dir(uri)
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
            if artifact_location is None:
                artifact_location = str(store / "artifacts")
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, tags=tags,
                         save_dir=str(store) if store is not None else None, log_model=log_model, prefix=prefix,
                         artifact_location=artifact_location, run_id=run_id, synchronous=synchronous)
        self._store_dir = store

    @property
    def save_dir(self) -> Optional[str]:
        """Where Lightning puts checkpoints: ``<store>/<experiment_id>/<run_id>/checkpoints``."""
        if self._store_dir is not None:
            return str(self._store_dir)
        return super().save_dir


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
        config_yaml = self.parser.dump(self.config, skip_none=False)
        import yaml

        cfg = yaml.safe_load(config_yaml)
        params = {k: v for k, v in flatten_config(cfg).items() if k.split(".")[0] not in _VOLATILE_KEYS}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.log_hyperparams({f"cfg/{k}": v for k, v in params.items()})
                logger.experiment.log_text(logger.run_id, config_yaml, "config.yaml")
