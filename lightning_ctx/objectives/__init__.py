"""Token-level distillation objectives: pure tensor functions (no Lightning, no transformers).

Notation (docs/design.md, "Objectives"), per response position t with mask m_t in {0, 1}:
``s_t`` student without context, ``q_t`` student with context, ``T_t`` teacher with context,
``sg`` stop-gradient. Logits are ``[B, T, V]`` and already aligned: position t scores response
token t. Every log-probability is computed with ``log_softmax`` in float32 (bf16/fp16 inputs are
upcast one chunk at a time; float64 inputs stay float64).

Divergences (``kind``), with S = s_t and T = sg[T_t]:

* ``reverse_kl``: ``KL(S || T) = sum_v S(v) [log S(v) - log T(v)]``
* ``forward_kl``: ``KL(T || S) = sum_v T(v) [log T(v) - log S(v)]``
* ``jsd`` (generalized JSD of GKD, TRL ``generalized_jsd_loss`` convention):
  ``M = beta*T + (1-beta)*S``, ``JSD = beta*KL(T || M) + (1-beta)*KL(S || M)`` for
  0 < beta < 1; ``beta = 0`` is exactly forward KL and ``beta = 1`` exactly reverse KL (the
  formula itself degenerates to 0 at both endpoints, so they are special-cased).

Sampled-token estimator: ``A_t = sg[log T_t(y_t) - log s_t(y_t)]``,
``L = -sum_t m_t A_t log s_t(y_t) / sum_t m_t``.

Anchored consistency (the context-removability regularizer), anchor A = s_t, target q_t:
``forward = KL(sg[A] || q)``, ``reverse = KL(q || sg[A])``, ``symmetric = (forward + reverse)/2``
(``detach_anchor=False`` drops the ``sg``).

Vocabulary scope: ``full`` sums over all of V. ``topk`` sums over an index set I_t: the top-k
student logits (for the consistency term: the top-k anchor logits), optionally united with the
teacher's top-k. With ``topk_renormalize=True`` both distributions are renormalised over I_t
(log_softmax of the gathered logits); with ``False`` the full-vocabulary log-probs are gathered
at I_t (a truncated sum). Index selection runs under ``no_grad``.

Reduction: every scalar loss is ``sum_t m_t d_t / sum_t m_t`` over the whole batch (per-token,
never a mean over padded positions). The mask may be bool or numeric: nonzero means "included".
An all-zero mask gives a 0 that is still connected to the graph.

Memory: with ``chunk_size`` the sequence is processed ``chunk_size`` positions at a time, and
each chunk runs under non-reentrant activation checkpointing when a gradient is needed, so at
most one chunk of float32 ``[B, chunk, V]`` intermediates exists in forward *and* in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ctx.objectives.blocks import (
    CONSISTENCY_DIRECTIONS,
    DIRECTION_TO_KIND,
    DIVERGENCE_KINDS,
    SCOPES,
    ConsistencyDirection,
    DivergenceKind,
    Scope,
    as_bool_mask,
    check_beta,
    check_bt,
    check_choice,
    check_logits,
    check_pair,
    check_positive_int,
    chunked,
    per_token,
    upcast,
    validate_common,
)

__all__ = [
    "DIVERGENCE_KINDS",
    "SCOPES",
    "CONSISTENCY_DIRECTIONS",
    "DivergenceKind",
    "Scope",
    "ConsistencyDirection",
    "masked_mean",
    "token_logprobs",
    "token_entropy",
    "per_token_divergence",
    "token_divergence",
    "sampled_token_loss",
    "anchored_consistency",
]

# ----------------------------------------------------------------------------- public API


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(m * values) / sum(m)`` over all positions of the batch (0 if the mask is empty).

    ``torch.where`` rather than a product, so NaN/inf at padded positions cannot leak in. The
    result stays connected to ``values`` even when the mask is empty.
    """
    check_bt("mask", mask, values.shape)
    m = as_bool_mask(mask)
    total = torch.where(m, upcast(values), 0.0).sum()
    return total / m.sum().clamp(min=1)


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_size: int | None = None) -> Tensor:
    """Log-probability ``[B, T]`` (float32) of ``tokens`` under ``logits``; differentiable."""
    check_logits("logits", logits)
    check_bt("tokens", tokens, logits.shape[:2])
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    check_positive_int("chunk_size", chunk_size, allow_none=True)

    def fn(x: Tensor, y: Tensor) -> Tensor:
        x = upcast(x)
        # logit[y] - logsumexp: never materialises the full log_softmax.
        return x.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)

    return chunked(fn, (logits, tokens.long()), chunk_size)


