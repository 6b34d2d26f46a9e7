"""The distillation objective of one batch: its terms, the forward passes they share, their weighted sum.

    L = sum_k weight_k * L_k     (docs/design.md, "Objectives")

A term is data (:class:`LossTerm`): a ``name`` (logged as ``train/<name>``), a ``weight``, the ``rollout`` it is
computed on and normalised by, and how it is computed from the batch's forward passes (:class:`Passes`: each pass
computed once and shared between terms). Rollouts: ``student`` (the student's own responses without the context),
``retain`` (its responses under *other* contexts c'), ``teacher`` (the teacher's responses with the context). Every
term is a per-token mean over its rollout's tokens. The module samples the rollouts the terms ask for, and logs,
checks for non-finite values and accumulates per-token sums by iterating over the terms, so a term from outside the
package (``model.extra_terms``) is logged, normalised and checked like the built-in ones:

* ``opd`` (:class:`TeacherMatching`, weight ``model.opd_weight``): the divergence to the teacher with the context, on
  the student's own responses (reverse KL by default);
* ``anchor`` (:class:`AnchoredConsistency`, ``model.anchor_weight``): KL(sg[p_student(.|x, y<t)] ||
  p_student(.|c, x, y<t)), reusing the no-context logits of the ``opd`` pass (one extra with-context forward);
* ``retain`` (:class:`OtherContextRetention`, ``model.retain_weight``): the divergence to the teacher under another
  context c', on the student's responses to (c', x);
* ``offpolicy`` (:class:`OffPolicyContextDistillation`, OPCD's off-policy baseline): the teacher samples with the
  context, the student learns on those tokens (forward KL(T || student), as OPCD's baseline trains).

Apart from Lightning: it takes the student, a teacher-scoring function and an optional token scale (the module
supplies the DDP one), so it can be called on plain models in tests and notebooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from lightning_ctx import objectives
from lightning_ctx.data.batches import ContextPairBatch
from lightning_ctx.models.scoring import ScoringInputs, join_prompt_and_response, response_logits
from lightning_ctx.rollout import Rollout

AUTO_CHUNK_MIN_VOCAB = 32768
ROLLOUTS = ("student", "retain", "teacher")
# the batch fields each rollout's responses follow: (without the context, with it); under another context c' both
# the student and the teacher see c'
PREFIXES = {"student": ("prompt", "ctx_prompt"), "teacher": ("prompt", "ctx_prompt"),
            "retain": ("retain_prompt", "retain_prompt")}


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


class Passes:
    """The forward passes of one batch, computed when a term first asks for them.

    The student's no-context logits of a rollout are kept (the anchor reuses the OPD pass's); teacher logits and the
    student's with-context logits are not (never keep ``[B, R, V]`` teacher logits past the term that needs them).
    """

    def __init__(self, settings: DistillationLoss, student, teacher_fn: TeacherFn, batch: ContextPairBatch,
                 rollouts: Mapping[str, Rollout]):
        self.settings, self.student, self.teacher_fn, self.batch = settings, student, teacher_fn, batch
        self.rollouts = dict(rollouts)
        self.teacher_seconds = 0.0
        self._student_logits: dict[str, torch.Tensor] = {}

    def rollout(self, name: str) -> Rollout:
        return self.rollouts[name]

    def mask(self, name: str) -> torch.Tensor:
        return self.rollouts[name].response_mask

    def chunk(self, name: str) -> Optional[int]:
        return self.settings.chunk_for(self.rollouts[name].response_ids.shape[0])

    def inputs(self, name: str, with_context: bool) -> ScoringInputs:
        """``prefix | response`` of rollout ``name``; the prefix without or with the context (see ``PREFIXES``)."""
        r = self.rollouts[name]
        field_name = PREFIXES[name][int(with_context)]
        ids, mask = getattr(self.batch, f"{field_name}_ids"), getattr(self.batch, f"{field_name}_mask")
        # multi-turn episodes attend to observation tokens the loss masks out (lightning_ctx.rollout_episodes)
        attention = getattr(r, "response_attention", None)
        return join_prompt_and_response(ids, mask, r.response_ids, r.response_mask if attention is None else attention)

    def student_logits(self, name: str) -> torch.Tensor:
        """The student without the context (with gradient), computed once per rollout."""
        if name not in self._student_logits:
            self._student_logits[name] = response_logits(self.student, self.inputs(name, False),
                                                         self.settings.vocab_size)
        return self._student_logits[name]

    def context_student_logits(self, name: str) -> torch.Tensor:
        """The student with the context (with gradient)."""
        return response_logits(self.student, self.inputs(name, True), self.settings.vocab_size)

    def teacher_logits(self, name: str) -> torch.Tensor:
        """The teacher with the context (no gradient); its time is counted in ``teacher_seconds``."""
        t0 = time.perf_counter()
        logits = self.teacher_fn(self.inputs(name, True))
        self.teacher_seconds += time.perf_counter() - t0
        return logits

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str,
                   kind: Optional[str] = None) -> torch.Tensor:
        """``model.divergence`` (or ``kind``) between student and teacher at rollout ``name``'s tokens, in
        ``model.scope``."""
        s, r = self.settings, self.rollouts[name]
        kind = kind or s.divergence
        if kind == "sampled":
            teacher_lp = objectives.token_logprobs(teacher_logits, r.response_ids, chunk_size=self.chunk(name))
            return objectives.sampled_token_loss(student_logits, teacher_lp, r.response_ids, r.response_mask,
                                                 chunk_size=self.chunk(name))
        return objectives.token_divergence(student_logits, teacher_logits, r.response_mask, kind=kind,
                                           beta=s.jsd_beta, scope=s.scope, topk=s.topk, chunk_size=self.chunk(name),
                                           topk_union_teacher=s.topk_union_teacher,
                                           topk_renormalize=s.topk_renormalize)


class LossTerm:
    """One weighted term of the objective (see the module docstring). Subclasses set ``name`` and ``rollout`` and
    implement :meth:`compute`: a per-token mean over the rollout's tokens (connected to the student's graph).

    Args:
        weight: the term's weight in the loss (>= 0).
    """

    name = ""
    rollout = "student"
    prog_bar = False  # also shown on the progress bar

    def __init__(self, weight: float = 1.0):
        if not weight >= 0:
            raise ValueError(f"{type(self).__name__}: weight must be >= 0, got {weight}")
        if not self.name or self.rollout not in ROLLOUTS:
            raise TypeError(f"{type(self).__name__} must set a name and a rollout in {ROLLOUTS}")
        self.weight = float(weight)

    def applies(self, passes: Passes) -> bool:
        """Whether this batch has what the term needs (its rollout)."""
        return self.rollout in passes.rollouts

    def compute(self, passes: Passes) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


class TeacherMatching(LossTerm):
    """``opd``: ``model.divergence`` (reverse KL by default) to the teacher with the context, on the student's own
    responses without it."""

    name, rollout, prog_bar = "opd", "student", True

    def compute(self, passes: Passes) -> torch.Tensor:
        teacher = passes.teacher_logits(self.rollout)
        term = passes.divergence(passes.student_logits(self.rollout), teacher, self.rollout)
        del teacher
        return term


class AnchoredConsistency(LossTerm):
    """``anchor``: KL(sg[s_t] || q_t) on the student's own responses (direction and stop-gradient from
    ``model.anchor_direction`` / ``model.detach_anchor``); ``s_t`` is the ``opd`` pass's no-context logits."""

    name, rollout, prog_bar = "anchor", "student", True

    def compute(self, passes: Passes) -> torch.Tensor:
        s = passes.settings
        return objectives.anchored_consistency(passes.student_logits(self.rollout),
                                               passes.context_student_logits(self.rollout), passes.mask(self.rollout),
                                               direction=s.anchor_direction, detach_anchor=s.detach_anchor,
                                               scope=s.scope, topk=s.topk, topk_renormalize=s.topk_renormalize,
                                               chunk_size=passes.chunk(self.rollout))


