"""The context-removability evaluation inside a Trainer (docs/design.md, "Metrics").

``ContextRemovabilityCallback`` runs :class:`~lightning_ctx.eval.evaluator.Evaluator` on the **student** when
:class:`~lightning_ctx.eval.base_callback.EvaluationCallback` schedules it (step 0, every N optimizer steps, end of
fit, ``validate`` / ``test``), and logs the metrics of :data:`~lightning_ctx.eval.registry.REMOVABILITY` as
``{prefix}{name}`` (``eval/harm``) with their 95% intervals over items (``eval/harm_lo``, ``eval/harm_hi``,
``eval/n_items``; the sampled variants as ``{prefix}sampled/{name}``). References are logged once:
``ref/teacher_acc_ctx`` (teacher, greedy, with context) and ``ref/initial_acc_no_ctx`` (the initial model without
context), plus ``ref/teacher_len_ctx``, ``ref/initial_len_no_ctx`` and ``ref/initial_other_ctx_acc``. Every rank
decodes its shard of the items; the rows are gathered, every rank computes the same metrics; only global rank 0
writes artifacts: ``{prefix}step_000050/examples.json`` and ``examples.html`` (one row per item, the k samples'
flags of the sampled evaluation included), ``{prefix}curves.png`` (with bands) and ``{prefix}hidden_cos.png``.

The initial model (reference for ``ref/initial_*`` and the per-item retention reference) always has the
initial student's unquantized weights: the teacher when the teacher is the frozen initial student in full
precision (``model.teacher: null``); else the student itself, measured before the first training step
(``on_train_start`` of a fresh fit); with a 4/8-bit self-teacher and training already started, the initial
weights re-loaded (see ``initial_model``); with a separate teacher and training started it is unavailable
and those references are skipped (``retention`` is then NaN, ``other_ctx_acc`` is still logged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.data.records import DataError, TaskRecord, load_jsonl
from lightning_ctx.eval.artifacts import write_examples
from lightning_ctx.eval.base_callback import Evaluation, EvaluationCallback
from lightning_ctx.eval.decoding import as_record
from lightning_ctx.eval.evaluator import EvalSettings, Evaluator, References, Sharding, resolve_layers
from lightning_ctx.eval.initial import initial_model
from lightning_ctx.eval.registry import REMOVABILITY
from lightning_ctx.knobs import above, at_least, check_class_args, existing_file, within

__all__ = ["ContextRemovabilityCallback", "initial_model"]


class ContextRemovabilityCallback(EvaluationCallback):
    """Context-removability evaluation during ``fit`` and on ``validate`` / ``test``.

    Args:
        max_items: cap on evaluated items (None = the whole split); ``max_retention_items`` likewise.
        num_samples: additionally draw this many samples per item at ``temperature`` / ``top_p`` / ``top_k``
            (``top_k`` 0 = no top-k filter; OPCD's protocol is 1.0 / 0.95 / 20) and log ``{prefix}sampled/*``
            (0 = greedy only), with the no-effect floor from k >= 2 samples.
        hidden_layers: indices into HF's ``hidden_states`` (0 = embeddings, k = block k, negative
            from the end); None = every block ``1..L``.
        retention_file: JSONL of retention records (other contexts c' and their answers); without it
            the data module's ``eval_other_records(split)`` (the task's) is used when it has one. ``retention=False``
            turns retention off.

    Other arguments as in :class:`~lightning_ctx.eval.base_callback.EvaluationCallback` (every_n_steps,
    eval_at_start, eval_at_end, split, test_split, batch_size, max_new_tokens, seed, n_resamples,
    log_references, log_artifacts, prefix, test_prefix, progress, metric_modules).
    """

    KNOB_CHECKS = (
        at_least("max_items", 1), at_least("num_samples", 0),
        above("temperature", 0, when=lambda a: a["num_samples"] > 0, hint="sampled evaluation needs it"),
        within("top_p", 0, 1, low_open=True), at_least("top_k", 0), existing_file("retention_file"),
        at_least("max_retention_items", 1),
    )
    registry = REMOVABILITY
    curve_references = ("teacher_acc_ctx", "initial_acc_no_ctx")

    def __init__(self, max_items: Optional[int] = None, num_samples: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, hidden_layers: Optional[list[int]] = None, retention: bool = True,
                 retention_file: Optional[str] = None, max_retention_items: Optional[int] = None, **kwargs):
        check_class_args(ContextRemovabilityCallback, {**locals(), **kwargs}, "trainer.callbacks.")
        super().__init__(**kwargs)
        self.max_items = max_items
        self.num_samples, self.temperature, self.top_p, self.top_k = num_samples, temperature, top_p, top_k
        self.hidden_layers = list(hidden_layers) if hidden_layers is not None else None
        self.retention = retention
        self.retention_file = retention_file
        self.max_retention_items = max_retention_items
        # split -> kind ("initial_no_ctx", "teacher_ctx", "retention") -> {item index: right?} (saved in checkpoints)
        self.reference_items: dict[str, dict[str, dict[int, bool]]] = {}
        self._retention_cache: dict[str, Optional[list[TaskRecord]]] = {}

    # -- the evaluator, resolved against the module, the data and the trainer ----------------------
    def make_evaluator(self, pl_module, dm, trainer=None) -> Evaluator:
        """An :class:`Evaluator` for ``pl_module``'s student on ``dm``'s records (sharded over ``trainer``'s ranks)."""
        hp_new = int(getattr(pl_module.hparams, "max_new_tokens", 0) or pl_module.sampling.max_new_tokens)
        settings = EvalSettings(max_new_tokens=self.max_new_tokens or hp_new,
                                batch_size=self.batch_size or int(getattr(dm, "eval_batch_size", 0) or 32),
                                num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, seed=self.seed, hidden_layers=self.hidden_layers,
                                n_resamples=self.n_resamples)
        kwargs: dict[str, Any] = {"progress": self.progress}
        if trainer is not None:
            kwargs["sharding"] = Sharding(int(trainer.global_rank), int(trainer.world_size))
            if hasattr(trainer, "precision_plugin"):
                kwargs["forward_context"] = trainer.precision_plugin.forward_context
        return Evaluator.for_module(pl_module, dm.renderer, dm.verifier, settings, **kwargs)

    def resolve_layers(self, model) -> list[int]:
        """Indices into ``hidden_states`` (length ``L + 1``) this callback compares."""
        return resolve_layers(model, self.hidden_layers)

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

    def measure_references(self, trainer, pl_module, split: str, before_training: bool) -> Optional[dict[str, float]]:
        dm = _datamodule(trainer, pl_module)
        if not self.eval_records(dm, split):
            return None
        initial = initial_model(trainer, pl_module, before_training)
        if initial is None:
            self.warn_once("no-initial", "ContextRemovabilityCallback: the initial model is not available (a "
                           "separate teacher and training already started): ref/initial_* are not logged and "
                           "retention has no reference (NaN)")
        return self.compute_references(pl_module, dm, split, initial, trainer)

    # -- one evaluation ----------------------------------------------------------------------------
    def evaluate(self, trainer, pl_module, split: str, prefix: str, step: int) -> Optional[Evaluation]:
        dm = _datamodule(trainer, pl_module)
        records = self.eval_records(dm, split)
        if not records:
            self.warn_once(f"empty:{split}", f"ContextRemovabilityCallback: the {split!r} split has no records; "
                                             "skipping evaluation")
            return None
        result = self.make_evaluator(pl_module, dm, trainer).evaluate(
            pl_module.student, records, self.retention_records(dm, split), step=step, split=split,
            references=References(self.references.get(split, {}), self.reference_items.get(split, {})),
            desc=f"{prefix}step {step} ({split})")
        return Evaluation(result.metrics, len(records),
                          {"rows": result.examples, "retention_rows": result.retention_examples})

    def write_tables(self, folder: Path, evaluation: Evaluation, *, stage: str, prefix: str, step: int,
                     split: str) -> list[Path]:
        base = prefix.rstrip("/") or "eval"
        return write_examples(folder, title=f"{base} step {step} ({split} split, {stage})", stage=stage, step=step,
                              split=split, metrics=evaluation.metrics, references=self.references.get(split, {}),
                              rows=evaluation.tables["rows"], retention_rows=evaluation.tables["retention_rows"])

    def check_setup(self, trainer, pl_module, split: str) -> None:
        """Fail before training when the evaluated split is empty or the retention file is bad."""
        dm = _datamodule(trainer, pl_module)
        if not dm.records(split):
            raise DataError(f"ContextRemovabilityCallback evaluates the {split!r} split but it has no records "
                            f"(give the task a {split} split, or set the callback's split)", field="data.task")
        self.retention_records(dm, split)
        self.resolve_layers(pl_module.student)

    # -- checkpoint state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reference_items": self.reference_items}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reference_items = {s: {k: {int(i): bool(b) for i, b in v.items()} for k, v in kinds.items()}
                                for s, kinds in state_dict.get("reference_items", {}).items()}


def _datamodule(trainer, pl_module) -> TaskDataModule:
    dm = getattr(trainer, "datamodule", None)
    if not isinstance(dm, TaskDataModule):
        raise DataError("ContextRemovabilityCallback needs the TaskDataModule as `data`")
    dm.connect(pl_module.tokenizer)
    return dm
