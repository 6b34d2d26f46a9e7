"""The task contract: what a task gives the one DataModule (docs/design.md, "Data"), and the generic JSONL task.

A task is a component, configured under ``data.task`` and held by
:class:`~lightning_ctx.data.datamodule.TaskDataModule`, which owns everything generic (tokenizer, batch sizes,
``max_prompt_length``, the template, the retention term's contexts, the eval cap, workers, shuffling, the seed, the
samplers that resume exactly and shard over ranks). A task supplies:

* its records per split (:meth:`Task.load`) and the source an error names (:meth:`Task.source`);
* its verifier (:attr:`Task.verifier`, with ``parse_answer`` to check gold answers before training);
* items under *other* contexts for the ``retention`` metric (:meth:`Task.eval_other_records`) and the contexts the
  retention *term* may use with ``data.retain_others`` (:meth:`Task.retain_others`);
* its checks and sizing once a tokenizer is known (:meth:`Task.connect`, :meth:`Task.longest_prompt`);
* how a batch is built (:meth:`Task.collator`: context pairs by default, game episodes for the games);
* its knob ranges (``KNOB_CHECKS``, checked by the CLI before any model loads; an
  :class:`~lightning_ctx.knobs.ArgsCheck` there also sees the DataModule's knobs, e.g. ``max_eval_items``).

A new task is a subclass anywhere on the Python path, named by class path in the config; nothing in this package is
edited to add one (tests/test_task_plugin.py fits one from a temporary package).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Protocol

from lightning_ctx.data.batches import PairCollator
from lightning_ctx.data.records import DataError, TaskRecord, load_jsonl
from lightning_ctx.data.render import PromptRenderer
from lightning_ctx.data.verifiers import (
    GENERIC_VERIFIERS,
    Verifier,
    answer_parser,
    build_verifier,
    exact_match,
    verifier_known,
)
from lightning_ctx.knobs import Check, check_class_args, existing_file

__all__ = ["DataView", "JSONLTask", "SPLITS", "TASK_PREFIX", "Task"]

SPLITS = ("train", "val", "test")
TASK_PREFIX = "data.task."  # how errors name a task's knobs


class DataView(Protocol):
    """What a task reads of the DataModule that holds it (``TaskDataModule``), once it is connected."""

    tokenizer: Any
    renderer: PromptRenderer
    splits: dict[str, list[TaskRecord]]  # the loaded splits (val / test capped by max_eval_items)
    max_prompt_length: int
    max_eval_items: Optional[int]
    retain_contexts: list[str]
    seed: int


class Task:
    """Base of every task (see the module docs). Subclasses implement :meth:`load` and set :attr:`verifier`; the
    other methods have defaults that fit tasks whose items are ``{id, context, prompt, answer}`` records.

    A task's ``__init__`` arguments are its own knobs (``data.task.init_args.*``); they never reuse the name of one
    of the DataModule's (``batch_size``, ``max_eval_items``, ...), which live once, in ``data``.
    """

    KNOB_CHECKS: tuple = ()
    #: ``(response, answer) -> right?``; ``parse_answer(answer)`` (optional) reads a gold answer, None = unreadable.
    verifier: Verifier = staticmethod(exact_match)

    @property
    def verifier_name(self) -> str:
        """How errors name the verifier."""
        v = self.verifier
        return getattr(v, "__name__", type(v).__name__)

    # -- records -----------------------------------------------------------------------------------
    def load(self, split: str) -> Optional[list[TaskRecord]]:
        """The records of ``split`` (``train``, ``val``, ``test``), or None when the task has no such split."""
        raise NotImplementedError

    def source(self, split: str) -> str:
        """Where ``split``'s records come from, as an error names it (a file, or ``world:SHOW:val``)."""
        return f"{type(self).__name__}:{split}"

    def eval_other_records(self, split: str) -> list[TaskRecord]:
        """Items of ``split`` under *other* contexts, with their answers under those contexts, for the ``retention``
        metric (accuracy on them over the initial model's); none by default."""
        return []

    def retain_others(self, train: list[TaskRecord]) -> list[str]:
        """The contexts the retention *term* draws from with ``data.retain_others``: by default every context of the
        train split (each record then draws one that is not its own)."""
        return list(dict.fromkeys(r.context for r in train))

    # -- checks, sizing and batches, once the DataModule has a tokenizer ---------------------------
    def connect(self, data: DataView) -> None:
        """Check every loaded split (``data.splits``) against ``data``'s tokenizer and limits; raise ``DataError``
        before training. By default: every gold answer is readable by the verifier and every record, rendered with
        its context, fits ``data.max_prompt_length``."""
        parse = answer_parser(self.verifier)
        for split, records in data.splits.items():
            source = self.source(split)
            for lineno, rec in enumerate(records, start=1):
                if parse(rec.answer) is None:
                    raise DataError(f"the {self.verifier_name!r} verifier cannot parse answer {rec.answer!r}",
                                    path=source, line=lineno, field="answer")
                n = len(data.renderer.ids(rec.prompt, rec.context))
                if n > data.max_prompt_length:
                    raise DataError(f"context + prompt is {n} tokens, longer than data.max_prompt_length="
                                    f"{data.max_prompt_length} (no silent truncation: shorten the record or raise "
                                    "the limit)", path=source, line=lineno, field="context")

    def longest_prompt(self, data: DataView) -> int:
        """The longest prefix a response is sampled from, in tokens (the model's position check and the rollout
        warm-up): by default the longest with-context rendering over every split."""
        return max((len(data.renderer.ids(r.prompt, r.context)) for recs in data.splits.values() for r in recs),
                   default=0)

    def collator(self, data: DataView, retain: bool) -> Callable[[list], Any]:
        """``[(draw, record)] -> batch`` (picklable, for DataLoader workers): a
        :class:`~lightning_ctx.data.batches.ContextPairBatch` by default, with the retention term's other contexts
        when ``retain`` (training)."""
        return PairCollator(data.renderer, data.tokenizer.pad_token_id, data.retain_contexts if retain else None,
                            seed=data.seed)


class JSONLTask(Task):
    """Records ``{id, context, prompt, answer}`` from JSONL files (the default task).

    Args:
        train_file / val_file / test_file: JSONL paths (at least one).
        verifier: ``exact`` | ``regex`` | ``choice`` (``lightning_ctx.data.verifiers``), or an import path
            ``module:attr`` to any verifier (e.g. ``lightning_ctx.tasks.frozenlake.rules:FrozenLakeVerifier``).
        verifier_kwargs: arguments of the verifier class.
    """

    KNOB_CHECKS = (
        existing_file("train_file"), existing_file("val_file"), existing_file("test_file"),
        Check("verifier", lambda v: isinstance(v, str) and verifier_known(v),
              f"must be one of {', '.join(GENERIC_VERIFIERS)}, or an import path module:attr to a verifier"),
    )

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, verifier: str = "exact",
                 verifier_kwargs: Optional[dict[str, Any]] = None):
        check_class_args(JSONLTask, locals(), TASK_PREFIX)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.name = verifier
        self.verifier = build_verifier(verifier, **(verifier_kwargs or {}))

    @property
    def verifier_name(self) -> str:
        return self.name

    def load(self, split: str) -> Optional[list[TaskRecord]]:
        if not any(self.files.values()):  # checked when loading: a CLI built without data still has a trainer
            raise DataError("no data: set data.task.init_args.train_file (and optionally val_file / test_file)",
                            field=f"{TASK_PREFIX}train_file")
        path = self.files[split]
        return load_jsonl(path) if path else None

    def source(self, split: str) -> str:
        return str(self.files[split])
