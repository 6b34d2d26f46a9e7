"""``--ckpt_path``: which checkpoint, which run it continues, and which of this command's ``--model.*`` values apply.

* ``last`` is the newest ``last.ckpt`` of this command's run (same run name, experiment and seed) under the checkpoint
  folder (:func:`lightning_ctx.checkpointing.find_resumable`); the path is fixed here once, so Lightning restores the
  very checkpoint whose MLflow run is continued. Nothing to resume: a new run starts, as Lightning does.
* A file is checked before anything is built: a folder, an empty, truncated or foreign file is one line naming it.
* The checkpoint's model hyperparameters are the run's; a value this command sets explicitly (command line or config
  file) that differs is applied when it may change mid-run (:data:`OnPolicyDistillation.RESUME_ADJUSTABLE`: learning
  rate, loss weights, ``on_nonfinite``, and knobs that change memory or speed only) and said so; any other difference
  is refused, each one named.
* The MLflow run is continued only if the store holds it (not another store's, not deleted); a resume that fails
  before its first step leaves the run's status as it was (:meth:`MLflowLogger.continue_run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_info

from lightning_ctx.checkpointing import (
    RunCheckpoint,
    RunIdentity,
    checkpoint_identity,
    checkpoint_root,
    find_resumable,
    load_checkpoint_meta,
)
from lightning_ctx.cli.locate import locate_key
from lightning_ctx.errors import DataError
from lightning_ctx.module import OnPolicyDistillation
from lightning_ctx.tracking import MLflowLogger, TrackingError

MLFLOW_LOGGERS = ("MLflowLogger", "MLFlowLogger")


@dataclass
class Resume:
    """The checkpoint a command resumes from and the run it belongs to."""

    path: Path
    step: int
    identity: RunIdentity


def _plain(value: Any) -> Any:
    """Config values as plain data (jsonargparse Namespaces as dicts) for comparison."""
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def configured_run(cfg) -> tuple[Optional[str], Optional[str]]:
    """``(run_name, experiment_name)`` of the first MLflow logger in the config (``(None, None)`` without one)."""
    loggers = cfg.get("trainer", {}).get("logger") if cfg.get("trainer") is not None else None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        path = str(getattr(logger, "class_path", "") or "")
        if path.rsplit(".", 1)[-1] in MLFLOW_LOGGERS:
            args = logger.get("init_args") or {}
            return args.get("run_name"), args.get("experiment_name")
    return None, None


def resolve_ckpt_path(cfg, subcommand: str) -> Optional[Path]:
    """The checkpoint file ``--ckpt_path`` means (None: ``last`` found nothing, so a new run starts)."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path).expanduser()
    trainer = cfg.get("trainer") or {}
    checkpoint = cfg.get("checkpoint") or {}
    root = checkpoint_root(checkpoint.get("dirpath"), trainer.get("default_root_dir"))
    run_name, experiment = configured_run(cfg)
    seed = cfg.get("seed_everything")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None  # true: a random seed, not known yet
    found = find_resumable(root, run_name, experiment, seed)
    who = (f"run '{run_name}'" if run_name else "a run without a run name") + (f" with seed {seed}" if seed is not None
                                                                              else "")
    if found.path is None:
        legacy = (f"; {found.legacy} was written before checkpoints had a folder per run: resume it with "
                  f"--ckpt_path {found.legacy}" if found.legacy else "")
        if subcommand != "fit":
            raise DataError(f"no checkpoint of {who} under {root}{legacy}", field="ckpt_path")
        rank_zero_info(f"--ckpt_path last: no checkpoint of {who} under {root}{legacy}; starting a new run")
        return None
    if found.others:
        rank_zero_info(f"--ckpt_path last: {len(found.others) + 1} runs match ({who}); resuming the newest, "
                       f"{found.path} (another: --ckpt_path {found.others[0]})")
    return found.path


def merge_model_config(hparams: dict, model_cfg, argv: list[str], ckpt_path: Path) -> tuple[dict, list[str]]:
    """The model config of a resumed run: the checkpoint's hyperparameters, except the values this command sets
    explicitly that may change mid-run. Returns ``(values, changes)``; a difference that may not change raises one
    :class:`DataError` naming every one."""
    merged, changes, conflicts = {}, [], []
    current = _plain(model_cfg)
    for key, saved in hparams.items():
        if key.startswith("_") or key not in current:
            continue  # Lightning's bookkeeping, or a knob that no longer exists
        mine = current[key]
        if _plain(saved) == mine or locate_key(f"model.{key}", argv) is None:
            merged[key] = saved  # the run's own value (this command does not set it)
        elif key in OnPolicyDistillation.RESUME_ADJUSTABLE:
            merged[key] = mine
            changes.append(f"model.{key}={mine!r} (was {_plain(saved)!r})")
        else:
            conflicts.append(f"model.{key} is {mine!r} here but {_plain(saved)!r} in the checkpoint")
    if conflicts:
        adjustable = ", ".join(sorted(OnPolicyDistillation.RESUME_ADJUSTABLE))
        raise DataError(f"cannot resume with other model settings: {'; '.join(conflicts)}. Drop them to resume the "
                        f"run as it was (only {adjustable} may change), or start a new run from its weights: "
                        f"lightning-ctx export --ckpt {ckpt_path} --out DIR, then --model.student DIR",
                        path=ckpt_path, field="ckpt_path")
    return merged, changes


def read_resume(path: Path) -> tuple[Resume, dict]:
    """The checked checkpoint at ``path`` and its model hyperparameters."""
    ckpt = load_checkpoint_meta(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    return Resume(path, int(ckpt.get("global_step", 0)), checkpoint_identity(ckpt)), hparams


def continue_tracking(trainer, resume: Resume) -> None:
    """Point the MLflow loggers at the checkpoint's run (checked to exist and be active in their store) and the run's
    checkpoint callback at its folder."""
    from mlflow.exceptions import MlflowException

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, RunCheckpoint):
            cb.resume_folder = str(resume.path.parent)
    run_id = resume.identity.run_id
    if not run_id:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, MLflowLogger):
            continue
        uri = logger._tracking_uri
        elsewhere = (f" (the checkpoint was written with MLFLOW_TRACKING_URI={resume.identity.tracking_uri})"
                     if resume.identity.tracking_uri and resume.identity.tracking_uri != uri else "")
        try:
            run = logger._mlflow_client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"{resume.path}: its MLflow run {run_id} is not in the store {uri}{elsewhere}; point "
                                "MLFLOW_TRACKING_URI at the store that holds it, or start a new run from the "
                                f"checkpoint's weights (lightning-ctx export --ckpt {resume.path})") from None
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"{resume.path}: its MLflow run {run_id} was deleted from {uri}; restore it "
                                f"(MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {run_id}) to resume it")
        logger.continue_run(run_id, progressed=lambda: trainer.global_step > resume.step)
