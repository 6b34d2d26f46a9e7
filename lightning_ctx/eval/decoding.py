"""Rendering records, decoding a model's responses and verifying them: the decoding half of the evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.render import PromptRenderer, left_pad
from lightning_ctx.data.verifiers import build_verifier
from lightning_ctx.rollout import Rollout, SamplingSettings, sample_responses

__all__ = ["Answers", "ResponseDecoder", "as_record"]


def as_record(obj: Any, source: str = "retention records") -> TaskRecord:
    if isinstance(obj, TaskRecord):
        return obj
    return TaskRecord.from_dict(obj, path=source)


@dataclass
class Answers:
    """One batch answered: the left-padded prompts, the rollout, response texts and right/wrong."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    rollout: Rollout
    texts: list[str]
    correct: list[bool]


class ResponseDecoder:
    """Renders ``(prompt, context)``, decodes ``model``'s responses, turns them into text and verifies them.

    ``verifier``: ``(response text, answer) -> right?`` or a verifier name (``exact``, ...); ``renderer``
    defaults to ``PromptRenderer(tokenizer)``, the EOS and pad ids to the tokenizer's; ``engine`` None = HF
    ``generate``.
    """

    def __init__(self, tokenizer, verifier: Callable | str, renderer: Optional[PromptRenderer] = None,
                 eos_token_ids: Optional[Sequence[int]] = None, pad_token_id: Optional[int] = None, engine=None):
        if isinstance(verifier, str):
            verifier = build_verifier(verifier)
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.renderer = renderer or PromptRenderer(tokenizer)
        self.eos_token_ids = [int(e) for e in (eos_token_ids if eos_token_ids is not None
                                               else [tokenizer.eos_token_id])]
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else tokenizer.pad_token_id)
        self.engine = engine

    def decode(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               settings: SamplingSettings) -> Rollout:
        """Responses of ``model`` for left-padded prompts (the seam tests replace with a script)."""
        return sample_responses(model, prompt_ids, prompt_mask, settings, self.eos_token_ids, self.pad_token_id,
                                self.engine)

    def texts(self, rollout: Rollout) -> list[str]:
        eos = set(self.eos_token_ids)
        out = []
        for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
            toks = [t for t, m in zip(ids, mask) if m and t not in eos]
            out.append(self.tokenizer.decode(toks, skip_special_tokens=True).strip())
        return out

    def answer(self, model, records: Sequence[TaskRecord], with_context: bool, settings: SamplingSettings,
               device: torch.device) -> Answers:
        rows = [self.renderer.ids(r.prompt, r.context if with_context else None) for r in records]
        ids, mask = left_pad(rows, self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        rollout = self.decode(model, ids, mask, settings)
        texts = self.texts(rollout)
        return Answers(ids, mask, rollout, texts, [bool(self.verifier(t, r.answer)) for t, r in zip(texts, records)])