@torch.no_grad()
def token_entropy(logits: Tensor, mask: Tensor, chunk_size: int | None = None) -> Tensor:
    """Mean entropy of ``softmax(logits)`` over masked positions (a metric: no gradient)."""
    check_logits("logits", logits)
    check_bt("mask", mask, logits.shape[:2])
    check_positive_int("chunk_size", chunk_size, allow_none=True)

    def fn(x: Tensor) -> Tensor:
        log_p = F.log_softmax(upcast(x), dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    return masked_mean(chunked(fn, (logits,), chunk_size), mask)


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    scope: str = "full",
    topk: int = 256,
    chunk_size: int | None = None,
    topk_union_teacher: bool = False,
    topk_renormalize: bool = True,
) -> Tensor:
    """Per-position divergence ``[B, T]`` (float32) between student and (detached) teacher.

    Same arguments as :func:`token_divergence`. With a ``mask``, masked-out positions are 0.
    For ``ctx_kl = KL(student no-ctx || student ctx)`` pass the no-ctx logits as student,
    the ctx logits as teacher and ``kind="reverse_kl"``.
    """
    check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_choice("kind", kind, DIVERGENCE_KINDS)
    beta = check_beta(beta)
    validate_common(scope, topk, chunk_size)
    if mask is not None:
        check_bt("mask", mask, student_logits.shape[:2])
    values = per_token(
        student_logits,
        teacher_logits.detach(),  # the teacher never receives a gradient
        kind=kind,
        beta=beta,
        scope=scope,
        topk=topk,
        chunk_size=chunk_size,
        index_from="x",
        union=bool(topk_union_teacher),
        renormalize=bool(topk_renormalize),
    )
    if mask is not None:
        values = torch.where(as_bool_mask(mask), values, 0.0)
    return values


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    scope: str = "full",
    topk: int = 256,
    chunk_size: int | None = None,
    topk_union_teacher: bool = False,
    topk_renormalize: bool = True,
) -> Tensor:
    """Masked per-token divergence (OPD loss), reduced over all masked tokens of the batch.

    ``kind``: ``reverse_kl`` (OPD default), ``forward_kl`` or ``jsd`` (with ``beta``).
    ``scope``: ``full`` or ``topk`` (student top-k, plus teacher top-k if
    ``topk_union_teacher``; renormalised over the set if ``topk_renormalize``).
    ``topk_union_teacher``/``topk_renormalize`` are ignored for ``scope="full"``.
    Returns a float32 scalar; gradient flows into ``student_logits`` only.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    values = per_token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind=kind,
        beta=beta,
        scope=scope,
        topk=topk,
        chunk_size=chunk_size,
        topk_union_teacher=topk_union_teacher,
        topk_renormalize=topk_renormalize,
    )
    return masked_mean(values, mask)


def sampled_token_loss(
    student_logits: Tensor,
    teacher_token_logprobs: Tensor,
    tokens: Tensor,
    mask: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """Sampled-token (policy-gradient style) reverse-KL estimator.

    ``A_t = sg[log T_t(y_t) - log s_t(y_t)]``, loss ``-sum_t m_t A_t log s_t(y_t) / sum_t m_t``.
    Its gradient is that of the per-token reverse KL estimated with the sampled token only.
    Token ids and teacher log-probs at masked positions are ignored (they may be -100/NaN).
    """
    check_logits("student_logits", student_logits)
    shape = student_logits.shape[:2]
    check_bt("teacher_token_logprobs", teacher_token_logprobs, shape)
    check_bt("tokens", tokens, shape)
    check_bt("mask", mask, shape)
    m = as_bool_mask(mask)
    # Padded positions often carry ignore ids (-100): replace them so gather stays in range.
    log_s = token_logprobs(student_logits, tokens.masked_fill(~m, 0), chunk_size=chunk_size)
    advantage = teacher_token_logprobs.detach().to(log_s.dtype) - log_s.detach()
    # Zero the advantage (not only the loss) at padded positions: a NaN there would otherwise
    # turn into a NaN gradient through 0 * NaN.
    advantage = torch.where(m, advantage, 0.0)
    return masked_mean(-advantage * log_s, m)


def anchored_consistency(
    no_ctx_logits: Tensor,
    ctx_logits: Tensor,
    mask: Tensor,
    direction: str = "forward",
    detach_anchor: bool = True,
    scope: str = "full",
    topk: int = 256,
    chunk_size: int | None = None,
    topk_renormalize: bool = True,
) -> Tensor:
    """Context-removability regularizer between the no-ctx (anchor) and with-ctx student passes.

    ``forward``: ``KL(sg[p_no_ctx] || p_ctx)`` (the paper's choice); ``reverse``:
    ``KL(p_ctx || sg[p_no_ctx])``; ``symmetric``: their average. With ``detach_anchor=True``
    ``no_ctx_logits`` gets no gradient (so the OPD gradient of the same logits is untouched).
    ``scope="topk"`` uses the anchor's top-k indices.
    """
    check_pair("no_ctx_logits", no_ctx_logits, "ctx_logits", ctx_logits)
    check_choice("direction", direction, CONSISTENCY_DIRECTIONS)
    validate_common(scope, topk, chunk_size)
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_bt("mask", mask, ctx_logits.shape[:2])
    anchor = no_ctx_logits.detach() if detach_anchor else no_ctx_logits
    # x = ctx (the "student side"), y = anchor: forward_kl = KL(y || x), reverse_kl = KL(x || y).
    values = per_token(
        ctx_logits,
        anchor,
        kind=DIRECTION_TO_KIND[direction],
        beta=0.5,  # unused by the KL kinds
        scope=scope,
        topk=topk,
        chunk_size=chunk_size,
        index_from="y",
        union=False,
        renormalize=bool(topk_renormalize),
    )
    return masked_mean(values, mask)
