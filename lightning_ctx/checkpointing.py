"""Checkpoint and resume: where a run's checkpoints live, what they hold, and how they are written.

A resumed run must end exactly where the uninterrupted one would: the data position comes from the
restored global step (``ResumableSampler``), the sampling RNG from the states saved here, and the
metrics go to the same MLflow run (its id is stored in the checkpoint).

* **A folder per run**: ``<checkpoint.dirpath>/<MLflow run id>/`` (``checkpoint.dirpath`` defaults to
  ``<trainer.default_root_dir>/checkpoints``), with ``run.json`` naming the run. Runs started from the same folder
  never touch each other's files, and ``--ckpt_path last`` resumes the newest run of the same run name and experiment
  (:func:`find_resumable`) from its own ``last.ckpt``.
* **Atomic writes** (:class:`AtomicCheckpointIO`): a checkpoint is written to a temporary file that replaces the target
  only when complete, so a full disk or a kill mid-write leaves the last good checkpoint loadable.
* **Preemption**: on SIGTERM Lightning stops at the next optimizer-step boundary; :class:`RunCheckpoint` saves
  ``last.ckpt`` there (a step boundary inside gradient accumulation is waited for).
* **Never a diverged checkpoint**: a save whose student weights are NaN/inf is skipped (it could only be resumed into
  the same NaNs), so ``last.ckpt`` stays the last good state.
"""

from __future__ import annotations

import datetime
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ctx.errors import DataError, WriteError
from lightning_ctx.knobs import at_least, check_class_args
from lightning_ctx.writing import atomic_file, write_text

MLFLOW_RUN_KEY = "mlflow_run_id"
RUN_KEY = "lightning_ctx_run"  # {run_id, run_name, experiment, tracking_uri}: the run the checkpoint belongs to
RNG_KEY = "rng_states"  # global rank 0's (also what a single process restores)
RNG_PER_RANK_KEY = "rng_states_per_rank"  # [rank 0's, rank 1's, ...] under a multi-process strategy
RUN_INFO = "run.json"  # in each run's checkpoint folder: which run wrote it
LAST = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


def capture_rng_states() -> dict[str, Any]:
    """Every RNG a step draws from, as tensors and plain lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- which run a checkpoint belongs to ---------------------------------------------------------------------------


@dataclass
class RunIdentity:
    """The run a checkpoint folder belongs to. ``run_name`` is the configured name (None when MLflow picked one,
    ``mlflow_run_name``); ``run_id``/``tracking_uri`` are None without an MLflow logger."""

    run_id: Optional[str] = None
    run_name: Optional[str] = None
    mlflow_run_name: Optional[str] = None
    experiment: Optional[str] = None
    tracking_uri: Optional[str] = None
    started: Optional[str] = None
    seed: Optional[int] = None  # seed_everything's seed: runs of one name that differ in seed are different runs

    @classmethod
    def of(cls, trainer) -> RunIdentity:
        """The identity of the run ``trainer`` logs to (its first MLflow logger)."""
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                name = None
                try:
                    name = logger.experiment.get_run(logger.run_id).info.run_name
                except Exception:  # noqa: BLE001 - the name is for people; the run id is what counts
                    pass
                return cls(logger.run_id, logger._run_name, name, logger._experiment_name, logger._tracking_uri)
        return cls()

    def matches(self, run_name: Optional[str], experiment: Optional[str], seed: Optional[int] = None) -> bool:
        """Whether a command configured with ``run_name``, ``experiment`` and ``seed`` continues this run (a value
        that is None on either side does not count)."""
        same_name = run_name == self.run_name or (run_name is not None and run_name == self.mlflow_run_name)
        return (same_name and (experiment is None or self.experiment is None or experiment == self.experiment)
                and (seed is None or self.seed is None or seed == self.seed))

    def describe(self) -> str:
        name = self.run_name or self.mlflow_run_name
        return f"run {self.run_id}" + (f" ('{name}')" if name else "") if self.run_id else "a run without MLflow"


def checkpoint_root(dirpath: Optional[str | os.PathLike], default_root_dir: Optional[str | os.PathLike]) -> Path:
    """The folder holding the run folders: ``checkpoint.dirpath``, else ``<trainer.default_root_dir>/checkpoints``."""
    if dirpath is None:
        dirpath = os.path.join(default_root_dir if default_root_dir is not None else os.getcwd(), "checkpoints")
    return Path(os.path.realpath(os.path.expanduser(dirpath)))


def run_folder_name(identity: RunIdentity) -> str:
    """``<run id>``, or ``run-<time>-<pid>`` for a run without an MLflow logger."""
    if identity.run_id:
        return identity.run_id
    return f"run-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"


def read_run_info(folder: str | os.PathLike) -> Optional[RunIdentity]:
    try:
        data = json.loads((Path(folder) / RUN_INFO).read_text(encoding="utf-8"))
        return RunIdentity(**{k: data.get(k) for k in RunIdentity.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class Resumable:
    """What ``--ckpt_path last`` resolved to: the newest matching run's ``last.ckpt`` (None: nothing to resume)."""

    path: Optional[Path]
    identity: Optional[RunIdentity] = None
    others: list[Path] = field(default_factory=list)  # other matching runs' last.ckpt, newest first
    legacy: Optional[Path] = None  # a last.ckpt directly in the folder (written before per-run folders)


