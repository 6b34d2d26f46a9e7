"""The distillation loss of one batch: teacher and student passes on fixed rollouts, then the objectives.

    L = L_opd + anchor_weight * L_anchor (+ retain_weight * L_retain)     (docs/design.md, "Objectives")

Apart from Lightning: it takes the student, a teacher-scoring function and an optional token scale (the
module supplies the DDP one), so it can be called on plain models in tests and notebooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from lightning_ctx import objectives
from lightning_ctx.data.datamodule import ContextPairBatch
from lightning_ctx.models.scoring import ScoringInputs, join_prompt_and_response, response_logits
from lightning_ctx.rollout import Rollout

AUTO_CHUNK_MIN_VOCAB = 32768


def auto_chunk_size(batch_size: int, vocab_size: int, budget_mib: int = 256,
                    min_vocab: int = AUTO_CHUNK_MIN_VOCAB) -> Optional[int]:
    """Sequence chunk so that one float32 ``[batch_size, chunk, vocab_size]`` block is <= ``budget_mib`` MiB.

    None (unchunked) below ``min_vocab``: small vocabularies gain nothing from chunking. Never below 1.
    """
    if vocab_size < min_vocab:
        return None
    return max(1, (budget_mib * 2 ** 20) // (4 * max(batch_size, 1) * vocab_size))


TeacherFn = Callable[[ScoringInputs], torch.Tensor]
TokenScaleFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class DistillationLoss:
    """The loss knobs of ``model.*`` (see ``OnPolicyDistillation``) and the shared vocabulary size."""

    vocab_size: int
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    scope: str = "full"
    topk: int = 256
    topk_union_teacher: bool = False
    topk_renormalize: bool = False  # OPCD's default; the objectives' own default (True) is for direct callers
    chunk_size: Optional[int] = None
    auto_chunk: bool = True
    auto_chunk_mib: int = 256
    anchor_weight: float = 0.0
    anchor_direction: str = "forward"
    detach_anchor: bool = True
    retain_weight: float = 0.0

    @classmethod
    def from_hparams(cls, hparams: Mapping, vocab_size: int) -> DistillationLoss:
        names = [f for f in cls.__dataclass_fields__ if f != "vocab_size"]
        return cls(vocab_size=vocab_size, **{n: hparams[n] for n in names if n in hparams})

    def chunk_for(self, batch_size: int) -> Optional[int]:
        """The sequence chunk of the KL terms: ``chunk_size`` if set, else the automatic choice (or None)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return auto_chunk_size(batch_size, self.vocab_size, self.auto_chunk_mib) if self.auto_chunk else None

    def divergence_term(self, student_logits, teacher_logits, tokens, mask, chunk_size=None) -> torch.Tensor:
        if self.divergence == "sampled":
            teacher_lp = objectives.token_logprobs(teacher_logits, tokens, chunk_size=chunk_size)
            return objectives.sampled_token_loss(student_logits, teacher_lp, tokens, mask, chunk_size=chunk_size)
        return objectives.token_divergence(student_logits, teacher_logits, mask, kind=self.divergence,
                                           beta=self.jsd_beta, scope=self.scope, topk=self.topk,
                                           chunk_size=chunk_size, topk_union_teacher=self.topk_union_teacher,
                                           topk_renormalize=self.topk_renormalize)

    def _teacher_term(self, student, teacher_fn: TeacherFn, student_in: ScoringInputs, teacher_in: ScoringInputs,
                      rollout: Rollout, chunk, token_scale: TokenScaleFn):
        """The teacher-matching term on one rollout: ``(term, student_logits, teacher seconds)``."""
        t0 = time.perf_counter()
        teacher_logits = teacher_fn(teacher_in)
        seconds = time.perf_counter() - t0
        student_logits = response_logits(student, student_in, self.vocab_size)
        term = self.divergence_term(student_logits, teacher_logits, rollout.response_ids, rollout.response_mask,
                                    chunk)
        del teacher_logits  # never keep [B, R, V] teacher logits alive past the term that needs them
        scale = token_scale(rollout.response_mask)
        return (term if scale is None else term * scale), student_logits, seconds

    def __call__(self, student, teacher_fn: TeacherFn, batch: ContextPairBatch, rollout: Rollout,
                 retain_rollout: Optional[Rollout] = None,
                 token_scale: TokenScaleFn = lambda mask: None) -> dict[str, torch.Tensor]:
        """Every term for ``batch`` and its fixed rollout(s); ``loss`` is their weighted sum.

        Memory: every KL runs chunked over the sequence under activation checkpointing, so no float32
        ``[B, R, V]`` log-probs are saved for backward; what stays alive across the with-context forward is the
        no-context logits in the model's dtype (the anchor) and the no-context activations. A two-stage
        backward would free those too, but needs manual optimization (and loses Lightning's accumulation,
        clipping and single-backward DDP semantics), so it is not done.
        """
        mask, tokens = rollout.response_mask, rollout.response_ids
        chunk = self.chunk_for(tokens.shape[0])
        # multi-turn episodes attend to observation tokens the loss masks out (lightning_ctx.rollout_episodes)
        attention = getattr(rollout, "response_attention", None)
        attention = mask if attention is None else attention
        student_in = join_prompt_and_response(batch.prompt_ids, batch.prompt_mask, tokens, attention)
        ctx_in = join_prompt_and_response(batch.ctx_prompt_ids, batch.ctx_prompt_mask, tokens, attention)
        opd, student_logits, teacher_s = self._teacher_term(student, teacher_fn, student_in, ctx_in, rollout, chunk,
                                                            token_scale)
        out = {"opd": opd}
        loss = opd
        if self.anchor_weight > 0:
            ctx_student_logits = response_logits(student, ctx_in, self.vocab_size)
            anchor = objectives.anchored_consistency(student_logits, ctx_student_logits, mask,
                                                     direction=self.anchor_direction,
                                                     detach_anchor=self.detach_anchor, scope=self.scope,
                                                     topk=self.topk, topk_renormalize=self.topk_renormalize,
                                                     chunk_size=chunk)
            scale = token_scale(mask)
            out["anchor"] = anchor if scale is None else anchor * scale
            loss = loss + self.anchor_weight * out["anchor"]
        if self.retain_weight > 0 and retain_rollout is not None:
            # the student's own response under another context c', scored by student and teacher with c'
            r_in = join_prompt_and_response(batch.retain_prompt_ids, batch.retain_prompt_mask,
                                            retain_rollout.response_ids, retain_rollout.response_mask)
            out["retain"], _, r_teacher_s = self._teacher_term(student, teacher_fn, r_in, r_in, retain_rollout, chunk,
                                                               token_scale)
            teacher_s += r_teacher_s
            loss = loss + self.retain_weight * out["retain"]
        out["loss"] = loss
        out["tokens"] = mask.sum()
        if "retain" in out:
            out["retain_tokens"] = retain_rollout.response_mask.sum()
        with torch.no_grad():
            out["entropy"] = objectives.token_entropy(student_logits.detach(), mask, chunk_size=chunk)
        out["time_teacher_s"] = torch.tensor(teacher_s)
        return out
