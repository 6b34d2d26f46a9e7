"""Percentile-bootstrap intervals over evaluation items, paired differences, and the counts ``compare`` prints.

docs/design.md, "Intervals and the sampling-noise floor". Numpy only. The metrics are the
:class:`~lightning_ctx.eval.item_metrics.RatioOfSums` of :mod:`~lightning_ctx.eval.item_metrics`: a resample
draws N items with replacement (an item keeps all its answers: its k samples, and its rows in every run and
method), and every metric is recomputed as a ratio of the resampled sums, so a ratio's denominator varies
with the resample as it would with another draw of items. One resample-weight matrix serves every metric::

    iv = bootstrap(removability_items(correct_no_ctx, correct_ctx))["harm"]   # Interval(value, lo, hi, ...)
    d = paired_bootstrap(stack_runs(runs_a), stack_runs(runs_b))["harm"]      # Difference(diff, lo, hi, ...)

Resamples where a ratio is undefined (its denominator sums to 0) are dropped and counted (``n_defined``);
when fewer than ``min_defined`` of them remain, ``lo`` and ``hi`` are NaN (no interval is honest then).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple, Optional

import numpy as np

from lightning_ctx.eval.item_metrics import RatioOfSums, ratio

__all__ = ["DEFAULT_RESAMPLES", "DEFAULT_LEVEL", "MIN_DEFINED", "Interval", "Difference", "Tally", "bootstrap",
           "paired_bootstrap", "bootstrap_replicates", "resample_blocks", "count_improvements", "count_at_least",
           "flat_intervals", "format_interval"]

#: Resamples per interval: the endpoints' Monte-Carlo error is then a few percent of the interval's width
#: (benchmarks/bench_intervals.py prints both the time and that error per resample count).
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
#: Fraction of resamples that must define a ratio for its interval to be reported.
MIN_DEFINED = 0.9
#: Resample weights held at once (rows x items): bounds memory at ~16 MiB whatever the item count.
_BLOCK_ENTRIES = 1 << 21


class Interval(NamedTuple):
    """A metric's value and its ``level`` percentile-bootstrap interval over ``n_items`` items."""

    value: float
    lo: float
    hi: float
    n_items: int
    n_defined: int  # resamples in which the metric was defined (of n_resamples)


class Difference(NamedTuple):
    """``value(a) - value(b)`` on the same items, and its paired percentile-bootstrap interval."""

    diff: float
    lo: float
    hi: float
    n_items: int
    n_defined: int


class Tally(NamedTuple):
    """Of ``comparable`` configurations: ``point`` by the point estimates, ``interval`` by the whole interval."""

    point: int
    interval: int
    comparable: int


