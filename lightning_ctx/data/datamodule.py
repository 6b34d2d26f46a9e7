"""``ContextPairDataModule``: JSONL task files -> batches carrying both renderings of every record."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_ctx.data.records import DataError, TaskRecord, load_jsonl
from lightning_ctx.data.render import PromptRenderer, left_pad
from lightning_ctx.data.verifiers import VERIFIER_NAMES, answer_parser, build_verifier
from lightning_ctx.knobs import at_least, check_class_args, existing_file, one_of


@dataclass
class ContextPairBatch:
    """A batch of records rendered without (``prompt_*``) and with (``ctx_prompt_*``) the context.

    Tensors are left-padded ``[B, P]``. Lightning moves the tensor fields to the device.
    ``retain_*`` (optional) render the same prompts under *other* contexts for the retention term.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    ctx_prompt_ids: torch.Tensor
    ctx_prompt_mask: torch.Tensor
    ids: list[str]
    contexts: list[str]
    prompts: list[str]
    answers: list[str]
    retain_prompt_ids: Optional[torch.Tensor] = None
    retain_prompt_mask: Optional[torch.Tensor] = None
    retain_contexts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


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


class PairCollator:
    """Tokenizes records twice; picklable so DataLoader workers can use it."""

    def __init__(self, renderer: PromptRenderer, pad_id: int, retain_contexts: list[str] | None = None,
                 seed: int = 0):
        self.renderer = renderer
        self.pad_id = pad_id
        self.retain_contexts = list(retain_contexts or [])
        self.seed = seed

    def __call__(self, items: list) -> ContextPairBatch:
        # Items are (draw, record) from RecordDataset, or bare records (direct use in notebooks and tests).
        draws = [it[0] if isinstance(it, tuple) else i for i, it in enumerate(items)]
        records = [it[1] if isinstance(it, tuple) else it for it in items]
        plain = [self.renderer.ids(r.prompt) for r in records]
        with_ctx = [self.renderer.ids(r.prompt, r.context) for r in records]
        p_ids, p_mask = left_pad(plain, self.pad_id)
        c_ids, c_mask = left_pad(with_ctx, self.pad_id)
        batch = ContextPairBatch(p_ids, p_mask, c_ids, c_mask, [r.id for r in records],
                                 [r.context for r in records], [r.prompt for r in records],
                                 [r.answer for r in records])
        if self.retain_contexts:
            chosen = []
            for draw, r in zip(draws, records):
                pool = [c for c in self.retain_contexts if c != r.context] or self.retain_contexts
                chosen.append(random.Random(f"{self.seed}:{draw}").choice(pool))
            batch.retain_prompt_ids, batch.retain_prompt_mask = left_pad(
                [self.renderer.ids(r.prompt, c) for r, c in zip(records, chosen)], self.pad_id)
            batch.retain_contexts = chosen
        return batch