class OtherContextRetention(LossTerm):
    """``retain``: the ``opd`` divergence under another context c', on the student's own responses to (c', x), so
    distillation does not make the student blind to c'."""

    name, rollout = "retain", "retain"

    def compute(self, passes: Passes) -> torch.Tensor:
        teacher = passes.teacher_logits(self.rollout)
        return passes.divergence(passes.student_logits(self.rollout), teacher, self.rollout)


class OffPolicyContextDistillation(LossTerm):
    """``offpolicy``: OPCD's off-policy baseline. The teacher samples a response *with* the context; the student,
    without it, learns on those tokens by forward KL(T_t || s_t) over ``model.scope`` (the baseline of OPCD's
    public code trains the same way). Use it instead of ``opd`` (``builtin:methods/offpolicy_cd.yaml``)."""

    name, rollout, prog_bar = "offpolicy", "teacher", True

    def compute(self, passes: Passes) -> torch.Tensor:
        teacher = passes.teacher_logits(self.rollout)
        return passes.divergence(passes.student_logits(self.rollout), teacher, self.rollout, kind="forward_kl")


@dataclass(frozen=True)
class DistillationLoss:
    """The loss knobs of ``model.*`` (see ``OnPolicyDistillation``), the shared vocabulary size, and the terms."""

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
    opd_weight: float = 1.0
    anchor_weight: float = 0.0
    anchor_direction: str = "forward"
    detach_anchor: bool = True
    retain_weight: float = 0.0
    extra_terms: Sequence[LossTerm] = field(default_factory=tuple)

    @classmethod
    def from_hparams(cls, hparams: Mapping, vocab_size: int, extra_terms: Sequence[LossTerm] = ()) -> DistillationLoss:
        """From the module's hyperparameters; ``extra_terms`` as objects (LightningCLI records them in the hyper-
        parameters as their config, ``class_path`` + ``init_args``)."""
        names = [f for f in cls.__dataclass_fields__ if f not in ("vocab_size", "extra_terms")]
        values = {n: hparams[n] for n in names if n in hparams and hparams[n] is not None}
        return cls(vocab_size=vocab_size, extra_terms=tuple(extra_terms or ()), **values)

    @property
    def terms(self) -> list[LossTerm]:
        """The weighted terms, the built-in ones first (weight 0 = absent). The first term's rollout is the step's
        main rollout (its tokens normalise the step, see ``lightning_ctx.distributed.StepTokens``)."""
        built_in = [TeacherMatching(self.opd_weight), AnchoredConsistency(self.anchor_weight),
                    OtherContextRetention(self.retain_weight)]
        terms = [t for t in built_in if t.weight > 0] + list(self.extra_terms)
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"two loss terms share a name: {names}")
        return terms

    @property
    def rollouts(self) -> list[str]:
        """The rollouts the terms need, the main one first."""
        return list(dict.fromkeys(t.rollout for t in self.terms))

    def chunk_for(self, batch_size: int) -> Optional[int]:
        """The sequence chunk of the KL terms: ``chunk_size`` if set, else the automatic choice (or None)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return auto_chunk_size(batch_size, self.vocab_size, self.auto_chunk_mib) if self.auto_chunk else None

    def __call__(self, student, teacher_fn: TeacherFn, batch: ContextPairBatch, rollouts: Mapping[str, Rollout],
                 token_scale: TokenScaleFn = lambda mask: None) -> dict[str, torch.Tensor]:
        """Every term for ``batch`` and its fixed rollouts (``{"student": ..., "retain": ..., "teacher": ...}``):
        per-token means by term name, ``loss`` (their weighted sum), ``entropy`` (the student's, on the main
        rollout), ``tokens/<rollout>`` (token counts) and ``time_teacher_s``.

        Memory: every KL runs chunked over the sequence under activation checkpointing, so no float32
        ``[B, R, V]`` log-probs are saved for backward; what stays alive across the with-context forward is the
        no-context logits in the model's dtype (the anchor) and the no-context activations. A two-stage
        backward would free those too, but needs manual optimization (and loses Lightning's accumulation,
        clipping and single-backward DDP semantics), so it is not done.
        """
        passes = Passes(self, student, teacher_fn, batch, rollouts)
        out: dict[str, torch.Tensor] = {}
        loss = None
        for term in self.terms:
            if not term.applies(passes):
                continue
            value = term.compute(passes)
            scale = token_scale(passes.mask(term.rollout))
            out[term.name] = value if scale is None else value * scale
            loss = term.weight * out[term.name] if loss is None else loss + term.weight * out[term.name]
        main = self.rollouts[0]
        out["loss"] = loss if loss is not None else torch.zeros((), device=passes.mask(main).device)
        for name in rollouts:
            out[f"tokens/{name}"] = passes.mask(name).sum()
        with torch.no_grad():
            out["entropy"] = objectives.token_entropy(passes.student_logits(main).detach(), passes.mask(main),
                                                      chunk_size=passes.chunk(main))
        out["time_teacher_s"] = torch.tensor(passes.teacher_seconds)
        return out
