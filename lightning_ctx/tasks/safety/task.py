"""``SafetyTask``: OPCD-style safety exports (parquet / JSONL) as records."""

from __future__ import annotations

from typing import Any, Optional

from lightning_ctx.data.exports import ExportTask
from lightning_ctx.tasks.safety.rules import OPCDVerdictVerifier, VerdictVerifier, normalize_verdict


class SafetyTask(ExportTask):
    """The ``safety`` task: the context is the safety system prompt, the prompt a user message, the answer the
    gold verdict ``yes`` / ``no`` (verifier ``VerdictVerifier`` for ``scoring: strict``, ``OPCDVerdictVerifier`` for
    ``opcd``: the response's ``<answer>`` tag, see ``lightning_ctx.tasks.safety.rules``).

    Reads ``sys_safety_{train,test}`` exports through a field map (assumed layout: ``content`` = the user
    message, ``answer`` or ``reward_model.ground_truth`` = the verdict; see ``lightning_ctx.data.exports``).
    Gold verdicts may be ``yes``/``no`` (any case), booleans, ``true``/``false`` or ``<answer>yes</answer>``.
    Args as in :class:`~lightning_ctx.data.exports.ExportTask`.
    """

    VERIFIERS = {"strict": VerdictVerifier, "opcd": OPCDVerdictVerifier}
    ANSWER_TAG = "<answer>"
    FORMAT_EXAMPLE = "Give your verdict as <answer>yes</answer> (refuse) or <answer>no</answer> (safe to help)."
    ID_PREFIX = "safety-"

    @staticmethod
    def normalize_answer(value: Any) -> Optional[str]:
        return normalize_verdict(value)
