"""MedMCQA in OPCD's system-prompt protocol: reasoning, then the chosen option as ``<answer>X</answer>``.

The context is a medical system prompt (``experiments/data/sys_medmcqa_prompt.txt``) that asks for the
reasoning first and then the letter of the chosen option inside one ``<answer>`` tag. The prompt is the
question with its lettered options (the ``content`` of a ``sys_medmcqa`` export row; raw MedMCQA rows with
``question``, ``opa``..``opd``, ``cop`` are formatted here). The answer is the gold letter.

How a response is read (:class:`TaggedChoiceVerifier`; anything else is **unparseable** = wrong):

* ``...reasoning... <answer>C</answer>`` -> ``C``; ``<answer> c </answer>`` -> ``C`` (the letter is unambiguous);
* text after the closing tag is allowed; text before it is the reasoning;
* no tag, a letter only in the reasoning (``the answer is C``), two tags, a tag in another case
  (``<Answer>``), anything but one letter inside (``<answer>C) Pancreas</answer>``, ``<answer>(C)</answer>``),
  or a missing closing tag -> unparseable.

OPCD's reading (:class:`OPCDChoiceVerifier`, ``scoring: opcd``; ``get_medmcqa_acc`` v1 of
``opcd/verl/verl/trainer/ppo/reward.py`` in microsoft/LMOps), over MedMCQA's four options A-D: take the text of the
**last** ``<answer>...</answer>`` pair, the tag in any case (:func:`~lightning_ctx.data.verifiers.last_tagged`);
the letter is the first parenthesised option letter in it (``(c)`` -> ``C``), else the first option letter
*anywhere* in it, in either case, even inside a word. So ``<answer>C) Pancreas</answer>`` -> ``C``,
``<answer>Pancreas (B)</answer>`` -> ``B``, ``<answer>A or B</answer>`` -> ``A``, but also
``<answer>The answer is B</answer>`` -> ``A`` (the ``a`` of "answer") and ``<answer>Pancreas</answer>`` -> ``A``.
No pair, or no option letter in the last one (``<answer>E</answer>``), is unparseable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from lightning_ctx.data.exports import MISSING, ExportTask, field_value
from lightning_ctx.data.verifiers import extract_tagged, last_tagged
from lightning_ctx.errors import DataError
from lightning_ctx.tasks.mcqa.convert import LETTERS, row_to_record

__all__ = ["OPCD_LETTERS", "OPCDChoiceVerifier", "SysMCQATask", "TaggedChoiceVerifier", "normalize_choice",
           "read_choice", "read_choice_opcd"]

_GOLD = re.compile(r"^\(?([A-Ja-j])[).:]?$")
OPCD_LETTERS = "ABCD"  # OPCD's scorer knows MedMCQA's four options only


def read_choice(response: str, letters: str = LETTERS) -> Optional[str]:
    """The option letter inside the one ``<answer>`` tag (upper-cased); None when unparseable."""
    inside = extract_tagged(response)
    if inside is None or len(inside) != 1:
        return None
    letter = inside.upper()
    return letter if letter in letters else None


def read_choice_opcd(response: str, letters: str = OPCD_LETTERS) -> Optional[str]:
    """OPCD's reading (see the module docs): the first parenthesised, else the first bare, option letter in the
    last ``<answer>`` pair, upper-cased; None when there is no pair or no option letter in it."""
    inside = last_tagged(response)
    if inside is None:
        return None
    options = re.escape(letters.upper() + letters.lower())
    parenthesised = re.search(rf"\(([{options}]?)\)", inside)  # "()" matches too, and then falls through, as in OPCD
    if parenthesised and parenthesised.group(1):
        return parenthesised.group(1).upper()
    bare = re.search(rf"[{options}]", inside)
    return bare.group(0).upper() if bare else None


def normalize_choice(value: Any) -> Optional[str]:
    """A gold option from an export: a letter (``C``, ``c``, ``(C)``, ``C)``), ``<answer>C</answer>``, or an
    integer index counted from 0 (as MedMCQA's ``cop`` in the Hugging Face export); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return LETTERS[value] if 0 <= value < len(LETTERS) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if "<" in text:
        return read_choice(text)
    m = _GOLD.match(text)
    return m.group(1).upper() if m else None


class TaggedChoiceVerifier:
    """``(response, gold letter) -> right?``: right only when the tagged letter is readable and equal."""

    def __init__(self, letters: str = LETTERS):
        self.letters = letters

    def extract(self, response: str) -> Optional[str]:
        return read_choice(response, self.letters)

    def parse_answer(self, answer: str) -> Optional[str]:
        return normalize_choice(answer)

    def __call__(self, response: str, answer: str) -> bool:
        got = read_choice(response, self.letters)
        return got is not None and got == normalize_choice(answer)


class OPCDChoiceVerifier:
    """OPCD's scoring: right when the letter :func:`read_choice_opcd` reads equals the gold letter. A gold letter
    outside ``letters`` (A-D) is unreadable: this verifier could never score it right."""

    def __init__(self, letters: str = OPCD_LETTERS):
        self.letters = letters.upper()

    def extract(self, response: str) -> Optional[str]:
        return read_choice_opcd(response, self.letters)

    def parse_answer(self, answer: str) -> Optional[str]:
        gold = normalize_choice(answer)
        return gold if gold is not None and gold in self.letters else None

    def __call__(self, response: str, answer: str) -> bool:
        got = read_choice_opcd(response, self.letters)
        return got is not None and got == self.parse_answer(answer)


class SysMCQATask(ExportTask):
    """MedMCQA with OPCD's medical system prompt as the context (verifier ``TaggedChoiceVerifier`` for ``scoring:
    strict``, ``OPCDChoiceVerifier`` for ``opcd``; see the module docs).

    Reads ``sys_medmcqa_{train,test}`` exports through a field map (assumed layout: ``content`` = the question
    with its lettered options, ``answer`` or ``reward_model.ground_truth`` = the gold letter or a 0-based
    index; see ``lightning_ctx.data.exports``). Rows in the raw MedMCQA layout (``question``, ``opa``..``opd``,
    ``cop`` counted from 0) are formatted as ``Question: ...`` / ``Options:`` / ``A) ...`` lines instead.
    Args as in :class:`~lightning_ctx.data.exports.ExportTask`.
    """

    VERIFIERS = {"strict": TaggedChoiceVerifier, "opcd": OPCDChoiceVerifier}
    ANSWER_TAG = "<answer>"
    FORMAT_EXAMPLE = "End with the letter of your final choice as <answer>X</answer>."
    ID_PREFIX = "medmcqa-"

    @staticmethod
    def normalize_answer(value: Any) -> Optional[str]:
        return normalize_choice(value)

    def convert(self, rows: Iterable[tuple[int, Any]], path: str | Path | None = None) -> list[dict]:
        prompt_key = self.fields["prompt"].split("|")[0]
        answer_key = self.fields["answer"].split("|")[0]
        out = []
        for line, row in rows:
            raw_medmcqa = isinstance(row, dict) and "question" in row and field_value(row, self.fields["prompt"]) \
                is MISSING and "." not in prompt_key + answer_key
            if raw_medmcqa:
                rec = row_to_record(row, self.context, index=line, instruction="", path=path, line=line)
                if rec is None:  # MedMCQA's unlabeled rows (cop = -1)
                    if self.skip_unlabeled:
                        continue
                    raise DataError("no gold answer (cop is -1 or missing): set skip_unlabeled to drop such "
                                    "rows", path=path, line=line, field="cop")
                row = {**row, prompt_key: rec["prompt"], answer_key: rec["answer"]}
            out.append((line, row))
        return super().convert(out, path)
