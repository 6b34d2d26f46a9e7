"""Token-level distillation objectives: pure tensor functions (no Lightning, no transformers).

Notation (DESIGN.md section 2), per response position t with mask m_t in {0, 1}:
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

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DIVERGENCE_KINDS",
    "SCOPES",
    "CONSISTENCY_DIRECTIONS",
    "masked_mean",
    "token_logprobs",
    "token_entropy",
    "per_token_divergence",
    "token_divergence",
    "sampled_token_loss",
    "anchored_consistency",
]

DIVERGENCE_KINDS = ("reverse_kl", "forward_kl", "jsd")
SCOPES = ("full", "topk")
CONSISTENCY_DIRECTIONS = ("forward", "reverse", "symmetric")
# Internal divergence kinds: the public ones plus the symmetric KL used by the consistency term.
_DIRECTION_TO_KIND = {"forward": "forward_kl", "reverse": "reverse_kl", "symmetric": "symmetric_kl"}


# ----------------------------------------------------------------------------- validation


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, V], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _check_logits(name_a, a)
    _check_logits(name_b, b)
    if a.shape != b.shape:
        hint = " (vocabulary sizes differ)" if a.shape[:2] == b.shape[:2] else ""
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape{hint}"
        )


def _check_bt(name: str, t: Tensor, shape: torch.Size) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} ([B, T]), got {tuple(t.shape)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}{hint}")


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"beta must be a float in [0, 1], got {beta!r}")
    beta = float(beta)
    if not (0.0 <= beta <= 1.0):  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def _check_positive_int(name: str, value: int | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _as_bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


# ----------------------------------------------------------------------------- building blocks


def _upcast(x: Tensor) -> Tensor:
    # float32 at least; keep float64 (used by references and numerical checks) as is.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunked(
    fn: Callable[..., Tensor], tensors: tuple[Tensor, ...], chunk_size: int | None
) -> Tensor:
    """Apply ``fn`` (``[B, c, ...]`` inputs -> ``[B, c]`` output) over sequence chunks.

    ``split`` (one SplitBackward node that concatenates the chunk grads once) rather than
    ``narrow`` (one full-size zero grad per chunk). Each chunk is checkpointed when a gradient
    is needed: autograd would otherwise keep every chunk's float32 ``[B, c, V]`` log-probs for
    backward, and chunking would bound only the forward peak. The chunk's upcast and
    log_softmax are recomputed in backward (about one extra forward of the loss, cheap next to
    the model). Non-reentrant checkpointing supports inputs that do not require grad (the
    teacher) and nested autograd; the computation is deterministic, so the RNG state is not
    stashed.
    """
    if chunk_size is None:
        return fn(*tensors)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for chunk in zip(*(t.split(chunk_size, dim=1) for t in tensors)):
        if needs_grad:
            outs.append(checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(fn(*chunk))
    if not outs:  # T == 0
        return fn(*tensors)
    return torch.cat(outs, dim=1)


def _kl_terms(log_p: Tensor, log_q: Tensor, weight: Tensor | None) -> Tensor:
    """``sum_v w_v p_v (log p_v - log q_v)`` over the last dim."""
    terms = log_p.exp() * (log_p - log_q)
    if weight is not None:
        terms = terms * weight
    return terms.sum(-1)


def _divergence(
    log_x: Tensor, log_y: Tensor, kind: str, beta: float, weight: Tensor | None
) -> Tensor:
    """Divergence between x (student side, S) and y (target side, T), summed over the last dim."""
    if kind == "jsd":
        # Endpoints are exact, not limits of the mixture formula (which tends to 0 there).
        if beta == 0.0:
            kind = "forward_kl"
        elif beta == 1.0:
            kind = "reverse_kl"
        else:
            log_m = torch.logaddexp(log_y + math.log(beta), log_x + math.log1p(-beta))
            return beta * _kl_terms(log_y, log_m, weight) + (1.0 - beta) * _kl_terms(
                log_x, log_m, weight
            )
    if kind == "reverse_kl":
        return _kl_terms(log_x, log_y, weight)
    if kind == "forward_kl":
        return _kl_terms(log_y, log_x, weight)
    if kind == "symmetric_kl":
        return 0.5 * (_kl_terms(log_y, log_x, weight) + _kl_terms(log_x, log_y, weight))
    raise ValueError(f"unknown divergence kind {kind!r}")  # internal: callers validate first


def _topk_indices(
    x: Tensor, y: Tensor, k: int, index_from: str, union: bool
) -> tuple[Tensor, Tensor | None]:
    """Index set per position and, for a union, a bool mask of its first occurrences."""
    with torch.no_grad():
        primary, other = (x, y) if index_from == "x" else (y, x)
        idx = primary.topk(k, dim=-1, sorted=False).indices
        if not union:
            return idx, None  # top-k indices are distinct
        # Union via the concatenated 2k indices: sort, then keep the first of equal neighbours.
        # Duplicates stay in the tensor (static shape) but get weight 0 in every sum.
        idx = torch.cat([idx, other.topk(k, dim=-1, sorted=False).indices], dim=-1)
        idx = idx.sort(dim=-1).values
        first = torch.ones_like(idx, dtype=torch.bool)
        first[..., 1:] = idx[..., 1:] != idx[..., :-1]
        return idx, first


def _logprobs_at(logits: Tensor, idx: Tensor, first: Tensor | None, renormalize: bool) -> Tensor:
    gathered = _upcast(logits.gather(-1, idx))  # gather, then upcast: exact and smaller
    if renormalize:
        # log_softmax over the index set; duplicates are excluded from the normaliser with -inf
        # but keep their finite logit so exp/products below stay finite (no NaN grads).
        z = gathered if first is None else gathered.masked_fill(~first, float("-inf"))
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
    else:
        lse = torch.logsumexp(_upcast(logits), dim=-1, keepdim=True)  # full-vocab normaliser
    return gathered - lse


def _divergence_chunk(
    x: Tensor,
    y: Tensor,
    *,
    kind: str,
    beta: float,
    scope: str,
    topk: int,
    index_from: str,
    union: bool,
    renormalize: bool,
) -> Tensor:
    """Per-position divergence ``[B, c]`` for one chunk of logits ``[B, c, V]``."""
    if scope == "full":
        log_x = F.log_softmax(_upcast(x), dim=-1)
        log_y = F.log_softmax(_upcast(y), dim=-1)
        return _divergence(log_x, log_y, kind, beta, None)
    idx, first = _topk_indices(x, y, min(topk, x.shape[-1]), index_from, union)
    log_x = _logprobs_at(x, idx, first, renormalize)
    log_y = _logprobs_at(y, idx, first, renormalize)
    weight = None if first is None else first.to(log_x.dtype)
    return _divergence(log_x, log_y, kind, beta, weight)


def _per_token(
    x: Tensor,
    y: Tensor,
    *,
    kind: str,
    beta: float,
    scope: str,
    topk: int,
    chunk_size: int | None,
    index_from: str,
    union: bool,
    renormalize: bool,
) -> Tensor:
    fn = functools.partial(
        _divergence_chunk,
        kind=kind,
        beta=beta,
        scope=scope,
        topk=topk,
        index_from=index_from,
        union=union,
        renormalize=renormalize,
    )
    return _chunked(fn, (x, y), chunk_size)


def _validate_common(scope: str, topk: int, chunk_size: int | None) -> None:
    _check_choice("scope", scope, SCOPES, hint=" (for 'sampled' use sampled_token_loss)")
    _check_positive_int("topk", topk, allow_none=False)
    _check_positive_int("chunk_size", chunk_size, allow_none=True)


# ----------------------------------------------------------------------------- public API


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(m * values) / sum(m)`` over all positions of the batch (0 if the mask is empty).

    ``torch.where`` rather than a product, so NaN/inf at padded positions cannot leak in. The
    result stays connected to ``values`` even when the mask is empty.
    """
    _check_bt("mask", mask, values.shape)
    m = _as_bool_mask(mask)
    total = torch.where(m, _upcast(values), 0.0).sum()
    return total / m.sum().clamp(min=1)


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_size: int | None = None) -> Tensor:
    """Log-probability ``[B, T]`` (float32) of ``tokens`` under ``logits``; differentiable."""
    _check_logits("logits", logits)
    _check_bt("tokens", tokens, logits.shape[:2])
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    _check_positive_int("chunk_size", chunk_size, allow_none=True)

    def fn(x: Tensor, y: Tensor) -> Tensor:
        x = _upcast(x)
        # logit[y] - logsumexp: never materialises the full log_softmax.
        return x.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)

    return _chunked(fn, (logits, tokens.long()), chunk_size)


