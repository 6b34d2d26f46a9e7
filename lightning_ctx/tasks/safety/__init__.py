"""The ``safety`` task: a safety-analysis system prompt as the context, verdicts as ``<answer>yes|no</answer>``."""

from lightning_ctx.tasks.safety.rules import (
    OPCDVerdictVerifier,
    VerdictVerifier,
    normalize_verdict,
    read_verdict,
    read_verdict_opcd,
)
from lightning_ctx.tasks.safety.task import SafetyTask

__all__ = ["OPCDVerdictVerifier", "SafetyTask", "VerdictVerifier", "normalize_verdict", "read_verdict",
           "read_verdict_opcd"]
