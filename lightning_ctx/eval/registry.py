"""Evaluation metrics, each registered once: its per-item definition and its roles (docs/design.md, "Metrics").

A :class:`MetricRegistry` holds the metrics of one kind of evaluation (:data:`REMOVABILITY` here, the games' in
:mod:`lightning_ctx.tasks.games.metrics`). A metric is a :class:`MetricSpec` (name, which way is better, and its
roles: in the one-line summary after each evaluation, on ``curves.png``, a default column of ``lightning-ctx
compare``) and, when it is computed from the per-item tables, a definition ``rows -> {name: RatioOfSums}``
(:mod:`~lightning_ctx.eval.item_metrics`). :meth:`MetricRegistry.measure` evaluates every definition on one
evaluation's rows (gathered from every rank) and gives each value its bootstrap interval over items
(``{name}_lo``, ``{name}_hi``, ``n_items``; :mod:`~lightning_ctx.eval.intervals`). Metrics measured another way
(``ctx_kl``, ``hidden_cos/mean``: token-level torchmetrics) are registered for their roles only.

Adding a metric from outside the package::

    from lightning_ctx.eval.registry import REMOVABILITY, MetricSpec, column
    from lightning_ctx.eval.item_metrics import RatioOfSums

    def short_answers(rows):
        short = column(rows.examples, "len_ctx") <= 3
        return {"short_ctx": RatioOfSums(short.astype(float), np.ones(len(short)))}

    REMOVABILITY.add(MetricSpec("short_ctx", summary=True, curve="fraction", compare=True), items=short_answers)

and name the module in the callback's ``metric_modules`` (imported when the callback is built) or import it
before ``lightning-ctx compare`` (``--metric-modules``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

import numpy as np

from lightning_ctx.eval.intervals import DEFAULT_RESAMPLES, Interval, bootstrap, flat_intervals, format_interval
from lightning_ctx.eval.item_metrics import (
    RatioOfSums,
    rate_items,
    removability_items,
    retention_items,
    values,
)

__all__ = ["MetricSpec", "ItemRows", "MetricRegistry", "REMOVABILITY", "column", "registries", "metric_direction",
           "import_metric_modules", "Table", "CurvePanel"]

#: The per-item tables of an evaluation: one row per evaluated item, one per retention item.
Table = Literal["examples", "retention"]
#: The panels of ``curves.png``: fractions (0..1) and lengths (tokens).
CurvePanel = Literal["fraction", "length"]
#: The logged item count of each table (the interval's N).
COUNT_NAMES: dict[str, str] = {"examples": "n_items", "retention": "n_retention_items"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric's name (relative to the evaluation's prefix, e.g. ``harm`` -> ``eval/harm``) and roles.

    ``direction``: +1 higher is better, -1 lower, 0 closer to zero (compare's counts and ``--best-k``).
    ``summary``: in the one-line summary after each evaluation. ``curve``: the ``curves.png`` panel it is
    drawn on (with its interval as a band). ``compare``: a default column of ``lightning-ctx compare``.
    """

    name: str
    direction: int = 1
    summary: bool = False
    curve: Optional[CurvePanel] = None
    compare: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"metric {self.name!r}: direction must be -1, 0 or 1, got {self.direction!r}")
        if self.curve is not None and self.curve not in get_args(CurvePanel):
            raise ValueError(f"metric {self.name!r}: curve must be one of {get_args(CurvePanel)}, got {self.curve!r}")


@dataclass(frozen=True)
class ItemRows:
    """One evaluation's per-item tables, gathered from every rank: ``examples`` (one row per item) and ``retention``
    (one per item posed with another context), and ``settings`` that are not per item (``reference_accuracy``)."""

    examples: Sequence[Mapping[str, Any]] = ()
    retention: Sequence[Mapping[str, Any]] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    def table(self, name: Table) -> Sequence[Mapping[str, Any]]:
        return self.examples if name == "examples" else self.retention


def column(rows: Sequence[Mapping[str, Any]], key: str, dtype=np.float64) -> np.ndarray:
    """``[row[key] for row in rows]`` as an array (``[N]``, or ``[N, k]`` for list cells); one clear error when a
    row lacks the key."""
    try:
        return np.asarray([r[key] for r in rows], dtype=dtype)
    except KeyError:
        raise ValueError(f"the per-item rows have no {key!r} column (columns: {sorted(rows[0]) if rows else []})") \
            from None


ItemDefinition = Callable[[ItemRows], Mapping[str, RatioOfSums]]


@dataclass(frozen=True)
class _Definition:
    items: ItemDefinition
    table: Table
    namespace: str  # prepended to the names it returns ("sampled/")


