"""Multiple-choice QA with a system prompt as the context (MedMCQA-style exports or generic rows)."""

from lightning_ctx.tasks.mcqa.convert import MEDICAL_SYSTEM_PROMPT, convert_rows, format_mcq_prompt, load_mcqa
from lightning_ctx.tasks.mcqa.datamodule import MCQADataModule

__all__ = ["MCQADataModule", "MEDICAL_SYSTEM_PROMPT", "convert_rows", "format_mcq_prompt", "load_mcqa"]
