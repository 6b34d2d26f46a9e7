"""Batches of records rendered without and with their context: ``ContextPairBatch`` and its collator."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from lightning_ctx.data.render import PromptRenderer, left_pad


@dataclass
class ContextPairBatch:
    """A batch of records rendered without (``prompt_*``) and with (``ctx_prompt_*``) the context.

    Tensors are left-padded ``[B, P]``. Lightning moves the tensor fields to the device.
    ``retain_*`` (optional) render the same prompts under *other* contexts for the retention term.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    ctx_prompt_ids: torch.Tensor
    ctx_prompt_mask: torch.Tensor
    ids: list[str]
    contexts: list[str]
    prompts: list[str]
    answers: list[str]
    retain_prompt_ids: Optional[torch.Tensor] = None
    retain_prompt_mask: Optional[torch.Tensor] = None
    retain_contexts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class PairCollator:
    """Tokenizes records twice; picklable so DataLoader workers can use it."""

    def __init__(self, renderer: PromptRenderer, pad_id: int, retain_contexts: list[str] | None = None,
                 seed: int = 0):
        self.renderer = renderer
        self.pad_id = pad_id
        self.retain_contexts = list(retain_contexts or [])
        self.seed = seed

    def __call__(self, items: list) -> ContextPairBatch:
        # Items are (draw, record) from RecordDataset, or bare records (direct use in notebooks and tests).
        draws = [it[0] if isinstance(it, tuple) else i for i, it in enumerate(items)]
        records = [it[1] if isinstance(it, tuple) else it for it in items]
        plain = [self.renderer.ids(r.prompt) for r in records]
        with_ctx = [self.renderer.ids(r.prompt, r.context) for r in records]
        p_ids, p_mask = left_pad(plain, self.pad_id)
        c_ids, c_mask = left_pad(with_ctx, self.pad_id)
        batch = ContextPairBatch(p_ids, p_mask, c_ids, c_mask, [r.id for r in records],
                                 [r.context for r in records], [r.prompt for r in records],
                                 [r.answer for r in records])
        if self.retain_contexts:
            chosen = []
            for draw, r in zip(draws, records):
                pool = [c for c in self.retain_contexts if c != r.context] or self.retain_contexts
                chosen.append(random.Random(f"{self.seed}:{draw}").choice(pool))
            batch.retain_prompt_ids, batch.retain_prompt_mask = left_pad(
                [self.renderer.ids(r.prompt, c) for r, c in zip(records, chosen)], self.pad_id)
            batch.retain_contexts = chosen
        return batch