_REGISTRIES: list[MetricRegistry] = []


class MetricRegistry:
    """The metrics of one kind of evaluation, in registration order (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self._specs: dict[str, MetricSpec] = {}
        self._definitions: list[_Definition] = []
        _REGISTRIES.append(self)

    def add(self, *specs: MetricSpec, items: Optional[ItemDefinition] = None, table: Table = "examples",
            namespace: str = "") -> None:
        """Register ``specs`` and, with ``items``, the definition that computes them (and possibly metrics
        registered before: every name it returns must be registered) from ``table``'s rows; its results are logged
        as ``{namespace}{name}``."""
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"metric {spec.name!r} is already registered in {self.name}")
            for other in _REGISTRIES:
                known = other._specs.get(spec.name)
                if known is not None and known.direction != spec.direction:
                    raise ValueError(f"metric {spec.name!r}: direction {spec.direction} here but {known.direction} "
                                     f"in {other.name} (compare reads metrics by name)")
        if table not in get_args(Table):
            raise ValueError(f"table must be one of {get_args(Table)}, got {table!r}")
        self._specs.update((s.name, s) for s in specs)
        if items is not None:
            self._definitions.append(_Definition(items, table, namespace))

    def remove(self, *names: str, items: Optional[ItemDefinition] = None) -> None:
        """Unregister ``names`` (and the definition ``items``), e.g. when a test is done with its metric."""
        for n in names:
            self._specs.pop(n, None)
        self._definitions = [d for d in self._definitions if d.items is not items]

    # -- roles --------------------------------------------------------------------------------------
    def spec(self, name: str) -> Optional[MetricSpec]:
        return self._specs.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return list(self._specs)

    def summary_names(self) -> list[str]:
        return [n for n, s in self._specs.items() if s.summary]

    def curve_names(self, panel: CurvePanel) -> list[str]:
        return [n for n, s in self._specs.items() if s.curve == panel]

    def compare_names(self) -> list[str]:
        return [n for n, s in self._specs.items() if s.compare]

    def summary_line(self, metrics: Mapping[str, float], digits: int = 3) -> str:
        """``acc_no_ctx=0.900 harm=0.050 [0.010, 0.110] ...``: the summary metrics present, with their interval."""
        parts = []
        for name in self.summary_names():
            if name not in metrics:
                continue
            iv = Interval(float(metrics[name]), float(metrics.get(f"{name}_lo", math.nan)),
                          float(metrics.get(f"{name}_hi", math.nan)), 0, 0)
            parts.append(f"{name}={format_interval(iv, digits) if math.isfinite(iv.value) else 'nan'}")
        return " ".join(parts)

    # -- values -------------------------------------------------------------------------------------
    def item_metrics(self, rows: ItemRows) -> dict[Table, dict[str, RatioOfSums]]:
        """Every definition on ``rows``: table -> ``{logged name: RatioOfSums}`` (a table without rows: none)."""
        out: dict[Table, dict[str, RatioOfSums]] = {}
        for d in self._definitions:
            if not rows.table(d.table):
                continue
            got = d.items(rows)
            unknown = [n for n in got if n not in self._specs]
            if unknown:
                raise ValueError(f"{getattr(d.items, '__qualname__', d.items)} returned {unknown}, not registered in "
                                 f"{self.name}: register a MetricSpec for each name it computes")
            out.setdefault(d.table, {}).update((f"{d.namespace}{n}", m) for n, m in got.items())
        return out

    def measure(self, rows: ItemRows, *, seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES) -> dict[str, float]:
        """Every item metric's value, its bootstrap interval (``{name}_lo``, ``{name}_hi``; ``n_resamples`` 0 = no
        intervals) and each table's item count (``n_items``, ``n_retention_items``)."""
        out: dict[str, float] = {}
        for table, metrics in self.item_metrics(rows).items():
            if n_resamples:
                flat = flat_intervals(bootstrap(metrics, n_resamples=n_resamples, seed=seed))
                flat.pop("n_items", None)
            else:
                flat = values(metrics)
            out.update(flat)
            out[COUNT_NAMES[table]] = float(len(rows.table(table)))
        return out


def registries() -> list[MetricRegistry]:
    """Every registry created so far (the built-in ones once their modules are imported)."""
    return list(_REGISTRIES)


def metric_direction(name: str) -> int:
    """The registered direction of ``name`` (its last ``/`` part as a fallback; +1 when unknown)."""
    for candidate in (name, name.rsplit("/", 1)[-1]):
        for reg in _REGISTRIES:
            spec = reg.spec(candidate)
            if spec is not None:
                return spec.direction
    return 1