class ContextPairDataModule(pl.LightningDataModule):
    """Paired-context data from JSONL files with ``{id, context, prompt, answer}`` records.

    Args:
        train_file / val_file / test_file: JSONL paths.
        tokenizer: tokenizer path (the CLI links it to ``model.student``).
        batch_size: prompts per training step (each gets one on-policy response).
        eval_batch_size: prompts per evaluation batch (default: batch_size).
        max_prompt_length: the longest allowed context + prompt rendering in tokens; longer records
            are an error before training (no silent truncation).
        template: ``auto`` | ``chat`` | ``plain`` (see ``PromptRenderer``).
        verifier: ``exact`` | ``regex`` | ``choice`` | ``world`` | ``frozenlake`` | ``mcqa_tagged`` | ``mcqa_opcd``
            | ``safety`` | ``safety_opcd``; ``verifier_kwargs`` go to it.
        retain_contexts: other contexts c' for the optional retention term (empty = off).
        retain_others: also retain every context of the train split (each record draws one that is not its
            own), so a method config can turn retention on without knowing the task's contexts.
        max_eval_items: cap on val/test items (None = all).
    """

    KNOB_CHECKS = (
        existing_file("train_file"), existing_file("val_file"), existing_file("test_file"),
        at_least("batch_size", 1), at_least("eval_batch_size", 1), at_least("max_prompt_length", 1),
        one_of("template", ("auto", "chat", "plain")), one_of("verifier", VERIFIER_NAMES),
        at_least("max_eval_items", 1), at_least("num_workers", 0),
    )

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, tokenizer: Optional[str] = None, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, max_prompt_length: int = 1024, template: str = "auto",
                 verifier: str = "exact", verifier_kwargs: Optional[dict[str, Any]] = None,
                 retain_contexts: Optional[list[str]] = None, retain_others: bool = False,
                 max_eval_items: Optional[int] = None, num_workers: int = 0, shuffle: bool = True, seed: int = 0):
        check_class_args(ContextPairDataModule, locals(), "data.")
        super().__init__()
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_prompt_length = max_prompt_length
        self.template = template
        self.verifier_name = verifier
        self.verifier = build_verifier(verifier, **(verifier_kwargs or {}))
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

    # -- loading ---------------------------------------------------------------------------------
    # -- the contract with the module, the evaluator and the CLI (docs/design.md, "Data") ---------------
    def connect(self, tokenizer) -> None:
        """Render with ``tokenizer`` (the student's) and check every split, before anything trains.

        The one call the module, the evaluation callback and the CLI make; calling it again with the same
        tokenizer is free. Standalone (no module), ``validate()`` loads ``data.tokenizer`` by path instead.
        """
        if tokenizer is not self.tokenizer:
            self.tokenizer, self.renderer, self._validated = tokenizer, None, False
        self.validate()

    def load_split_records(self, split: str) -> list[TaskRecord] | None:
        """Records of one split; subclasses (e.g. generated tasks) override this."""
        path = {"train": self.train_file, "val": self.val_file, "test": self.test_file}[split]
        return load_jsonl(path) if path else None

    def split_source(self, split: str) -> str:
        return str({"train": self.train_file, "val": self.val_file, "test": self.test_file}[split])

    def _ensure_tokenizer(self) -> None:
        """Standalone use (no ``connect``): load ``data.tokenizer`` by path."""
        if self.tokenizer is None:
            if self.tokenizer_path is None:
                raise DataError("no tokenizer: set data.tokenizer (the CLI links it to model.student)",
                                field="data.tokenizer")
            from lightning_ctx.models.loading import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_path)

    def validate(self) -> None:
        """Load every configured split and check it end to end; raises ``DataError`` before training."""
        if self._validated:
            return
        self._ensure_tokenizer()
        self.renderer = PromptRenderer(self.tokenizer, self.template)
        parse = answer_parser(self.verifier)
        for split in ("train", "val", "test"):
            records = self.load_split_records(split)
            if records is None:
                continue
            source = self.split_source(split)
            if split != "train" and self.max_eval_items is not None:
                records = records[: self.max_eval_items]
            for lineno, rec in enumerate(records, start=1):
                if parse(rec.answer) is None:
                    raise DataError(f"the {self.verifier_name!r} verifier cannot parse answer {rec.answer!r}",
                                    path=source, line=lineno, field="answer")
                n = len(self.renderer.ids(rec.prompt, rec.context))
                if n > self.max_prompt_length:
                    raise DataError(f"context + prompt is {n} tokens, longer than data.max_prompt_length="
                                    f"{self.max_prompt_length} (no silent truncation: shorten the record or "
                                    f"raise the limit)", path=source, line=lineno, field="context")
            self.splits[split] = records
        if "train" not in self.splits and not self.splits:
            raise DataError("no data: set data.train_file (and optionally val_file / test_file)",
                            field="data.train_file")
        if self.retain_others and "train" in self.splits:
            seen = dict.fromkeys([*self.retain_contexts, *(r.context for r in self.splits["train"])])
            if len(seen) < 2:
                raise DataError("the train split has a single context, so there are no others to retain: list "
                                "them in data.retain_contexts", path=self.split_source("train"),
                                field="data.retain_others")
            self.retain_contexts = list(seen)
        self._validated = True

    def longest_prompt(self) -> int:
        """Longest with-context rendering over all splits (for the model's position limit check)."""
        self.validate()
        return max((len(self.renderer.ids(r.prompt, r.context)) for recs in self.splits.values() for r in recs),
                   default=0)

    def setup(self, stage: str | None = None) -> None:
        self.validate()

    # -- loaders ---------------------------------------------------------------------------------
    def _collator(self, retain: bool) -> PairCollator:
        pad_id = self.tokenizer.pad_token_id
        return PairCollator(self.renderer, pad_id, self.retain_contexts if retain else None, seed=self.seed)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            raise DataError(f"no {split} data configured", field=f"data.{split}_file")
        records = self.splits[split]
        world, rank = self._ranks()
        sampler = ResumableSampler(len(records), shuffle=train and self.shuffle, seed=self.seed,
                                   num_replicas=world, rank=rank)
        if train:
            sampler.start_at(self._draws_done())
        return DataLoader(RecordDataset(records), batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, drop_last=False, num_workers=self.num_workers,
                          collate_fn=self._collator(retain=train))

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
        """The checked records of ``split`` (``train``, ``val``, ``test``); empty when not configured."""
        self.validate()
        return self.splits.get(split, [])

    def retention_records(self, split: str = "val") -> list[TaskRecord]:
        """Items under *other* contexts for the ``retention`` metric; none unless a task provides them."""
        return []