def find_resumable(root: str | os.PathLike, run_name: Optional[str], experiment: Optional[str],
                   seed: Optional[int] = None) -> Resumable:
    """The ``last.ckpt`` that ``--ckpt_path last`` resumes: of the runs under ``root`` with this run name (None: runs
    whose name MLflow chose), experiment and seed (None: any), the one whose ``last.ckpt`` is newest."""
    root = Path(root)
    legacy = root / LAST
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            last = folder / LAST
            identity = read_run_info(folder) if last.is_file() else None
            if identity is not None and identity.matches(run_name, experiment, seed):
                found.append((last.stat().st_mtime, last, identity))
    found.sort(key=lambda t: t[0], reverse=True)
    if not found:
        return Resumable(None, legacy=legacy if legacy.is_file() else None)
    return Resumable(found[0][1], found[0][2], [p for _, p, _ in found[1:]])


def _problem(path: Path) -> tuple[Optional[str], Optional[dict]]:
    """``(why the file is not a usable checkpoint, None)`` or ``(None, the checkpoint)``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror})", None
    if not head:
        return "the file is empty (0 bytes)", None
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "not a checkpoint file (a checkpoint is the zip archive torch.save writes)", None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged archive
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        return f"truncated or damaged ({first[:120]})", None
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "global_step" in ckpt):
        return "not a Lightning checkpoint (no state_dict / global_step)", None
    return None, ckpt


def other_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The other readable ``.ckpt`` files in ``path``'s folder, newest first (what to resume from instead)."""
    path = Path(path)
    try:
        files = [p for p in path.parent.glob(f"*{ModelCheckpoint.FILE_EXTENSION}") if p != path and p.is_file()]
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    return [p for p in files if _problem(p)[0] is None]


def load_checkpoint_meta(path: str | os.PathLike, knob: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors memory-mapped, nothing unpickled beyond tensors and primitives), or one
    :class:`DataError` naming the file and what is wrong with it (a folder, an empty, truncated or foreign file) and
    the newest readable checkpoint beside it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError("checkpoint does not exist", path=path, field=knob)
    if path.is_dir():
        raise DataError("is a folder; give a checkpoint file (.ckpt), or 'last' for the newest checkpoint of this "
                        "run", path=path, field=knob)
    why, ckpt = _problem(path)
    if why is not None:
        others = other_checkpoints(path)
        hint = f"; the newest readable checkpoint beside it: --{knob} {others[0]}" if others else ""
        raise DataError(why + hint, path=path, field=knob)
    return ckpt


def checkpoint_identity(ckpt: dict) -> RunIdentity:
    """The run a loaded checkpoint belongs to (checkpoints before per-run folders hold the MLflow run id only)."""
    info = ckpt.get(RUN_KEY)
    if isinstance(info, dict):
        return RunIdentity(**{k: info.get(k) for k in RunIdentity.__dataclass_fields__})
    return RunIdentity(run_id=ckpt.get(MLFLOW_RUN_KEY))