def _check(n_resamples: int, level: float, min_defined: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not 0.0 <= min_defined <= 1.0:
        raise ValueError(f"min_defined must be in [0, 1], got {min_defined}")


def resample_blocks(n_items: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The resampled item indices of a seeded bootstrap, in ``[rows, n_items]`` blocks (one resample a row).

    The block size depends on ``n_items`` only, so ``(n_items, n_resamples, seed)`` fixes every resample.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_ENTRIES // max(1, n_items))
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, max(1, n_items), size=(min(rows, n_resamples - start), n_items))


def _weights(idx: np.ndarray) -> np.ndarray:
    """``[b, N]`` indices (overwritten) -> ``[b, N]`` how often each item was drawn in each resample."""
    b, n = idx.shape
    idx += (np.arange(b) * n)[:, None]  # row r's items -> bins r * n ... r * n + n - 1
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _n_items(groups: Sequence[Mapping[str, RatioOfSums]]) -> int:
    sizes = {m.n_items for g in groups for m in g.values()}
    if len(sizes) > 1:
        raise ValueError(f"metrics over different item counts {sorted(sizes)} cannot share resamples; "
                         "resample metrics of the same items together")
    return sizes.pop() if sizes else 0


def bootstrap_replicates(groups: Sequence[Mapping[str, RatioOfSums]], n_resamples: int = DEFAULT_RESAMPLES,
                         seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Each metric's value in every resample (``[n_resamples]``, NaN where undefined), the same resampled
    items for every group (e.g. two methods) and every metric."""
    n = _n_items(groups)
    columns: dict[int, int] = {}  # id(array) -> column; a shared array (harm's denominator = acc's numerator) once
    parts: list[np.ndarray] = []

    def column(a: np.ndarray) -> slice:
        if id(a) not in columns:
            columns[id(a)] = sum(p.shape[1] for p in parts)
            parts.append(np.atleast_2d(a).T.astype(np.float64))  # [N, runs]
        start = columns[id(a)]
        return slice(start, start + np.atleast_2d(a).shape[0])

    plan = [{k: (column(m.num), column(m.den), m.offset) for k, m in g.items()} for g in groups]
    table = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0))
    out: list[dict[str, list]] = [{k: [] for k in g} for g in groups]
    for idx in resample_blocks(n, n_resamples, seed):
        # numpy's own loop, not BLAS: no second thread pool spinning beside torch's on small products
        sums = np.einsum("bn,nc->bc", _weights(idx), table)
        for g, got in zip(plan, out):
            for k, (num, den, offset) in g.items():
                got[k].append((ratio(sums[:, num], sums[:, den]) + offset).mean(axis=1))
    return [{k: np.concatenate(v) for k, v in got.items()} for got in out]


def _percentiles(value: float, reps: np.ndarray, level: float, min_defined: float) -> tuple[float, float, int]:
    ok = reps[np.isfinite(reps)]
    if not math.isfinite(value) or ok.size == 0 or ok.size < min_defined * reps.size:
        return math.nan, math.nan, int(ok.size)
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi), int(ok.size)


def bootstrap(metrics: Mapping[str, RatioOfSums], *, n_resamples: int = DEFAULT_RESAMPLES,
              level: float = DEFAULT_LEVEL, seed: int = 0, min_defined: float = MIN_DEFINED) -> dict[str, Interval]:
    """Every metric's value and ``level`` percentile-bootstrap interval over items (resampled jointly).

    Metrics over ``[S, N]`` (S runs on the same items) resample the N items once for all runs; the value is the
    mean of the runs' ratios. The interval is over items only: the runs (their models) are held fixed.
    """
    _check(n_resamples, level, min_defined)
    (reps,) = bootstrap_replicates([metrics], n_resamples, seed)
    out = {}
    for k, m in metrics.items():
        v = m.value()
        lo, hi, n_ok = _percentiles(v, reps[k], level, min_defined)
        out[k] = Interval(v, lo, hi, m.n_items, n_ok)
    return out


def paired_bootstrap(a: Mapping[str, RatioOfSums], b: Mapping[str, RatioOfSums], *, absolute: Sequence[str] = (),
                     n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0,
                     min_defined: float = MIN_DEFINED) -> dict[str, Difference]:
    """``value(a) - value(b)`` per metric both have, with a paired bootstrap interval: each resample draws the
    same items for ``a`` and ``b`` (and all their runs), so what the items share cancels in the difference.

    ``a`` and ``b`` must hold the same items in the same order (align them by item id first). Metrics named in
    ``absolute`` compare magnitudes, ``|a| - |b|`` (where closer to zero is better, e.g. ``len_inflation``).
    """
    _check(n_resamples, level, min_defined)
    keys = [k for k in a if k in b]
    a, b = {k: a[k] for k in keys}, {k: b[k] for k in keys}
    rep_a, rep_b = bootstrap_replicates([a, b], n_resamples, seed)
    out = {}
    for k in keys:
        f = abs if k in absolute else (lambda x: x)
        diff = f(a[k].value()) - f(b[k].value())
        lo, hi, n_ok = _percentiles(diff, f(rep_a[k]) - f(rep_b[k]), level, min_defined)
        out[k] = Difference(diff, lo, hi, a[k].n_items, n_ok)
    return out


def count_improvements(diffs: Sequence[Optional[Difference]], direction: int) -> Tally:
    """"``metric`` improved in N of M configurations", from each configuration's ``treated - baseline``.

    ``direction`` +1: higher is better (``diff > 0``; the interval: ``lo > 0``); -1: lower is better
    (``diff < 0``; ``hi < 0``). For "closer to zero is better" pass differences made with ``absolute`` and -1.
    A configuration without a finite difference (None or NaN) is not comparable.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    point = sure = comparable = 0
    for d in diffs:
        if d is None or not math.isfinite(d.diff):
            continue
        comparable += 1
        point += direction * d.diff > 0
        sure += bool(direction * (d.lo if direction > 0 else d.hi) > 0)  # NaN compares False
    return Tally(int(point), int(sure), comparable)


def count_at_least(intervals: Sequence[Optional[Interval]], threshold: float) -> Tally:
    """"``retention >= threshold`` in N of M configurations": by the value, and by the whole interval (``lo``)."""
    point = sure = comparable = 0
    for iv in intervals:
        if iv is None or not math.isfinite(iv.value):
            continue
        comparable += 1
        point += iv.value >= threshold
        sure += bool(iv.lo >= threshold)
    return Tally(int(point), int(sure), comparable)


def flat_intervals(intervals: Mapping[str, Interval]) -> dict[str, float]:
    """``{name: value, name_lo: lo, name_hi: hi, ..., n_items: N}`` for logging beside the values."""
    out: dict[str, float] = {}
    for k, iv in intervals.items():
        out.update({k: iv.value, f"{k}_lo": iv.lo, f"{k}_hi": iv.hi})
    sizes = {iv.n_items for iv in intervals.values()}
    if len(sizes) == 1:
        out["n_items"] = float(sizes.pop())
    return out


def format_interval(iv: Interval | Difference, digits: int = 3, signed: bool = False) -> str:
    """``0.123 [0.081, 0.170]`` (``-`` when undefined; the value alone when there is no interval)."""
    v = iv.diff if isinstance(iv, Difference) else iv.value
    if not math.isfinite(v):
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return fmt.format(v)
    return f"{fmt.format(v)} [{fmt.format(iv.lo)}, {fmt.format(iv.hi)}]"
