"""The context-removability evaluation inside a Trainer (docs/design.md, "Metrics").

``ContextRemovabilityCallback`` schedules :class:`~lightning_ctx.eval.evaluator.Evaluator` runs on the
**student**, logs the metrics to every logger as ``{prefix}{name}`` (``eval/harm``) at the global step
(the sampled variants as ``{prefix}sampled/{name}``), and uploads the artifacts of
:mod:`lightning_ctx.eval.artifacts`. References are logged once: ``ref/teacher_acc_ctx`` (teacher,
greedy, with context) and ``ref/initial_acc_no_ctx`` (the initial model without context), plus
``ref/teacher_len_ctx``, ``ref/initial_len_no_ctx`` and ``ref/initial_other_ctx_acc``.

When it runs: during ``fit`` at step 0 before training (``eval_at_start``, logged at step 0: the first
point of the curves), every ``every_n_steps`` optimizer steps (``None``: after each of the trainer's own
validation loops) and at the end of training; on ``validate`` (split ``split``) and ``test`` (split
``test_split``, metric prefix ``test_prefix``). Every rank decodes its shard of the items; the
torchmetrics states sync across DDP ranks on ``compute()``; only global rank 0 writes artifacts.

Artifacts (rank 0, per evaluation; MLflow loggers get them through ``log_artifact``, loggers with a
``log_dir`` get copies there): ``{prefix}step_000050/examples.json`` and ``examples.html``,
``{prefix}curves.png`` and ``{prefix}hidden_cos.png``.

The initial model (reference for ``ref/initial_*`` and the per-item retention reference) always has the
initial student's unquantized weights: the teacher when the teacher is the frozen initial student in full
precision (``model.teacher: null``); else the student itself, measured before the first training step
(``on_train_start`` of a fresh fit); with a 4/8-bit self-teacher and training already started, the initial
weights re-loaded (see ``initial_model``); with a separate teacher and training started it is unavailable
and those references are skipped (``retention`` is then NaN, ``other_ctx_acc`` is still logged).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.data.records import DataError, TaskRecord, load_jsonl
from lightning_ctx.eval.artifacts import write_eval_artifacts
from lightning_ctx.eval.decoding import as_record
from lightning_ctx.eval.evaluator import EvalResult, EvalSettings, Evaluator, References, Sharding, resolve_layers
from lightning_ctx.eval.initial import initial_model
from lightning_ctx.knobs import ConfigError, above, at_least, check_class_args, existing_file, within

__all__ = ["ContextRemovabilityCallback", "initial_model"]

SUMMARY_KEYS = ("acc_no_ctx", "acc_ctx", "harm", "len_inflation", "ctx_kl", "hidden_cos/mean", "retention")


class ContextRemovabilityCallback(Callback):
    """Context-removability evaluation during ``fit`` and on ``validate`` / ``test``.

    Args:
        every_n_steps: evaluate every N optimizer steps during fit; ``None`` = after each of the
            trainer's validation loops instead (``val_check_interval``); 0 = only at the end.
        eval_at_start: also evaluate at step 0, before training (the first point of the curves).
        eval_at_end: evaluate at the end of fit (skipped when the last step was just evaluated).
        split: split evaluated during fit and ``validate`` (``val``); ``test_split`` on ``test``.
        max_items: cap on evaluated items (None = the whole split); ``max_retention_items`` likewise.
        batch_size: prompts per decoding batch (None = the data module's ``eval_batch_size``).
        max_new_tokens: decoding budget (None = the module's ``max_new_tokens``).
        num_samples: additionally draw this many samples per item at ``temperature`` / ``top_p`` / ``top_k``
            (``top_k`` 0 = no top-k filter; OPCD's protocol is 1.0 / 0.95 / 20) and log ``{prefix}sampled/*``
            (0 = greedy only). ``seed``: sampling seed (the training RNG is left untouched).
        hidden_layers: indices into HF's ``hidden_states`` (0 = embeddings, k = block k, negative
            from the end); None = every block ``1..L``.
        retention_file: JSONL of retention records (other contexts c' and their answers); without it
            the data module's ``eval_other_records(split)`` (the task's) is used when it has one. ``retention=False``
            turns retention off.
        log_references: log ``ref/*`` (teacher and initial model) once.
        log_artifacts: write the per-example table and plots (rank 0).
        prefix / test_prefix: metric name prefixes (``eval/`` and ``test/``).
        progress: a progress bar (rank 0) and a one-line summary after each evaluation.
    """

    KNOB_CHECKS = (
        at_least("every_n_steps", 0), at_least("max_items", 1), at_least("batch_size", 1),
        at_least("max_new_tokens", 1), at_least("num_samples", 0),
        above("temperature", 0, when=lambda a: a["num_samples"] > 0, hint="sampled evaluation needs it"),
        within("top_p", 0, 1, low_open=True), at_least("top_k", 0), existing_file("retention_file"),
        at_least("max_retention_items", 1),
    )

    def __init__(
        self,
        every_n_steps: Optional[int] = 50,
        eval_at_start: bool = True,
        eval_at_end: bool = True,
        split: str = "val",
        test_split: str = "test",
        max_items: Optional[int] = None,
        batch_size: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        num_samples: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        hidden_layers: Optional[list[int]] = None,
        retention: bool = True,
        retention_file: Optional[str] = None,
        max_retention_items: Optional[int] = None,
        log_references: bool = True,
        log_artifacts: bool = True,
        prefix: str = "eval/",
        test_prefix: str = "test/",
        progress: bool = True,
    ):
        check_class_args(ContextRemovabilityCallback, locals(), "trainer.callbacks.")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.split = split
        self.test_split = test_split
        self.max_items = max_items
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.hidden_layers = list(hidden_layers) if hidden_layers is not None else None
        self.retention = retention
        self.retention_file = retention_file
        self.max_retention_items = max_retention_items
        self.log_references = log_references
        self.log_artifacts = log_artifacts
        self.prefix = prefix
        self.test_prefix = test_prefix
        self.progress = progress

        # state (saved in checkpoints)
        self.history: list[dict] = []  # [{"step", "prefix", "metrics"}] in evaluation order
        self.references: dict[str, dict[str, float]] = {}  # split -> {"teacher_acc_ctx": ..., ...}
        # split -> kind ("initial_no_ctx", "teacher_ctx", "retention") -> {item index: right?}
        self.reference_items: dict[str, dict[str, dict[int, bool]]] = {}
        self._last_eval: Optional[tuple[str, int]] = None
        self._retention_cache: dict[str, Optional[list[TaskRecord]]] = {}
        self._refs_logged: set[str] = set()
        self._warned: set[str] = set()

    # -- the evaluator, resolved against the module, the data and the trainer ----------------------
    def make_evaluator(self, pl_module, dm, trainer=None) -> Evaluator:
        """An :class:`Evaluator` for ``pl_module``'s student on ``dm``'s records (sharded over ``trainer``'s ranks)."""
        hp_new = int(getattr(pl_module.hparams, "max_new_tokens", 0) or pl_module.sampling.max_new_tokens)
        settings = EvalSettings(max_new_tokens=self.max_new_tokens or hp_new,
                                batch_size=self.batch_size or int(getattr(dm, "eval_batch_size", 0) or 32),
                                num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, seed=self.seed, hidden_layers=self.hidden_layers)
        kwargs: dict[str, Any] = {"progress": self.progress}
        if trainer is not None:
            kwargs["sharding"] = Sharding(int(trainer.global_rank), int(trainer.world_size))
            if hasattr(trainer, "precision_plugin"):
                kwargs["forward_context"] = trainer.precision_plugin.forward_context
        return Evaluator.for_module(pl_module, dm.renderer, dm.verifier, settings, **kwargs)

    def resolve_layers(self, model) -> list[int]:
        """Indices into ``hidden_states`` (length ``L + 1``) this callback compares."""
        return resolve_layers(model, self.hidden_layers)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def eval_records(self, dm, split: str) -> list[TaskRecord]:
        records = [as_record(r, f"{split} split") for r in dm.records(split)]
        return records[: self.max_items] if self.max_items is not None else records

    def retention_records(self, dm, split: str) -> Optional[list[TaskRecord]]:
        """Items with *other* contexts: ``retention_file``, else ``dm.eval_other_records(split)``."""
        if not self.retention:
            return None
        if split not in self._retention_cache:
            if self.retention_file:
                records = load_jsonl(self.retention_file)
            else:
                records = [as_record(r) for r in dm.eval_other_records(split)] or None
            if records is not None and self.max_retention_items is not None:
                records = records[: self.max_retention_items]
            self._retention_cache[split] = records or None
        return self._retention_cache[split]

    # -- references: the teacher (with context) and the initial model (without context) ------------
    def compute_references(self, pl_module, dm, split: str, initial_model=None, trainer=None) -> dict[str, float]:
        """Measure and keep (``self.references[split]``, ``self.reference_items[split]``) the references."""
        refs = self.make_evaluator(pl_module, dm, trainer).references(
            pl_module.teacher, self.eval_records(dm, split), self.retention_records(dm, split), initial_model)
        self.references[split] = refs.metrics
        self.reference_items[split] = refs.items
        return refs.metrics

    def ref_prefix(self, split: str) -> str:
        """``ref/`` for the main split, ``ref/<split>/`` for another (e.g. the test split)."""
        return "ref/" if split == self.split else f"ref/{split}/"

    def _ensure_references(self, trainer, pl_module, split: str, before_training: bool) -> None:
        dm = _datamodule(trainer, pl_module)
        if split not in self.references:
            if not self.eval_records(dm, split):
                return
            initial = initial_model(trainer, pl_module, before_training)
            if initial is None:
                self._warn_once("no-initial", "ContextRemovabilityCallback: the initial model is not available (a "
                                "separate teacher and training already started): ref/initial_* are not logged and "
                                "retention has no reference (NaN)")
            self.compute_references(pl_module, dm, split, initial, trainer)
        prefix = self.ref_prefix(split)
        log_to_loggers(trainer.loggers, self._warn_once,
                       {f"{prefix}{k}": v for k, v in self.references[split].items()}, int(trainer.global_step))
        self._refs_logged.add(split)

    # -- one scheduled evaluation ------------------------------------------------------------------
    def _run(self, trainer, pl_module, stage: str) -> Optional[EvalResult]:
        split = self.test_split if stage == "test" else self.split
        prefix = self.test_prefix if stage == "test" else self.prefix
        step = int(trainer.global_step)
        if stage == "fit" and self._last_eval == (prefix, step):  # e.g. end of fit right after a scheduled one
            return None
        dm = _datamodule(trainer, pl_module)
        records = self.eval_records(dm, split)
        if not records:
            self._warn_once(f"empty:{split}", f"ContextRemovabilityCallback: the {split!r} split has no records; "
                                              "skipping evaluation")
            return None
        if self.log_references and split not in self._refs_logged:
            self._ensure_references(trainer, pl_module, split, before_training=stage == "fit" and step == 0)
        evaluator = self.make_evaluator(pl_module, dm, trainer)
        result = evaluator.evaluate(
            pl_module.student, records, self.retention_records(dm, split), step=step, split=split,
            references=References(self.references.get(split, {}), self.reference_items.get(split, {})),
            desc=f"{prefix}step {step} ({split})")
        if stage == "fit":
            self._last_eval = (prefix, step)
            self.history.append({"step": step, "prefix": prefix, "metrics": dict(result.metrics)})
        log_to_loggers(trainer.loggers, self._warn_once, {f"{prefix}{k}": v for k, v in result.metrics.items()},
                       step)
        for k, v in result.metrics.items():
            trainer.callback_metrics[f"{prefix}{k}"] = torch.tensor(v)
        if self.log_artifacts:  # every rank takes part in the gather; rank 0 writes
            rows = [r for part in evaluator.sharding.gather(result.examples) for r in part]
            ret_rows = [r for part in evaluator.sharding.gather(result.retention_examples) for r in part]
        if trainer.is_global_zero:
            if self.progress:
                summary = " ".join(f"{k}={result.metrics[k]:.3f}" for k in SUMMARY_KEYS if k in result.metrics)
                rank_zero_info(f"[{prefix}step {step}, {split}, {len(records)} items] {summary}")
            if self.log_artifacts:
                publish_artifacts(trainer.loggers, stage=stage, prefix=prefix, step=step, split=split,
                                  metrics=result.metrics, references=self.references.get(split, {}),
                                  rows=sorted(rows, key=lambda r: r["index"]),
                                  retention_rows=sorted(ret_rows, key=lambda r: r["index"]),
                                  history=[h for h in self.history if h["prefix"] == prefix])
        return result

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Fail before training when the evaluated split is empty or the retention file is bad."""
        if stage not in ("fit", "validate", "test"):
            return
        check_unsharded(trainer)
        dm = _datamodule(trainer, pl_module)
        split = self.test_split if stage == "test" else self.split
        if not dm.records(split):
            raise DataError(f"ContextRemovabilityCallback evaluates the {split!r} split but it has no records "
                            f"(give the task a {split} split, or set the callback's split)", field="data.task")
        self.retention_records(dm, split)
        self.resolve_layers(pl_module.student)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.log_references and self.split not in self._refs_logged:
            self._ensure_references(trainer, pl_module, self.split, before_training=trainer.global_step == 0)
        if self.eval_at_start and trainer.global_step == 0:
            self._run(trainer, pl_module, "fit")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0:
            self._run(trainer, pl_module, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        fn = trainer.state.fn
        fn = getattr(fn, "value", fn)
        if fn == "fit" and self.every_n_steps is None:
            self._run(trainer, pl_module, "fit")
        elif fn == "validate":
            self._run(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "test")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.eval_at_end:
            self._run(trainer, pl_module, "fit")

    # -- checkpoint state --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "references": self.references,
                "reference_items": self.reference_items,
                "last_eval": list(self._last_eval) if self._last_eval else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.references = {s: dict(v) for s, v in state_dict.get("references", {}).items()}
        self.reference_items = {s: {k: {int(i): bool(b) for i, b in v.items()} for k, v in kinds.items()}
                                for s, kinds in state_dict.get("reference_items", {}).items()}
        last = state_dict.get("last_eval")
        self._last_eval = tuple(last) if last else None


def check_unsharded(trainer) -> None:
    """The evaluation decodes with the student's weights outside the training forward, and each rank decodes its
    own shard of the items (different numbers of forwards): with weights sharded over ranks (FSDP) every forward
    is a collective, so it would hang. Refused before anything runs, with what to do instead."""
    from lightning_ctx.distributed import is_sharded

    if is_sharded(trainer) and trainer.world_size > 1:
        raise ConfigError("ContextRemovabilityCallback does not run with weights sharded over ranks (FSDP with "
                          f"{trainer.world_size} ranks): train under FSDP without it, then evaluate the checkpoint "
                          "with `lightning-ctx validate --ckpt_path ...` under DDP or on one device "
                          "(--trainer.strategy ddp)", field="trainer.strategy")


def _datamodule(trainer, pl_module) -> TaskDataModule:
    dm = getattr(trainer, "datamodule", None)
    if not isinstance(dm, TaskDataModule):
        raise DataError("ContextRemovabilityCallback needs the TaskDataModule as `data`")
    dm.connect(pl_module.tokenizer)
    return dm


def log_to_loggers(loggers, warn_once: Callable[[str, str], None], metrics: dict[str, float], step: int) -> None:
    """``metrics`` at ``step`` to every logger; a logger refusing NaN/inf gets the finite values only."""
    for logger in loggers:
        try:
            logger.log_metrics(metrics, step=step)
        except Exception as err:
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            if len(finite) == len(metrics):
                raise
            warn_once(f"nan:{type(logger).__name__}",
                      f"{type(logger).__name__} refused non-finite metrics ({err}); logging finite ones only")
            logger.log_metrics(finite, step=step)
    for logger in loggers:
        if hasattr(logger, "save"):
            logger.save()


def publish_artifacts(loggers, **evaluation) -> None:
    """Write one evaluation's artifacts (``write_eval_artifacts(**evaluation)``) to a temporary folder, upload them."""
    tmp = Path(tempfile.mkdtemp(prefix="lightning_ctx_eval_"))
    try:
        upload_artifacts(loggers, write_eval_artifacts(tmp, **evaluation))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