def import_metric_modules(modules: Iterable[str]) -> None:
    """Import the modules that register metrics (a clear error naming the one that fails)."""
    from lightning_ctx.errors import ConfigError

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"cannot import metric module {name!r}: {err}", field="metric_modules") from None


# ---------------------------------------------------------------- the context-removability metrics

def greedy_metrics(rows: ItemRows) -> dict[str, RatioOfSums]:
    """One greedy answer per item without and with the context (the evaluator's example columns)."""
    ex = rows.examples
    return removability_items(*(column(ex, k) for k in ("correct_no_ctx", "correct_ctx", "len_no_ctx", "len_ctx",
                                                          "truncated_no_ctx", "truncated_ctx")))


def sampled_metrics(rows: ItemRows) -> dict[str, RatioOfSums]:
    """The k samples per item and condition: the paired metrics (sample j without paired with sample j with the
    context), and with k >= 2 the per-item rate versions and the no-effect floor (``rate_items``)."""
    ex = rows.examples
    if "sampled_correct_no_ctx" not in ex[0]:
        return {}
    flags = [column(ex, f"sampled_{k}") for k in ("correct_no_ctx", "correct_ctx", "len_no_ctx", "len_ctx",
                                                    "truncated_no_ctx", "truncated_ctx")]
    out = removability_items(*flags)
    k = flags[0].shape[1]
    if k >= 2:
        out.update(rate_items(flags[0].sum(1), flags[1].sum(1), k))
    return out


def retention_metrics(rows: ItemRows) -> dict[str, RatioOfSums]:
    """``retention`` over the initial model's per-item flags when every row has one, else over the scalar
    ``reference_accuracy``; NaN without a reference; ``other_ctx_acc``."""
    ret = rows.retention
    correct = column(ret, "correct")
    if all("reference_correct" in r for r in ret):
        return retention_items(correct, column(ret, "reference_correct"))
    out = retention_items(correct, reference_accuracy=rows.settings.get("reference_accuracy"))
    out.setdefault("retention", RatioOfSums(correct, np.zeros_like(correct)))  # no reference: NaN, not 0
    return {"retention": out["retention"], "other_ctx_acc": out["other_ctx_acc"]}


REMOVABILITY = MetricRegistry("removability")
REMOVABILITY.add(
    MetricSpec("acc_no_ctx", summary=True, curve="fraction", compare=True, doc="fraction right without c"),
    MetricSpec("acc_ctx", summary=True, curve="fraction", compare=True, doc="fraction right with c"),
    MetricSpec("harm", -1, summary=True, curve="fraction", compare=True,
               doc="right without c and wrong with c, over right without c"),
    MetricSpec("help", doc="wrong without c and right with c, over wrong without c"),
    MetricSpec("both_correct", curve="fraction", doc="fraction right both without and with c"),
    MetricSpec("len_no_ctx", curve="length", doc="mean response tokens without c (EOS included)"),
    MetricSpec("len_ctx", curve="length", doc="mean response tokens with c"),
    MetricSpec("len_inflation", 0, summary=True, compare=True, doc="len_ctx / len_no_ctx - 1"),
    MetricSpec("trunc_no_ctx", -1, doc="fraction of responses without c that hit max_new_tokens"),
    MetricSpec("trunc_ctx", -1, doc="fraction of responses with c that hit max_new_tokens"),
    items=greedy_metrics)
REMOVABILITY.add(
    MetricSpec("harm_rate", -1, doc="sampled: sum p(1 - q) / sum p over the per-item sample accuracies"),
    MetricSpec("harm_floor", -1, doc="sampled: the harm_rate a context with no effect would give (sum u / sum p)"),
    MetricSpec("harm_excess", -1, compare=True, doc="sampled: harm_rate - harm_floor"),
    MetricSpec("help_rate", doc="sampled: sum (1 - p) q / sum (1 - p)"),
    MetricSpec("help_floor", -1, doc="sampled: the help_rate a context with no effect would give"),
    MetricSpec("help_excess", doc="sampled: help_rate - help_floor"),
    items=sampled_metrics, namespace="sampled/")
REMOVABILITY.add(
    MetricSpec("ctx_kl", -1, summary=True, doc="mean per-token KL(no c || c), teacher-forced on the no-c response"),
    MetricSpec("hidden_cos/mean", summary=True, doc="mean over layers of the hidden-state cosine with vs without c"))
REMOVABILITY.add(
    MetricSpec("retention", summary=True, curve="fraction", compare=True,
               doc="accuracy on other contexts c' over the initial model's"),
    MetricSpec("other_ctx_acc", doc="accuracy on other contexts c'"),
    items=retention_metrics, table="retention")
