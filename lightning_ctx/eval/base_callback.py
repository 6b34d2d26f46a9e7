"""``EvaluationCallback``: when an evaluation runs inside a Trainer, and what is logged, kept and uploaded.

The base of :class:`~lightning_ctx.eval.callback.ContextRemovabilityCallback` and
:class:`~lightning_ctx.tasks.games.callback.GameEvalCallback`. A subclass says what one evaluation is
(:meth:`~EvaluationCallback.evaluate`), what its references are (:meth:`~EvaluationCallback.measure_references`),
which tables it writes (:meth:`~EvaluationCallback.write_tables`) and which
:class:`~lightning_ctx.eval.registry.MetricRegistry` holds its metrics; the base:

* **schedules**: during ``fit`` at step 0 before training (``eval_at_start``: the first point of the curves),
  every ``every_n_steps`` optimizer steps (``None``: after each of the trainer's own validation loops; 0: only
  at the start and the end) and at the end of fit (``eval_at_end``; skipped when that step was just evaluated);
  on ``validate`` (``split``) and ``test`` (``test_split``, metrics under ``test_prefix``);
* **isolates the RNG**: each evaluation runs in a forked RNG seeded with ``seed + rank``
  (:func:`~lightning_ctx.eval.evaluator.seeded_rng`), so the training's sampling is the same with or without it;
* **logs** ``{prefix}{name}`` to every logger at the global step and into ``trainer.callback_metrics`` (every
  rank computes the same values from the rows gathered from every rank), prints the registry's summary line
  with the intervals (rank 0), and the references once per split (``ref/{name}``; ``ref/{split}/{name}`` for
  another split);
* **keeps** its history, references and last evaluated step in the checkpoint (a resumed run continues the curves);
* **uploads** (rank 0; MLflow loggers through ``log_artifact``, loggers with a ``log_dir`` get copies there) the
  subclass's per-step tables under ``{base}/step_NNNNNN/`` (``{base}/validate_step_NNNNNN/`` on validate),
  ``{base}/curves.png`` (the registry's curve metrics, their intervals as bands) and ``{base}/hidden_cos.png``
  (``base`` = the prefix without its slash).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ctx.errors import ConfigError
from lightning_ctx.eval.artifacts import plot_curves, plot_hidden_cos
from lightning_ctx.eval.evaluator import gather_objects, seeded_rng
from lightning_ctx.eval.intervals import DEFAULT_RESAMPLES
from lightning_ctx.eval.registry import MetricRegistry, import_metric_modules
from lightning_ctx.knobs import at_least

__all__ = ["EvaluationCallback", "Evaluation", "check_unsharded", "upload_artifacts"]


@dataclass
class Evaluation:
    """One evaluation: unprefixed ``metrics`` (the same on every rank), how many items it measured, and what the
    subclass's :meth:`~EvaluationCallback.write_tables` writes (every rank's rows)."""

    metrics: dict[str, float]
    n_items: int
    tables: dict[str, Any] = field(default_factory=dict)


class EvaluationCallback(Callback):
    """Scheduling, RNG isolation, logging, state and artifacts of an evaluation (see the module docstring).

    Args:
        every_n_steps: evaluate every N optimizer steps during fit; ``None`` = after each of the
            trainer's validation loops instead (``val_check_interval``); 0 = only at the start and the end.
        eval_at_start: also evaluate at step 0, before training (the first point of the curves).
        eval_at_end: evaluate at the end of fit (skipped when the last step was just evaluated).
        split: split evaluated during fit and ``validate`` (``val``); ``test_split`` on ``test``.
        batch_size: prompts (or games) decoded together (None = the data module's ``eval_batch_size``).
        max_new_tokens: decoding budget per response (None = the module's ``max_new_tokens``).
        seed: seed of the evaluation's sampling and of the intervals' bootstrap (the training RNG is left
            untouched).
        n_resamples: bootstrap resamples of the 95% intervals over items logged beside each metric
            (``{name}_lo``, ``{name}_hi``); 0 = no intervals.
        log_references: log the references (``ref/*``) once per split.
        log_artifacts: upload the per-example tables and the plots (rank 0).
        prefix / test_prefix: metric name prefixes (``eval/`` and ``test/``).
        progress: a progress bar (rank 0) and a one-line summary after each evaluation.
        metric_modules: Python modules to import first: they register more metrics
            (``lightning_ctx.eval.registry``), computed, logged and plotted like the built-in ones.
    """

    KNOB_CHECKS = (at_least("every_n_steps", 0), at_least("batch_size", 1), at_least("max_new_tokens", 1),
                   at_least("n_resamples", 0))
    #: The metrics this evaluation computes and their roles.
    registry: ClassVar[MetricRegistry]
    #: What an item is, in the summary line.
    unit: ClassVar[str] = "items"
    #: References drawn as horizontal lines on the curves' fraction panel.
    curve_references: ClassVar[tuple[str, ...]] = ()

    def __init__(self, every_n_steps: Optional[int] = 50, eval_at_start: bool = True, eval_at_end: bool = True,
                 split: str = "val", test_split: str = "test", batch_size: Optional[int] = None,
                 max_new_tokens: Optional[int] = None, seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES,
                 log_references: bool = True, log_artifacts: bool = True, prefix: str = "eval/",
                 test_prefix: str = "test/", progress: bool = True, metric_modules: Optional[list[str]] = None):
        super().__init__()
        self.every_n_steps, self.eval_at_start, self.eval_at_end = every_n_steps, eval_at_start, eval_at_end
        self.split, self.test_split = split, test_split
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.seed, self.n_resamples = seed, n_resamples
        self.log_references, self.log_artifacts = log_references, log_artifacts
        self.prefix, self.test_prefix, self.progress = prefix, test_prefix, progress
        self.metric_modules = list(metric_modules or [])
        import_metric_modules(self.metric_modules)
        # state (saved in checkpoints)
        self.history: list[dict] = []  # [{"step", "prefix", "metrics"}] of the fit evaluations, in order
        self.references: dict[str, dict[str, float]] = {}  # split -> {"teacher_acc_ctx": ..., ...}
        self._last_eval: Optional[tuple[str, int]] = None
        self._refs_logged: set[str] = set()
        self._warned: set[str] = set()

    # -- what a subclass provides ------------------------------------------------------------------
    def check_setup(self, trainer, pl_module, split: str) -> None:
        """Raise before anything runs when ``split`` cannot be evaluated."""

    def measure_references(self, trainer, pl_module, split: str, before_training: bool) -> Optional[dict[str, float]]:
        """The references of ``split`` (logged once as ``ref/*``), or None when there are none."""
        return None

    def evaluate(self, trainer, pl_module, split: str, prefix: str, step: int) -> Optional[Evaluation]:
        """One evaluation of the student on ``split`` (every rank takes part; None = nothing to evaluate)."""
        raise NotImplementedError

    def write_tables(self, folder: Path, evaluation: Evaluation, *, stage: str, prefix: str, step: int,
                     split: str) -> list[Path]:
        """Write one evaluation's per-item tables into ``folder`` (rank 0); uploaded under the step's folder."""
        return []

    # -- helpers for subclasses ----------------------------------------------------------------------
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @staticmethod
    def gather(obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
        return gather_objects(obj)

    def stage_split(self, stage: str) -> tuple[str, str]:
        """The split and the metric prefix of ``stage`` (``fit``, ``validate``, ``test``)."""
        return (self.test_split, self.test_prefix) if stage == "test" else (self.split, self.prefix)

    def ref_prefix(self, split: str) -> str:
        """``ref/`` for the main split, ``ref/<split>/`` for another (e.g. the test split)."""
        return "ref/" if split == self.split else f"ref/{split}/"

    def log_metrics(self, trainer, metrics: dict[str, float], step: int) -> None:
        """``metrics`` at ``step`` to every logger; a logger refusing NaN/inf gets the finite values only."""
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:
                finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
                if len(finite) == len(metrics):
                    raise
                self.warn_once(f"nan:{type(logger).__name__}",
                               f"{type(logger).__name__} refused non-finite metrics ({err}); logging finite ones only")
                logger.log_metrics(finite, step=step)
        for logger in trainer.loggers:
            if hasattr(logger, "save"):
                logger.save()

    # -- one scheduled evaluation ------------------------------------------------------------------
    def _ensure_references(self, trainer, pl_module, split: str, before_training: bool) -> None:
        if split not in self.references:
            with seeded_rng(pl_module.device, self.seed + int(trainer.global_rank)):
                refs = self.measure_references(trainer, pl_module, split, before_training)
            if refs is None:
                return
            self.references[split] = refs
        prefix = self.ref_prefix(split)
        self.log_metrics(trainer, {f"{prefix}{k}": v for k, v in self.references[split].items()},
                         int(trainer.global_step))
        self._refs_logged.add(split)

    def run(self, trainer, pl_module, stage: str) -> Optional[Evaluation]:
        """Evaluate now (``stage``: ``fit``, ``validate`` or ``test``), log, keep and upload."""
        split, prefix = self.stage_split(stage)
        step = int(trainer.global_step)
        if stage == "fit" and self._last_eval == (prefix, step):  # e.g. end of fit right after a scheduled one
            return None
        if self.log_references and split not in self._refs_logged:
            self._ensure_references(trainer, pl_module, split, before_training=stage == "fit" and step == 0)
        with seeded_rng(pl_module.device, self.seed + int(trainer.global_rank)):
            evaluation = self.evaluate(trainer, pl_module, split, prefix, step)
        if evaluation is None:
            return None
        metrics = evaluation.metrics
        if stage == "fit":
            self._last_eval = (prefix, step)
            self.history.append({"step": step, "prefix": prefix, "metrics": dict(metrics)})
        self.log_metrics(trainer, {f"{prefix}{k}": v for k, v in metrics.items()}, step)
        for k, v in metrics.items():
            trainer.callback_metrics[f"{prefix}{k}"] = torch.tensor(v)
        if trainer.is_global_zero:
            if self.progress:
                rank_zero_info(f"[{prefix}step {step}, {split}, {evaluation.n_items} {self.unit}] "
                               + self.registry.summary_line(metrics))
            if self.log_artifacts:
                self.publish(trainer, evaluation, stage=stage, prefix=prefix, step=step, split=split)
        return evaluation

    def publish(self, trainer, evaluation: Evaluation, *, stage: str, prefix: str, step: int, split: str) -> None:
        """Write one evaluation's tables and plots to a temporary folder and upload them."""
        tmp = Path(tempfile.mkdtemp(prefix="lightning_ctx_eval_"))
        try:
            base = prefix.rstrip("/") or "eval"
            step_dir = f"{base}/{'validate_' if stage == 'validate' else ''}step_{step:06d}"
            files = [(p, step_dir) for p in self.write_tables(tmp, evaluation, stage=stage, prefix=prefix,
                                                               step=step, split=split)]
            history = [h for h in self.history if h["prefix"] == prefix] if stage == "fit" else []
            if history:
                refs = {k: v for k, v in self.references.get(split, {}).items() if k in self.curve_references}
                files.append((plot_curves(tmp / "curves.png", history, self.registry, refs,
                                          title=f"{self.registry.name} ({split})"), base))
            if any(k.startswith("hidden_cos/layer_") for k in evaluation.metrics):
                layers = history or [{"step": step, "metrics": evaluation.metrics}]
                files.append((plot_hidden_cos(tmp / "hidden_cos.png", layers), base))
            upload_artifacts(trainer.loggers, files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Fail before training when the evaluated split cannot be evaluated."""
        if stage not in ("fit", "validate", "test"):
            return
        check_unsharded(trainer, type(self).__name__)
        self.check_setup(trainer, pl_module, self.stage_split(stage)[0])

    def on_train_start(self, trainer, pl_module) -> None:
        if self.log_references and self.split not in self._refs_logged:
            self._ensure_references(trainer, pl_module, self.split, before_training=trainer.global_step == 0)
        if self.eval_at_start and trainer.global_step == 0:
            self.run(trainer, pl_module, "fit")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_steps, trainer.global_step
        if n and step > 0 and step % n == 0:
            self.run(trainer, pl_module, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if fn == "fit" and self.every_n_steps is None:
            self.run(trainer, pl_module, "fit")
        elif fn == "validate":
            self.run(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self.run(trainer, pl_module, "test")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.eval_at_end:
            self.run(trainer, pl_module, "fit")

    # -- checkpoint state --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "references": self.references,
                "last_eval": list(self._last_eval) if self._last_eval else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.references = {s: dict(v) for s, v in state_dict.get("references", {}).items()}
        last = state_dict.get("last_eval")
        self._last_eval = tuple(last) if last else None


def check_unsharded(trainer, name: str = "the evaluation callback") -> None:
    """The evaluation decodes with the student's weights outside the training forward, and each rank decodes its
    own shard of the items (different numbers of forwards): with weights sharded over ranks (FSDP) every forward
    is a collective, so it would hang. Refused before anything runs, with what to do instead."""
    from lightning_ctx.distributed import is_sharded

    if is_sharded(trainer) and trainer.world_size > 1:
        raise ConfigError(f"{name} does not run with weights sharded over ranks (FSDP with "
                          f"{trainer.world_size} ranks): train under FSDP without it, then evaluate the checkpoint "
                          "with `lightning-ctx validate --ckpt_path ...` under DDP or on one device "
                          "(--trainer.strategy ddp)", field="trainer.strategy")


def upload_artifacts(loggers, files: list[tuple[Path, str]]) -> None:
    """MLflow loggers get ``files`` through ``log_artifact``; loggers with a ``log_dir`` get copies there."""
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            for path, artifact_path in files:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)
        elif getattr(logger, "log_dir", None):
            for path, artifact_path in files:
                dest = Path(logger.log_dir) / artifact_path
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / path.name)
