"""Multiple-choice QA with a system prompt as the context: MedMCQA-style rows with a short letter answer
(``MCQATask``, verifier ``ChoiceVerifier``) or OPCD's protocol with the tagged answer (``SysMCQATask``,
verifier ``TaggedChoiceVerifier``, or ``OPCDChoiceVerifier`` for OPCD's own scoring)."""

from lightning_ctx.tasks.mcqa.convert import MEDICAL_SYSTEM_PROMPT, convert_rows, format_mcq_prompt, load_mcqa
from lightning_ctx.tasks.mcqa.tagged import (
    OPCDChoiceVerifier,
    SysMCQATask,
    TaggedChoiceVerifier,
    normalize_choice,
    read_choice,
    read_choice_opcd,
)
from lightning_ctx.tasks.mcqa.task import MCQATask

__all__ = ["MCQATask", "MEDICAL_SYSTEM_PROMPT", "OPCDChoiceVerifier", "SysMCQATask", "TaggedChoiceVerifier",
           "convert_rows", "format_mcq_prompt", "load_mcqa", "normalize_choice", "read_choice", "read_choice_opcd"]
