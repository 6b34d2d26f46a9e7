"""``WorldDataModule``: the rule world's records, generated from seeds (no files), for distillation."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import TaskRecord
from lightning_ctx.errors import DataError
from lightning_ctx.knobs import at_least, check_class_args
from lightning_ctx.tasks.world import rules as world


class WorldDataModule(ContextPairDataModule):
    """The built-in rule world (docs/design.md, "The rule world"): records are generated from seeds, no files needed.

    Args:
        target_context: the context to internalize (e.g. ``SHOW``, ``ADD2``).
        n_train / n_val / n_test: records per split (inputs of the splits are disjoint pools).
        data_seed: seed of the record draw (independent of ``seed_everything``).
        retain_others: feed the retention term with every other in-distribution context.
        retention_contexts / retention_items: how many other contexts, and items each, the
            evaluation uses to measure ``retention`` (accuracy on c' != target vs the initial model).
        Other arguments as in ``ContextPairDataModule``; ``verifier`` is always ``world``.
    """

    KNOB_CHECKS = (at_least("n_train", 1), at_least("n_val", 0), at_least("n_test", 0),
                   at_least("retention_contexts", 1), at_least("retention_items", 1))

    def __init__(self, target_context: str = "SHOW", n_train: int = 800, n_val: int = 100, n_test: int = 100,
                 data_seed: int = 0, retain_others: bool = False, retention_contexts: int = 8,
                 retention_items: int = 25, tokenizer: Optional[str] = None, batch_size: int = 64,
                 eval_batch_size: Optional[int] = None, max_prompt_length: int = 64, template: str = "auto",
                 max_eval_items: Optional[int] = None, num_workers: int = 0, shuffle: bool = True, seed: int = 0):
        check_class_args(WorldDataModule, locals(), "data.")
        target = world.normalize_context(target_context)
        if target not in world.ALL_CONTEXTS:
            raise DataError(f"unknown world context {target_context!r}; examples: {world.ALL_CONTEXTS[:6]}",
                            field="data.target_context")
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         max_prompt_length=max_prompt_length, template=template, verifier="world",
                         retain_contexts=world.other_contexts(target) if retain_others else None,
                         max_eval_items=max_eval_items, num_workers=num_workers, shuffle=shuffle, seed=seed)
        self.target_context = target
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.data_seed = data_seed
        self.retention_contexts = retention_contexts
        self.retention_items = retention_items

    def load_split_records(self, split: str) -> list[TaskRecord] | None:
        if self.sizes[split] <= 0:
            return None
        return [TaskRecord.from_dict(r) for r in
                world.make_records(self.target_context, self.sizes[split], seed=self.data_seed, split=split)]

    def split_source(self, split: str) -> str:
        return f"world:{self.target_context}:{split}"

    def retention_records(self, split: str = "val") -> list[TaskRecord]:
        """Held-out items of ``split`` under other contexts c' (seeded choice), with their answers under c'."""
        others = world.other_contexts(self.target_context)
        rng = torch.Generator().manual_seed(self.data_seed)
        chosen = [others[i] for i in torch.randperm(len(others), generator=rng)[: self.retention_contexts].tolist()]
        return [TaskRecord.from_dict(r) for c in chosen
                for r in world.make_records(c, self.retention_items, seed=self.data_seed, split=split)]
