"""``FrozenLakeTask``: seeded, solvable FrozenLake maps as single-response records (no files)."""

from __future__ import annotations

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import TASK_PREFIX, Task
from lightning_ctx.errors import DataError
from lightning_ctx.knobs import at_least, check_class_args, within
from lightning_ctx.tasks.frozenlake.rules import DEFAULT_HINT, FrozenLakeVerifier, make_frozenlake_records


class FrozenLakeTask(Task):
    """FrozenLake records generated from seeds (no files), verifier ``FrozenLakeVerifier``.

    Args:
        n_train / n_val / n_test: maps per split (splits never share a map; 0 = no such split).
        size / hole_prob: grid side and hole probability of each non-start, non-goal tile.
        data_seed: seed of the map draw (independent of ``seed_everything``).
        context: the privileged hint / experience text (default ``DEFAULT_HINT``).
        strict: fail responses that keep moving after reaching G (default: the episode ends at G).

    For files instead: ``python -m lightning_ctx.tasks.frozenlake.rules --out DIR`` and the JSONL task with
    ``verifier: lightning_ctx.tasks.frozenlake.rules:FrozenLakeVerifier``.
    """

    KNOB_CHECKS = (at_least("n_train", 1), at_least("n_val", 0), at_least("n_test", 0), at_least("size", 2),
                   within("hole_prob", 0, 1, high_open=True))

    def __init__(self, n_train: int = 1000, n_val: int = 100, n_test: int = 0, size: int = 4, hole_prob: float = 0.2,
                 data_seed: int = 0, context: str = DEFAULT_HINT, strict: bool = False):
        check_class_args(FrozenLakeTask, locals(), TASK_PREFIX)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.size, self.hole_prob, self.data_seed, self.context = size, hole_prob, data_seed, context
        self.verifier = FrozenLakeVerifier(strict=strict)

    def load(self, split: str) -> list[TaskRecord] | None:
        if self.sizes[split] <= 0:
            return None
        try:
            return make_frozenlake_records(self.sizes[split], size=self.size, hole_prob=self.hole_prob,
                                           seed=self.data_seed, split=split, context=self.context, as_dicts=False)
        except RuntimeError as err:
            raise DataError(str(err), field=f"{TASK_PREFIX}n_{split}") from None

    def source(self, split: str) -> str:
        return f"frozenlake:{self.size}x{self.size}:{split}"
