"""Multiple-choice QA with a system prompt as the context: MedMCQA-style rows with a short letter answer
(``MCQADataModule``, verifier ``choice``) or OPCD's protocol with the tagged answer (``SysMCQADataModule``,
verifier ``mcqa_tagged``, or ``mcqa_opcd`` for OPCD's own scoring)."""

from lightning_ctx.tasks.mcqa.convert import MEDICAL_SYSTEM_PROMPT, convert_rows, format_mcq_prompt, load_mcqa
from lightning_ctx.tasks.mcqa.datamodule import MCQADataModule
from lightning_ctx.tasks.mcqa.tagged import (
    OPCDChoiceVerifier,
    SysMCQADataModule,
    TaggedChoiceVerifier,
    normalize_choice,
    read_choice,
    read_choice_opcd,
)

__all__ = ["MCQADataModule", "MEDICAL_SYSTEM_PROMPT", "OPCDChoiceVerifier", "SysMCQADataModule", "TaggedChoiceVerifier",
           "convert_rows", "format_mcq_prompt", "load_mcqa", "normalize_choice", "read_choice", "read_choice_opcd"]
