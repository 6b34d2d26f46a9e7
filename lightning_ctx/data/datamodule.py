"""``TaskDataModule``: the one DataModule. It holds a :class:`~lightning_ctx.data.task.Task` (``data.task``) and owns
everything generic: the tokenizer, batch sizes, ``max_prompt_length``, the template, the retention term's contexts,
the eval cap, workers, and samplers that resume exactly and shard over ranks.
"""

from __future__ import annotations

import warnings
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_ctx.data.records import DataError, TaskRecord
from lightning_ctx.data.render import PromptRenderer
from lightning_ctx.data.task import SPLITS, Task
from lightning_ctx.knobs import Check, at_least, check_class_args, one_of


class RecordDataset(Dataset):
    """Records indexed by *draw number*: draw ``k`` is record ``k % n`` (see ``ResumableSampler``)."""

    def __init__(self, records: list[TaskRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, k: int) -> tuple[int, TaskRecord]:
        return k, self.records[k % len(self.records)]


class ResumableSampler(DistributedSampler):
    """Seeded epoch permutations that can start mid-epoch, so a resumed run sees the same data.

    Yields draw numbers ``epoch * n + index``; every random choice made per draw (e.g. the other
    context of the retention term) is a function of ``(seed, draw)``, never of a stateful generator,
    so prefetching and resuming cannot shift it. ``start_at(draws_done)`` skips what was consumed.

    Sharded over ``num_replicas`` ranks itself, as ``DistributedSampler`` does (the epoch's order padded with
    its first items to a multiple of the ranks; rank ``r`` takes positions ``r, r + W, ...``), so Lightning
    does not wrap it: its ``DistributedSamplerWrapper`` trusts ``__len__`` and sizes itself once. One global
    batch of ``B`` per rank consumes the next ``B * W`` positions of the epoch's order, which is what
    ``draws_done`` counts. ``__len__`` is this rank's *full* epoch, also for a resumed one: Lightning's batch
    counters restart at the restored batch index and stop the epoch when the loader runs out.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ is not called: it would ask torch.distributed for the world.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.drop_last = False
        self._next_draw = 0

    def start_at(self, draws_done: int) -> None:
        """Continue after ``draws_done`` draws (global, over all ranks: a multiple of ``num_replicas`` in-epoch)."""
        self._next_draw = max(0, draws_done)

    def set_epoch(self, epoch: int) -> None:
        """No-op: the epoch follows from the draw position (Lightning calls this on distributed samplers)."""

    @property
    def per_rank(self) -> int:
        return -(-self.n // self.num_replicas)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        epoch, offset = divmod(self._next_draw, self.n)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(self.n)
        order = order.tolist()
        total = self.per_rank * self.num_replicas
        padded = (order * -(-total // self.n))[:total]
        self._next_draw = (epoch + 1) * self.n  # the next __iter__ is the next epoch
        for i in padded[self.rank::self.num_replicas][offset // self.num_replicas:]:
            yield epoch * self.n + i


class TaskDataModule(pl.LightningDataModule):
    """The one DataModule: a task's records, rendered and batched (docs/design.md, "Data").

    Args:
        task: the task (``data.task: {class_path: ..., init_args: {...}}``; default: ``JSONLTask``, JSONL files).
        tokenizer: tokenizer path (the CLI links it to ``model.student``).
        batch_size: prompts (games) per training step (each gets one on-policy response).
        eval_batch_size: prompts per evaluation batch (default: batch_size).
        max_prompt_length: the longest allowed context + prompt rendering in tokens; longer records
            are an error before training (no silent truncation).
        template: ``auto`` | ``chat`` | ``plain`` (see ``PromptRenderer``).
        retain_contexts: other contexts c' for the optional retention term (``model.retain_weight``; empty = off).
        retain_others: also retain the task's other contexts (``Task.retain_others``: every context of the train
            split, each record drawing one that is not its own; the world lists its in-distribution ones), so a
            method config can turn the retention term on without knowing the task's contexts.
        max_eval_items: cap on val/test items (None = all).
        num_workers / shuffle / seed: the training loader's workers, epoch shuffling and its seed (also the seed of
            the retention term's draws).
    """

    KNOB_CHECKS = (
        Check("task", lambda v: v is not None, "must name a task: {class_path: lightning_ctx.tasks.world.WorldTask, "
              "init_args: {...}} or another Task subclass", required=True),
        at_least("batch_size", 1), at_least("eval_batch_size", 1), at_least("max_prompt_length", 1),
        one_of("template", ("auto", "chat", "plain")), at_least("max_eval_items", 1), at_least("num_workers", 0),
    )

    def __init__(self, task: Task, tokenizer: Optional[str] = None, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, max_prompt_length: int = 1024, template: str = "auto",
                 retain_contexts: Optional[list[str]] = None, retain_others: bool = False,
                 max_eval_items: Optional[int] = None, num_workers: int = 0, shuffle: bool = True, seed: int = 0):
        check_class_args(TaskDataModule, locals(), "data.")
        super().__init__()
        self.task = task
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_prompt_length = max_prompt_length
        self.template = template
        self.retain_contexts = list(retain_contexts or [])
        self.retain_others = retain_others
        self.max_eval_items = max_eval_items
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.tokenizer = None
        self.renderer: PromptRenderer | None = None
        self.splits: dict[str, list[TaskRecord]] = {}
        self._validated = False

    @property
    def verifier(self):
        """The task's verifier (the evaluation reads answers with it)."""
        return self.task.verifier

    # -- the contract with the module, the evaluation and the CLI (docs/design.md, "Data") ---------------
    def connect(self, tokenizer) -> None:
        """Render with ``tokenizer`` (the student's) and check every split, before anything trains.

        The one call the module, the evaluation callback and the CLI make; calling it again with the same
        tokenizer is free. Standalone (no module), ``validate()`` loads ``data.tokenizer`` by path instead.
        """
        if tokenizer is not self.tokenizer:
            self.tokenizer, self.renderer, self._validated = tokenizer, None, False
        self.validate()

    def _ensure_tokenizer(self) -> None:
        """Standalone use (no ``connect``): load ``data.tokenizer`` by path."""
        if self.tokenizer is None:
            if self.tokenizer_path is None:
                raise DataError("no tokenizer: set data.tokenizer (the CLI links it to model.student)",
                                field="data.tokenizer")
            from lightning_ctx.models.loading import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_path)

    def validate(self) -> None:
        """Load every split of the task and check it end to end (``Task.connect``); raises ``DataError`` before
        training."""
        if self._validated:
            return
        self._ensure_tokenizer()
        self.renderer = PromptRenderer(self.tokenizer, self.template)
        self.splits = {}
        for split in SPLITS:
            records = self.task.load(split)
            if records is None:
                continue
            if split != "train" and self.max_eval_items is not None:
                records = records[: self.max_eval_items]
            self.splits[split] = records
        if not self.splits:
            raise DataError(f"{type(self.task).__name__} has no split: give it records for train (and val / test)",
                            field="data.task")
        self.task.connect(self)
        if self.retain_others and "train" in self.splits:
            pool = list(dict.fromkeys([*self.retain_contexts, *self.task.retain_others(self.splits["train"])]))
            if len(pool) < 2:
                raise DataError("the train split has a single context, so there are no others to retain: list "
                                "them in data.retain_contexts", path=self.task.source("train"),
                                field="data.retain_others")
            self.retain_contexts = pool
        self._validated = True

    def longest_prompt(self) -> int:
        """The longest prefix a response is sampled from (the model's position check, the rollout warm-up)."""
        self.validate()
        return self.task.longest_prompt(self)

    def setup(self, stage: str | None = None) -> None:
        self.validate()

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            raise DataError(f"{type(self.task).__name__} has no {split} split", field="data.task")
        records = self.splits[split]
        world, rank = self._ranks()
        sampler = ResumableSampler(len(records), shuffle=train and self.shuffle, seed=self.seed,
                                   num_replicas=world, rank=rank)
        if train:
            sampler.start_at(self._draws_done())
        return DataLoader(RecordDataset(records), batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, drop_last=False, num_workers=self.num_workers,
                          collate_fn=self.task.collator(self, retain=train))

    def _ranks(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the trainer's strategy (``(1, 0)`` without a trainer)."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _draws_done(self) -> int:
        """Training records consumed (over all ranks) before this fit (re)started: a resumed run's data position.

        Derived from the restored global step, so a checkpoint holds the data position for free. One optimizer
        step is ``accumulate_grad_batches`` batches of ``batch_size`` per rank; an epoch is ``ceil(ceil(n / W) /
        batch_size)`` batches per rank and ends with an optimizer step even when that leaves an accumulation
        incomplete. Exact when resumed with the same number of ranks (``W``) and batch size.
        """
        trainer = self.trainer
        if trainer is None or trainer.global_step == 0:
            return 0
        n = len(self.splits["train"])
        world, _ = self._ranks()
        batches_per_epoch = -(-(-(-n // world)) // self.batch_size)
        accumulate = trainer.accumulate_grad_batches
        steps_per_epoch = -(-batches_per_epoch // accumulate)
        epochs, in_epoch = divmod(trainer.global_step, steps_per_epoch)
        return epochs * n + in_epoch * accumulate * self.batch_size * world

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def records(self, split: str) -> list[TaskRecord]:
        """The checked records of ``split`` (``train``, ``val``, ``test``); empty when the task has none."""
        self.validate()
        return self.splits.get(split, [])

    def eval_other_records(self, split: str = "val") -> list[TaskRecord]:
        """Items under *other* contexts for the ``retention`` metric (``Task.eval_other_records``)."""
        return self.task.eval_other_records(split)

    def retention_records(self, split: str = "val") -> list[TaskRecord]:
        """Deprecated name of :meth:`eval_other_records` (kept for one release)."""
        warnings.warn("TaskDataModule.retention_records is renamed eval_other_records", FutureWarning, stacklevel=2)
        return self.eval_other_records(split)
