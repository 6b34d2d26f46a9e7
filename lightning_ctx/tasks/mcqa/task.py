"""``MCQATask``: raw multiple-choice files (MedMCQA or generic) converted on the fly to records."""

from __future__ import annotations

import random
from typing import Optional

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import TASK_PREFIX, Task
from lightning_ctx.data.verifiers import ChoiceVerifier
from lightning_ctx.errors import DataError
from lightning_ctx.knobs import at_least, check_class_args, existing_file, one_of
from lightning_ctx.tasks.mcqa.convert import ANSWER_INSTRUCTION, load_mcqa, read_system_prompt


class MCQATask(Task):
    """Raw MedMCQA-style files -> records; the context is one system prompt; verifier ``ChoiceVerifier``.

    Args:
        train_file / val_file / test_file: raw MCQ files (JSONL or a JSON array; see the module docs).
        system_prompt / system_prompt_file: the context text (default: ``MEDICAL_SYSTEM_PROMPT``).
        cop_base: 0 for the Hugging Face MedMCQA export, 1 for the original release.
        skip_unanswered: drop rows without a gold answer instead of failing.
        instruction: the line after the options (``Answer with the letter of the correct option.``).
        val_size: with no ``val_file``, hold out this many training rows (a seeded choice) for validation
            (0 = no validation split).
        val_seed: seed of that held-out choice.
    """

    KNOB_CHECKS = (existing_file("train_file"), existing_file("val_file"), existing_file("test_file"),
                   existing_file("system_prompt_file"), one_of("cop_base", (0, 1)), at_least("val_size", 0))

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, system_prompt: Optional[str] = None,
                 system_prompt_file: Optional[str] = None, cop_base: int = 0, skip_unanswered: bool = False,
                 val_size: int = 0, val_seed: int = 0, instruction: str = ANSWER_INSTRUCTION):
        check_class_args(MCQATask, locals(), TASK_PREFIX)
        if val_size and val_file:
            raise DataError("set val_file or val_size, not both", field=f"{TASK_PREFIX}val_size")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.system_prompt = read_system_prompt(system_prompt, system_prompt_file)
        self.cop_base = cop_base
        self.skip_unanswered = skip_unanswered
        self.val_size, self.val_seed = val_size, val_seed
        self.instruction = instruction
        self.verifier = ChoiceVerifier()
        self._converted: dict[str, list[TaskRecord]] = {}

    def _file_records(self, path: str) -> list[TaskRecord]:
        if path not in self._converted:
            self._converted[path] = load_mcqa(path, self.system_prompt, cop_base=self.cop_base,
                                              skip_unanswered=self.skip_unanswered, instruction=self.instruction)
        return self._converted[path]

    def _heldout_ids(self, records: list[TaskRecord]) -> set[str]:
        if self.val_size >= len(records):
            raise DataError(f"val_size={self.val_size} leaves no training rows ({len(records)} in the file)",
                            path=self.files["train"], field=f"{TASK_PREFIX}val_size")
        order = list(range(len(records)))
        random.Random(f"mcqa-val:{self.val_seed}").shuffle(order)
        return {records[i].id for i in order[: self.val_size]}

    def load(self, split: str) -> list[TaskRecord] | None:
        if split in ("train", "val") and self.val_size and self.files["train"]:
            records = self._file_records(self.files["train"])
            held = self._heldout_ids(records)
            return [r for r in records if (r.id in held) == (split == "val")]
        path = self.files[split]
        return self._file_records(path) if path else None

    def source(self, split: str) -> str:
        if split == "val" and self.val_size and self.files["train"]:
            return f"{self.files['train']} (val_size={self.val_size} held-out rows)"
        return str(self.files[split])
