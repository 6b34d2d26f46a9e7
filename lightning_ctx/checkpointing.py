"""Checkpoint and resume: RNG states, the MLflow run to continue, and where checkpoints live.

A resumed run must end exactly where the uninterrupted one would: the data position comes from the
restored global step (``ResumableSampler``), the sampling RNG from the states saved here, and the
metrics go to the same MLflow run (its id is stored in the checkpoint).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ctx.knobs import at_least, check_class_args

MLFLOW_RUN_KEY = "mlflow_run_id"
RNG_KEY = "rng_states"  # global rank 0's (also what a single process restores)
RNG_PER_RANK_KEY = "rng_states_per_rank"  # [rank 0's, rank 1's, ...] under a multi-process strategy


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


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with resume-friendly defaults: every N steps, plus ``last.ckpt``.

    ``dirpath=None`` means ``<trainer.default_root_dir>/checkpoints`` (the CLI fills it in before fit,
    so ``--ckpt_path last`` finds the file without knowing the MLflow run id).
    """

    KNOB_CHECKS = (at_least("every_n_train_steps", 0), at_least("save_top_k", -1))

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: int = 50, save_last: bool = True,
                 save_top_k: int = 1, filename: str = "step{step:06d}", **kwargs):
        check_class_args(RunCheckpoint, locals(), "checkpoint.")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_last=save_last,
                         save_top_k=save_top_k, filename=filename, auto_insert_metric_name=False, **kwargs)

    def set_default_dirpath(self, root: str | os.PathLike) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(root, "checkpoints"))


def find_last_checkpoint(dirpath: str | os.PathLike) -> Optional[Path]:
    path = Path(dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    return path if path.exists() else None


def read_mlflow_run_id(ckpt_path: str | os.PathLike) -> Optional[str]:
    """The MLflow run a checkpoint belongs to (safe load: tensors and primitives only)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return ckpt.get(MLFLOW_RUN_KEY)


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


def add_run_state(checkpoint: dict, skipped_steps: int, loggers) -> None:
    """What a checkpoint needs beyond Lightning's: no teacher weights (rebuilt from their source on load), the
    skipped-step count, every rank's RNG states and the MLflow run id (a resumed run continues the same run).

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


def save_beside_checkpoints(trainer, filename: str) -> str:
    """Save the trainer's current state as ``filename`` next to the periodic checkpoints; returns the path."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    folder = callbacks[0].dirpath if callbacks else trainer.default_root_dir
    path = os.path.join(folder, filename)
    trainer.save_checkpoint(path)
    return path