# -- writing --------------------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, renamed over it when complete (streamed to disk, not
    buffered in memory first as Lightning's is). A failed write raises :class:`WriteError`; the target is untouched."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as fh:
            torch.save(checkpoint, fh)


def use_atomic_checkpoint_io(trainer) -> None:
    """Replace the strategy's plain ``TorchCheckpointIO`` (the default) by :class:`AtomicCheckpointIO`; other
    checkpoint IO plugins (async, sharded, remote) are left alone."""
    strategy = trainer.strategy
    io = getattr(strategy, "_checkpoint_io", None)
    if io is None or type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def weights_are_finite(trainer, pl_module) -> bool:
    """Whether every trainable weight of ``pl_module`` is finite, agreed by all ranks (each checks its shard)."""
    ok = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters() if p.requires_grad)
    return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with resume-friendly defaults: every N steps plus ``last.ckpt``, in the run's own folder.

    ``dirpath``: where the run folders go (None: ``<trainer.default_root_dir>/checkpoints``); this run writes to
    ``<dirpath>/<MLflow run id>/`` (``run-<time>-<pid>`` without an MLflow logger), a resumed run to its own folder
    again. Besides Lightning's saves: ``last.ckpt`` at the step boundary where a SIGTERM stops the run, and no save of
    non-finite weights (see the module docstring).
    """

    KNOB_CHECKS = (at_least("every_n_train_steps", 0), at_least("save_top_k", -1))

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: int = 50, save_last: bool = True,
                 save_top_k: int = 1, filename: str = "step{step:06d}", **kwargs):
        check_class_args(RunCheckpoint, locals(), "checkpoint.")
        super().__init__(dirpath=None, every_n_train_steps=every_n_train_steps, save_last=save_last,
                         save_top_k=save_top_k, filename=filename, auto_insert_metric_name=False, **kwargs)
        self.root = dirpath
        self.resume_folder: Optional[str] = None  # set by the CLI: the folder of a resumed run without MLflow
        self.identity: Optional[RunIdentity] = None
        self.nonfinite_at: Optional[int] = None  # the step whose save was skipped for non-finite weights
        self._sigterm_deferred = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        use_atomic_checkpoint_io(trainer)
        if trainer.is_global_zero and stage == "fit" and self.dirpath is None:
            self.identity = RunIdentity.of(trainer)
            self.identity.started = f"{datetime.datetime.now():%Y-%m-%dT%H:%M:%S}"
            seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything
            self.identity.seed = int(seed) if seed is not None and seed.lstrip("-").isdigit() else None
            root = checkpoint_root(self.root, trainer.default_root_dir)
            folder = root / run_folder_name(self.identity)
            resumed = Path(self.resume_folder) if self.resume_folder else None
            if resumed is not None and (not self.identity.run_id or resumed.name == self.identity.run_id):
                folder = resumed  # a resumed run goes on writing into its own folder, wherever that is
            self.dirpath = str(folder)
        super().setup(trainer, pl_module, stage)  # broadcasts rank 0's folder
        if self.identity is not None and not (Path(self.dirpath) / RUN_INFO).exists():
            write_text(Path(self.dirpath) / RUN_INFO, json.dumps(self.identity.__dict__, indent=1) + "\n")

    # -- no checkpoint of diverged weights -----------------------------------------------------------------
    def _weights_ok(self, trainer) -> bool:
        if weights_are_finite(trainer, trainer.lightning_module):
            return True
        if self.nonfinite_at != trainer.global_step:
            self.nonfinite_at = trainer.global_step
            rank_zero_warn(f"step {trainer.global_step}: the student's weights are NaN/inf; no checkpoint written "
                           f"(the last good one: {self.last_good or 'none'})")
        return False

    @property
    def last_good(self) -> Optional[str]:
        """The newest checkpoint this callback wrote (every one it writes holds finite weights)."""
        paths = [p for p in (self.last_model_path, self.best_model_path) if p and os.path.isfile(p)]
        return max(paths, key=os.path.getmtime) if paths else None

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.save_top_k != 0 and self._weights_ok(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.save_last and self._weights_ok(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except WriteError as err:
            good = self.last_good
            raise err.with_hint(f"the last good checkpoint is {good}: free space there, then resume with "
                                "--ckpt_path last" if good else "no checkpoint of this run was written before; free "
                                "space there (or set checkpoint.dirpath elsewhere) and start again") from None

    # -- preemption: SIGTERM -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.hold_sigterm_until_step_boundary(trainer)

    def hold_sigterm_until_step_boundary(self, trainer) -> None:
        """Lightning stops right after ``on_train_batch_end`` when a SIGTERM came. Inside gradient accumulation that
        would lose the step's accumulated gradients (the resume would not be exact): hide the signal from Lightning
        until the batch that completes the optimizer step."""
        connector = trainer._signal_connector
        accumulating = trainer.fit_loop.epoch_loop._should_accumulate()
        if connector.received_sigterm and accumulating:
            connector.received_sigterm, self._sigterm_deferred = False, True
        elif self._sigterm_deferred and not accumulating:
            connector.received_sigterm, self._sigterm_deferred = True, False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        from lightning.pytorch.trainer.states import TrainerFn
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if (isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING
                and not trainer.sanity_checking and self._last_global_step_saved != trainer.global_step):
            candidates = self._monitor_candidates(trainer)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
            elif self._weights_ok(trainer):
                self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
            if self._last_global_step_saved == trainer.global_step:
                rank_zero_info(f"SIGTERM: saved step {trainer.global_step} to {self._last_checkpoint_saved}")


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_states`, in global rank order (a collective: every rank must call it).

    Only rank 0 writes the checkpoint, but ``on_save_checkpoint`` runs on every rank, so the states are
    gathered there. A single process gets a one-element list.
    """
    import torch.distributed as dist

    states = capture_rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [states]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered


def rng_states_for_rank(checkpoint: dict, rank: int, world_size: int) -> tuple[Optional[dict[str, Any]], str]:
    """``(states, why)``: the RNG states rank ``rank`` restores from ``checkpoint``.

    Each rank gets its own when the checkpoint was written by as many ranks as resume it; with another number of
    ranks none are restored (``why`` says so; each rank keeps its fresh, rank-offset seed). Checkpoints written
    before per-rank states existed hold rank 0's only: a single process restores them.
    """
    per_rank = checkpoint.get(RNG_PER_RANK_KEY)
    if per_rank is not None and len(per_rank) == world_size:
        return per_rank[rank], ""
    saved = len(per_rank) if per_rank is not None else (1 if RNG_KEY in checkpoint else 0)
    if saved == 0:
        return None, "the checkpoint holds no RNG states"
    if world_size == 1 and saved == 1:
        return (per_rank[0] if per_rank is not None else checkpoint[RNG_KEY]), ""
    return None, (f"the checkpoint holds the RNG states of {saved} rank(s) and {world_size} resume it: sampling "
                  f"noise after the resume is not the uninterrupted run's")


def add_run_state(checkpoint: dict, skipped_steps: int, loggers, identity: Optional[RunIdentity] = None) -> None:
    """What a checkpoint needs beyond Lightning's: no teacher weights (rebuilt from their source on load), the
    skipped-step count, every rank's RNG states, the MLflow run id (a resumed run continues the same run) and the
    run's identity (:class:`RunIdentity`: which run ``--ckpt_path`` continues).

    Called on every rank (``on_save_checkpoint``): gathering the RNG states is a collective.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith("teacher.")]:
        del state[key]
    checkpoint["skipped_steps"] = skipped_steps
    per_rank = gather_rng_states()
    checkpoint[RNG_KEY] = per_rank[0]
    checkpoint[RNG_PER_RANK_KEY] = per_rank
    run_ids = [lg.run_id for lg in loggers if isinstance(lg, MLFlowLogger)]
    if run_ids:
        checkpoint[MLFLOW_RUN_KEY] = run_ids[0]
    if identity is not None:
        checkpoint[RUN_KEY] = dict(identity.__dict__)


def run_checkpoint(trainer) -> Optional[RunCheckpoint]:
    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, RunCheckpoint)), None)


def save_beside_checkpoints(trainer, filename: str) -> str:
    """Save the trainer's current state as ``filename`` next to the periodic checkpoints; returns the path."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    folder = callbacks[0].dirpath if callbacks else trainer.default_root_dir
    path = os.path.join(folder, filename)
    trainer.save_checkpoint(path)
    return path
