"""``SafetyDataModule``: OPCD-style safety exports (parquet / JSONL) -> paired-context batches."""

from __future__ import annotations

from typing import Any, Optional

from lightning_ctx.data.exports import ExportDataModule
from lightning_ctx.tasks.safety.rules import normalize_verdict


class SafetyDataModule(ExportDataModule):
    """The ``safety`` task: the context is the safety system prompt, the prompt a user message, the answer the
    gold verdict ``yes`` / ``no`` (verifier ``safety``: the response's ``<answer>`` tag).

    Reads ``sys_safety_{train,test}`` exports through a field map (assumed layout: ``content`` = the user
    message, ``answer`` or ``reward_model.ground_truth`` = the verdict; see ``lightning_ctx.data.exports``).
    Gold verdicts may be ``yes``/``no`` (any case), booleans, ``true``/``false`` or ``<answer>yes</answer>``.
    Args as in :class:`~lightning_ctx.data.exports.ExportDataModule`.
    """

    VERIFIER = "safety"
    ID_PREFIX = "safety-"

    @staticmethod
    def normalize_answer(value: Any) -> Optional[str]:
        return normalize_verdict(value)
