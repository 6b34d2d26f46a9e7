"""``WorldTask``: the rule world's records, generated from seeds (no files), for distillation."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import TASK_PREFIX, Task
from lightning_ctx.errors import DataError
from lightning_ctx.knobs import at_least, check_class_args, renamed
from lightning_ctx.tasks.world import rules as world


class WorldTask(Task):
    """The built-in rule world (docs/design.md, "The rule world"): records are generated from seeds, no files needed;
    verifier ``world_verifier``.

    Args:
        target_context: the context to internalize (e.g. ``SHOW``, ``ADD2``).
        n_train / n_val / n_test: records per split (inputs of the splits are disjoint pools).
        data_seed: seed of the record draw (independent of ``seed_everything``).
        eval_other_contexts / eval_other_items: how many other contexts, and items each, the evaluation uses to
            measure ``retention`` (accuracy on c' != target vs the initial model).
        retention_contexts / retention_items: the old names of eval_other_contexts / eval_other_items (deprecated,
            with a warning; removed in the next release).

    With ``data.retain_others`` the retention *term* draws from every other in-distribution context.
    """

    KNOB_CHECKS = (at_least("n_train", 1), at_least("n_val", 0), at_least("n_test", 0),
                   at_least("eval_other_contexts", 1), at_least("eval_other_items", 1),
                   at_least("retention_contexts", 1), at_least("retention_items", 1))

    def __init__(self, target_context: str = "SHOW", n_train: int = 800, n_val: int = 100, n_test: int = 100,
                 data_seed: int = 0, eval_other_contexts: int = 8, eval_other_items: int = 25,
                 retention_contexts: Optional[int] = None, retention_items: Optional[int] = None):
        check_class_args(WorldTask, locals(), TASK_PREFIX)
        target = world.normalize_context(target_context)
        if target not in world.ALL_CONTEXTS:
            raise DataError(f"unknown world context {target_context!r}; examples: {world.ALL_CONTEXTS[:6]}",
                            field=f"{TASK_PREFIX}target_context")
        self.target_context = target
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.data_seed = data_seed
        self.eval_other_contexts = renamed("retention_contexts", "eval_other_contexts", retention_contexts,
                                           eval_other_contexts, 8, TASK_PREFIX)
        self.eval_other_items = renamed("retention_items", "eval_other_items", retention_items, eval_other_items, 25,
                                        TASK_PREFIX)
        self.verifier = world.world_verifier

    def load(self, split: str) -> list[TaskRecord] | None:
        if self.sizes[split] <= 0:
            return None
        return [TaskRecord.from_dict(r) for r in
                world.make_records(self.target_context, self.sizes[split], seed=self.data_seed, split=split)]

    def source(self, split: str) -> str:
        return f"world:{self.target_context}:{split}"

    def retain_others(self, train: list[TaskRecord]) -> list[str]:
        """Every in-distribution context but the target (the train split holds the target only)."""
        return world.other_contexts(self.target_context)

    def eval_other_records(self, split: str = "val") -> list[TaskRecord]:
        """Held-out items of ``split`` under other contexts c' (seeded choice), with their answers under c'."""
        others = world.other_contexts(self.target_context)
        rng = torch.Generator().manual_seed(self.data_seed)
        chosen = [others[i] for i in torch.randperm(len(others), generator=rng)[: self.eval_other_contexts].tolist()]
        return [TaskRecord.from_dict(r) for c in chosen
                for r in world.make_records(c, self.eval_other_items, seed=self.data_seed, split=split)]
