"""The context-removability metrics from per-item data, as ratios of sums over items (numpy only).

docs/design.md, "Metrics" and "Intervals and the sampling-noise floor". Every metric here is
``sum_i num_i / sum_i den_i (+ offset)`` over evaluation items ``i``: :class:`RatioOfSums` keeps the two
per-item arrays, so the point value and a bootstrap over items (:mod:`~lightning_ctx.eval.intervals`)
come from the same numbers. The definitions are those of ``ContextRemovability`` / ``Retention``
(:mod:`~lightning_ctx.eval.metrics`, whose states are the sums of these arrays) and of
``game_metrics`` (games: an item is a game seed, ``pass`` = ``acc``):

* :func:`removability_items`: ``acc_no_ctx``, ``acc_ctx``, ``harm``, ``help``, ``both_correct`` (and
  lengths, truncation) from right/wrong flags, one answer per item and condition, or ``k`` paired answers
  (``[N, k]``: answer j without the context paired with answer j with it, as the sampled evaluation pairs them);
* :func:`retention_items`: ``retention`` and ``other_ctx_acc``;
* :func:`rate_items`: the sampled metrics from the per-item sample accuracies and their noise floor
  (``harm_rate``, ``harm_floor``, ``harm_excess`` and the same for ``help``);
* :func:`sampled_items`: both of the above from ``[N, k]`` sample flags.

A ratio whose denominator sums to 0 is NaN, never 0 (as in the torchmetrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["RatioOfSums", "ratio", "removability_items", "retention_items", "rate_items", "sampled_items",
           "counts_from_rates", "values", "stack_runs", "RATE_KEYS"]

#: Keys of :func:`rate_items`.
RATE_KEYS = ("harm_rate", "harm_floor", "harm_excess", "help_rate", "help_floor", "help_excess")


@dataclass(frozen=True)
class RatioOfSums:
    """A metric ``sum(num) / sum(den) + offset`` over items; ``num``/``den`` are float64 ``[N]`` (one run) or
    ``[S, N]`` (S runs on the same N items, e.g. seeds: the value is the mean of the S runs' ratios)."""

    num: np.ndarray
    den: np.ndarray
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.num.shape != self.den.shape or self.num.ndim not in (1, 2):
            raise ValueError(f"numerator {self.num.shape} and denominator {self.den.shape} must be the same "
                             "[N] or [runs, N] shape")

    @property
    def n_items(self) -> int:
        return self.num.shape[-1]

    def runs(self) -> np.ndarray:
        """Each run's value, ``[S]`` (``[1]`` for one run); NaN where a run's denominator sums to 0."""
        num = np.atleast_2d(self.num).sum(-1)
        den = np.atleast_2d(self.den).sum(-1)
        return ratio(num, den) + self.offset

    def value(self) -> float:
        """The metric: the mean over runs of each run's ratio (NaN if any run's is undefined)."""
        return float(self.runs().mean())


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, NaN where ``den == 0`` (and no warning)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    safe = np.where(den != 0, den, 1.0)
    return np.where(den != 0, num / safe, math.nan)


def values(metrics: Mapping[str, RatioOfSums]) -> dict[str, float]:
    """``{name: value}`` of a dict of metrics."""
    return {k: m.value() for k, m in metrics.items()}


def _flags(name: str, x) -> np.ndarray:
    """Right/wrong flags as float64 0/1, ``[N]`` or ``[N, k]`` (anything non-zero is right)."""
    a = np.asarray(x)
    if a.dtype == object:
        raise ValueError(f"{name}: flags must be booleans or numbers (is there a missing value?)")
    if a.ndim not in (1, 2):
        raise ValueError(f"{name}: expected [N] or [N, k] flags, got shape {a.shape}")
    return (a != 0).astype(np.float64)


def _per_item(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    """A per-answer quantity summed over each item's answers -> ``[N]`` float64."""
    a = np.asarray(x, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but the correctness flags have {shape}; every per-item input "
                         "must describe the same items (and samples)")
    return a.sum(-1) if a.ndim == 2 else a


def removability_items(correct_no_ctx, correct_ctx, len_no_ctx=None, len_ctx=None, truncated_no_ctx=None,
                       truncated_ctx=None) -> dict[str, RatioOfSums]:
    """The metrics of ``ContextRemovability`` from per-item flags, in its key order.

    Flags are ``[N]`` (one answer per item and condition) or ``[N, k]`` (k answers per item, answer j without
    the context paired with answer j with it); the other inputs have the same shape. A ``[N, k]`` input gives
    exactly the metric of its ``N * k`` flattened pairs, with the k pairs of an item kept together as one
    item (the unit a bootstrap resamples). Length and truncation keys appear only when given.
    """
    r0, r1 = _flags("correct_no_ctx", correct_no_ctx), _flags("correct_ctx", correct_ctx)
    if r0.shape != r1.shape:
        raise ValueError(f"correct_no_ctx has shape {r0.shape} but correct_ctx has {r1.shape}; the two passes must "
                         "answer the same items")
    shape = r0.shape
    item = (lambda a: a.sum(-1)) if r0.ndim == 2 else (lambda a: a)
    pairs = item(np.ones(shape))
    right0 = item(r0)
    out = {
        "acc_no_ctx": RatioOfSums(right0, pairs),
        "acc_ctx": RatioOfSums(item(r1), pairs),
        "harm": RatioOfSums(item(r0 * (1 - r1)), right0),
        "help": RatioOfSums(item((1 - r0) * r1), pairs - right0),
        "both_correct": RatioOfSums(item(r0 * r1), pairs),
    }
    if len_no_ctx is not None and len_ctx is not None:
        l0, l1 = _per_item("len_no_ctx", len_no_ctx, shape), _per_item("len_ctx", len_ctx, shape)
        out.update(len_no_ctx=RatioOfSums(l0, pairs), len_ctx=RatioOfSums(l1, pairs),
                   len_inflation=RatioOfSums(l1, l0, offset=-1.0))
    for key, given in (("trunc_no_ctx", truncated_no_ctx), ("trunc_ctx", truncated_ctx)):
        if given is not None:
            out[key] = RatioOfSums(_per_item(key, _flags(key, given), shape), pairs)
    return out


def retention_items(correct, reference_correct=None, reference_accuracy: Optional[float] = None
                    ) -> dict[str, RatioOfSums]:
    """``retention`` and ``other_ctx_acc`` of ``Retention`` from per-item flags on the other-context items.

    ``reference_correct`` (the initial model's flags on the same items) makes retention
    ``sum(correct) / sum(reference_correct)``; else ``reference_accuracy`` a makes it ``sum(correct) / (N a)``;
    with neither, only ``other_ctx_acc`` is returned.
    """
    c = _flags("correct", correct)
    if c.ndim != 1:
        raise ValueError(f"correct: expected [N] flags, got shape {c.shape}")
    out = {}
    if reference_correct is not None:
        ref = _flags("reference_correct", reference_correct)
        if ref.shape != c.shape:
            raise ValueError(f"reference_correct has shape {ref.shape} but correct has {c.shape}")
        out["retention"] = RatioOfSums(c, ref)
    elif reference_accuracy is not None:
        out["retention"] = RatioOfSums(c, np.full_like(c, float(reference_accuracy)))
    out["other_ctx_acc"] = RatioOfSums(c, np.ones_like(c))
    return out


def counts_from_rates(rates, k) -> np.ndarray:
    """Per-item sample accuracies (e.g. the ``sampled_acc_*`` columns of the example tables) -> right counts.

    ``rates * k`` must be whole numbers (within 1e-6): a rate that is not r/k is not from k samples.
    """
    x = np.asarray(rates, dtype=np.float64) * np.asarray(k, dtype=np.float64)
    counts = np.rint(x)
    if not np.all(np.abs(x - counts) <= 1e-6):
        raise ValueError(f"rates are not multiples of 1/k (k = {k}): not the accuracies of k samples per item")
    return counts


def rate_items(right_no_ctx, right_ctx, k) -> dict[str, RatioOfSums]:
    """Sampled harm/help from per-item sample accuracies, and the floor a context with no effect would give.

    ``right_no_ctx``/``right_ctx``: ``[N]`` numbers of right answers among ``k`` samples per item without / with
    the context (``k`` an int or ``[N]``, at least 2). With p̂ = right_no_ctx / k, q̂ = right_ctx / k and
    u = r (k - r) / (k (k - 1)) (r = right_no_ctx; unbiased for p (1 - p)):

    ==============  ==============================================
    ``harm_rate``   sum p̂ (1 - q̂) / sum p̂
    ``harm_floor``  sum u / sum p̂           (harm_rate when q = p)
    ``harm_excess`` sum (p̂ (1 - q̂) - u) / sum p̂  (= harm_rate - harm_floor)
    ``help_rate``   sum (1 - p̂) q̂ / sum (1 - p̂)
    ``help_floor``  sum u / sum (1 - p̂)
    ``help_excess`` sum ((1 - p̂) q̂ - u) / sum (1 - p̂)
    ==============  ==============================================

    Derivations: docs/design.md, "Intervals and the sampling-noise floor".
    """
    r0 = np.asarray(right_no_ctx, dtype=np.float64)
    r1 = np.asarray(right_ctx, dtype=np.float64)
    kk = np.broadcast_to(np.asarray(k, dtype=np.float64), r0.shape)
    if r0.ndim != 1 or r1.shape != r0.shape:
        raise ValueError(f"right_no_ctx {r0.shape} and right_ctx {r1.shape} must both be [N] counts")
    if np.any(kk < 2) or np.any(kk != np.rint(kk)):
        raise ValueError("the noise floor needs a whole number k >= 2 of samples per item "
                         "(one sample cannot tell p (1 - p) from 0)")
    for name, r in (("right_no_ctx", r0), ("right_ctx", r1)):
        if np.any(r < 0) or np.any(r > kk) or np.any(r != np.rint(r)):
            raise ValueError(f"{name} must be whole numbers between 0 and k")
    p, q = r0 / kk, r1 / kk
    u = r0 * (kk - r0) / (kk * (kk - 1))
    harm_num, help_num = p * (1 - q), (1 - p) * q
    return {
        "harm_rate": RatioOfSums(harm_num, p),
        "harm_floor": RatioOfSums(u, p),
        "harm_excess": RatioOfSums(harm_num - u, p),
        "help_rate": RatioOfSums(help_num, 1 - p),
        "help_floor": RatioOfSums(u, 1 - p),
        "help_excess": RatioOfSums(help_num - u, 1 - p),
    }


def sampled_items(correct_no_ctx, correct_ctx) -> dict[str, RatioOfSums]:
    """``[N, k]`` sample flags (sample j without the context paired with sample j with it) -> the paired
    metrics of :func:`removability_items` (the sampled evaluation's ``sampled/*`` today) and :func:`rate_items`."""
    r0, r1 = _flags("correct_no_ctx", correct_no_ctx), _flags("correct_ctx", correct_ctx)
    if r0.ndim != 2:
        raise ValueError(f"correct_no_ctx: expected [N, k] sample flags, got shape {r0.shape}")
    return {**removability_items(r0, r1), **rate_items(r0.sum(-1), r1.sum(-1), r0.shape[1])}


def stack_runs(runs: Sequence[Mapping[str, RatioOfSums]]) -> dict[str, RatioOfSums]:
    """Several runs (e.g. seeds) on the same items, in the same item order -> ``[S, N]`` metrics whose value is
    the mean of the runs' values. Keys: those every run has."""
    if not runs:
        raise ValueError("stack_runs needs at least one run")
    keys = [k for k in runs[0] if all(k in r for r in runs[1:])]
    out = {}
    for k in keys:
        parts = [r[k] for r in runs]
        sizes = {p.n_items for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"{k}: the runs have {sorted(sizes)} items; stack runs on the same items only")
        if len({p.offset for p in parts}) != 1 or any(p.num.ndim != 1 for p in parts):
            raise ValueError(f"{k}: stack single runs of the same metric")
        out[k] = RatioOfSums(np.stack([p.num for p in parts]), np.stack([p.den for p in parts]), parts[0].offset)
    return out