@torch.no_grad()
def token_entropy(logits: Tensor, mask: Tensor, chunk_size: int | None = None) -> Tensor:
    """Mean entropy of ``softmax(logits)`` over masked positions (a metric: no gradient)."""
    _check_logits("logits", logits)
    _check_bt("mask", mask, logits.shape[:2])
    _check_positive_int("chunk_size", chunk_size, allow_none=True)

    def fn(x: Tensor) -> Tensor:
        log_p = F.log_softmax(_upcast(x), dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    return masked_mean(_chunked(fn, (logits,), chunk_size), mask)


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
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_choice("kind", kind, DIVERGENCE_KINDS)
    beta = _check_beta(beta)
    _validate_common(scope, topk, chunk_size)
    if mask is not None:
        _check_bt("mask", mask, student_logits.shape[:2])
    values = _per_token(
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
        values = torch.where(_as_bool_mask(mask), values, 0.0)
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
    _check_logits("student_logits", student_logits)
    shape = student_logits.shape[:2]
    _check_bt("teacher_token_logprobs", teacher_token_logprobs, shape)
    _check_bt("tokens", tokens, shape)
    _check_bt("mask", mask, shape)
    m = _as_bool_mask(mask)
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
    _check_pair("no_ctx_logits", no_ctx_logits, "ctx_logits", ctx_logits)
    _check_choice("direction", direction, CONSISTENCY_DIRECTIONS)
    _validate_common(scope, topk, chunk_size)
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    _check_bt("mask", mask, ctx_logits.shape[:2])
    anchor = no_ctx_logits.detach() if detach_anchor else no_ctx_logits
    # x = ctx (the "student side"), y = anchor: forward_kl = KL(y || x), reverse_kl = KL(x || y).
    values = _per_token(
        ctx_logits,
        anchor,
        kind=_DIRECTION_TO_KIND[direction],
        beta=0.5,  # unused by the KL kinds
        scope=scope,
        topk=topk,
        chunk_size=chunk_size,
        index_from="y",
        union=False,
        renormalize=bool(topk_renormalize),
    )
    return masked_mean(values, mask)
