"""The ``safety`` task: a safety-analysis system prompt as the context, verdicts as ``<answer>yes|no</answer>``."""

from lightning_ctx.tasks.safety.datamodule import SafetyDataModule
from lightning_ctx.tasks.safety.rules import (
    OPCDVerdictVerifier,
    VerdictVerifier,
    normalize_verdict,
    read_verdict,
    read_verdict_opcd,
)

__all__ = ["OPCDVerdictVerifier", "SafetyDataModule", "VerdictVerifier", "normalize_verdict", "read_verdict",
           "read_verdict_opcd"]
