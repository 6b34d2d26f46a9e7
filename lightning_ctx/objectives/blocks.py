"""Building blocks of the objectives: argument checks, float32 upcasting, sequence chunking under activation
checkpointing, KL terms over a vocabulary scope. Pure tensor code; the public API is ``lightning_ctx.objectives``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Each choice declared once, as a type (annotations, the CLI and knob checks read it) whose values the checks use.
DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd"]
Scope = Literal["full", "topk"]
ConsistencyDirection = Literal["forward", "reverse", "symmetric"]
DIVERGENCE_KINDS: tuple[str, ...] = get_args(DivergenceKind)
SCOPES: tuple[str, ...] = get_args(Scope)
CONSISTENCY_DIRECTIONS: tuple[str, ...] = get_args(ConsistencyDirection)
# Internal divergence kinds: the public ones plus the symmetric KL used by the consistency term.
DIRECTION_TO_KIND = {"forward": "forward_kl", "reverse": "reverse_kl", "symmetric": "symmetric_kl"}


# ----------------------------------------------------------------------------- validation


def check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, V], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")


def check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    check_logits(name_a, a)
    check_logits(name_b, b)
    if a.shape != b.shape:
        hint = " (vocabulary sizes differ)" if a.shape[:2] == b.shape[:2] else ""
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape{hint}"
        )


def check_bt(name: str, t: Tensor, shape: torch.Size) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} ([B, T]), got {tuple(t.shape)}")


def check_choice(name: str, value: str, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}{hint}")


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"beta must be a float in [0, 1], got {beta!r}")
    beta = float(beta)
    if not (0.0 <= beta <= 1.0):  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def check_positive_int(name: str, value: int | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def as_bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


# ----------------------------------------------------------------------------- building blocks


def upcast(x: Tensor) -> Tensor:
    # float32 at least; keep float64 (used by references and numerical checks) as is.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def chunked(
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
    gathered = upcast(logits.gather(-1, idx))  # gather, then upcast: exact and smaller
    if renormalize:
        # log_softmax over the index set; duplicates are excluded from the normaliser with -inf
        # but keep their finite logit so exp/products below stay finite (no NaN grads).
        z = gathered if first is None else gathered.masked_fill(~first, float("-inf"))
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
    else:
        lse = torch.logsumexp(upcast(logits), dim=-1, keepdim=True)  # full-vocab normaliser
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
        log_x = F.log_softmax(upcast(x), dim=-1)
        log_y = F.log_softmax(upcast(y), dim=-1)
        return _divergence(log_x, log_y, kind, beta, None)
    idx, first = _topk_indices(x, y, min(topk, x.shape[-1]), index_from, union)
    log_x = _logprobs_at(x, idx, first, renormalize)
    log_y = _logprobs_at(y, idx, first, renormalize)
    weight = None if first is None else first.to(log_x.dtype)
    return _divergence(log_x, log_y, kind, beta, weight)


def per_token(
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
    return chunked(fn, (x, y), chunk_size)


def validate_common(scope: str, topk: int, chunk_size: int | None) -> None:
    check_choice("scope", scope, SCOPES, hint=" (for 'sampled' use sampled_token_loss)")
    check_positive_int("topk", topk, allow_none=False)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
