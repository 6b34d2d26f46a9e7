"""The paper-style comparison of runs: per configuration and method, the final ``eval/*`` metrics averaged
over seeds, deltas, and "harm reduced in N of M configurations".

Runs are grouped by configuration (default task / target context / model; see ``KEY_SOURCES``) and method
(``model.anchor_weight`` 0 = OPD, > 0 = anchored; ``+ retain`` when ``model.retain_weight`` > 0). Writing the
report files and the ``lightning-ctx compare`` command are in :mod:`lightning_ctx.compare_report`.

With each run's final per-example table (:class:`RunTable`, read from its artifacts by the command), every value
gets its 95% bootstrap interval over items and every difference to the baseline a paired interval (the same
items resampled for both methods and all their seeds; :func:`~lightning_ctx.eval.intervals.paired_bootstrap`),
and the counts are given twice: by the point estimates, and by the intervals (a reduction whose interval
excludes 0; a retention whose whole interval is >= 0.9). Runs without tables keep the point counts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lightning_ctx.eval.intervals import (
    DEFAULT_RESAMPLES,
    Difference,
    Interval,
    bootstrap,
    count_at_least,
    count_improvements,
    format_interval,
    paired_bootstrap,
)
from lightning_ctx.eval.item_metrics import RatioOfSums, stack_runs
from lightning_ctx.eval.registry import ItemRows, MetricRegistry, metric_direction, registries
from lightning_ctx.tracking import VERSION_TAG_PREFIX

#: Logical grouping keys -> where to read them, first present wins. ``tags.X`` = run tag, ``params.X`` = run
#: param (the CLI logs the resolved config as ``cfg/<key>`` params and the module hparams unprefixed).
#: (``cfg/data.init_args.*`` and ``cfg/data.class_path``: runs logged before the task moved to ``data.task``.)
KEY_SOURCES: dict[str, tuple[str, ...]] = {
    "task": ("tags.task", "params.cfg/data.task.init_args.train_file", "params.cfg/data.task.class_path",
             "params.cfg/data.init_args.task", "params.cfg/data.init_args.train_file", "params.cfg/data.class_path"),
    "target": ("tags.target_context", "tags.target", "params.cfg/data.task.init_args.target_context",
               "params.cfg/data.init_args.target_context", "params.target_context"),
    "model": ("tags.model", "params.cfg/model.student", "params.student"),
    "seed": ("tags.seed", "params.cfg/seed_everything", "params.cfg/data.seed", "params.cfg/data.init_args.seed"),
    "anchor_weight": ("tags.anchor_weight", "params.cfg/model.anchor_weight", "params.anchor_weight"),
    "retain_weight": ("tags.retain_weight", "params.cfg/model.retain_weight", "params.retain_weight"),
    "opd_weight": ("params.cfg/model.opd_weight", "params.opd_weight"),
}
#: ``retention >= RETENTION_KEPT`` counts as "the student still follows the other contexts".
RETENTION_KEPT = 0.9
RETAIN_SUFFIX = " + retain"
#: Names of the loss terms a method is told by when it has no on-policy term (``model.opd_weight: 0``).
TERM_LABELS = {"OffPolicyContextDistillation": "off-policy CD"}
DEFAULT_GROUP_BY = ("task", "target", "model")
DEFAULT_METHOD_KEY = "anchor_weight"
_MISSING = ("", "None", "null", "none")


def metric_registries() -> list[MetricRegistry]:
    """The built-in registries (the removability evaluation's and the games') and any registered since."""
    import lightning_ctx.eval.registry  # noqa: F401  (the removability metrics)
    import lightning_ctx.tasks.games.metrics  # noqa: F401  (the games' metrics)

    return registries()


def compare_metrics(runs: Sequence = (), metric_prefix: str = "eval/") -> list[str]:
    """The default columns: every registered metric with the compare role, in registration order; with ``runs``,
    those at least one run logged under ``metric_prefix``."""
    names = list(dict.fromkeys(n for reg in metric_registries() for n in reg.compare_names()))
    if not runs:
        return names
    logged = {k for r in runs for k in r.data.metrics}
    return [n for n in names if f"{metric_prefix}{n}" in logged]


@dataclass
class RunTable:
    """One run's final per-example table as per-item metrics: table (``examples``, ``retention``) -> metric name
    (relative to the compared prefix) -> :class:`RatioOfSums`, and each table's item ids in row order."""

    metrics: dict[str, dict[str, RatioOfSums]]
    ids: dict[str, list]

    @classmethod
    def of(cls, registry: MetricRegistry, rows: ItemRows, namespace: str = "") -> RunTable:
        """The ``registry``'s metrics of ``rows`` whose logged name starts with ``namespace`` (``sampled/``)."""
        metrics = {table: {k[len(namespace):]: m for k, m in got.items() if k.startswith(namespace)}
                   for table, got in registry.item_metrics(rows).items()}
        ids = {table: [r.get("id", r.get("seed", r.get("index"))) for r in rows.table(table)] for table in metrics}
        return cls(metrics, ids)

    def table_of(self, metric: str) -> Optional[str]:
        return next((t for t, ms in self.metrics.items() if metric in ms), None)


def _aligned(tables: Sequence[RunTable], table: str, metrics: Sequence[str]) -> Optional[list[dict]]:
    """Each run's ``metrics`` of ``table`` restricted to the items every run has, in the first run's order (None
    when a run lacks the table or the runs share no item)."""
    if any(table not in t.metrics for t in tables):
        return None
    common = set(tables[0].ids[table]).intersection(*(t.ids[table] for t in tables[1:]))
    order = [i for i in tables[0].ids[table] if i in common]
    if not order:
        return None
    out = []
    for t in tables:
        where = {i: n for n, i in enumerate(t.ids[table])}
        idx = np.array([where[i] for i in order], dtype=np.int64)
        out.append({m: RatioOfSums(t.metrics[table][m].num[idx], t.metrics[table][m].den[idx],
                                   t.metrics[table][m].offset) for m in metrics if m in t.metrics[table]})
    return out


def method_intervals(tables: Sequence[RunTable], metrics: Sequence[str], n_resamples: int = DEFAULT_RESAMPLES
                     ) -> dict[str, Interval]:
    """The seed mean of each metric with its interval over the items all ``tables`` (one per seed) share."""
    out: dict[str, Interval] = {}
    for table in {t for run in tables for t in run.metrics}:
        wanted = [m for m in metrics if all(run.table_of(m) == table for run in tables)]
        runs = _aligned(tables, table, wanted) if wanted else None
        if runs:
            out.update(bootstrap(stack_runs(runs), n_resamples=n_resamples))
    return out


def paired_differences(treated: Sequence[RunTable], baseline: Sequence[RunTable], metrics: Sequence[str],
                       n_resamples: int = DEFAULT_RESAMPLES) -> dict[str, Difference]:
    """``treated - baseline`` of each metric (seed means; run i of each paired, e.g. by seed) with its paired
    interval: every resample draws the same items for both methods and all their runs."""
    if len(treated) != len(baseline) or not treated:
        return {}
    both = list(treated) + list(baseline)
    out: dict[str, Difference] = {}
    for table in {t for run in both for t in run.metrics}:
        wanted = [m for m in metrics if all(run.table_of(m) == table for run in both)]
        runs = _aligned(both, table, wanted) if wanted else None
        if runs:
            absolute = [m for m in wanted if metric_direction(m) == 0]
            out.update(paired_bootstrap(stack_runs(runs[:len(treated)]), stack_runs(runs[len(treated):]),
                                        absolute=absolute, n_resamples=n_resamples))
    return out


def key_sources(spec: str) -> tuple[str, ...]:
    """A grouping key spec -> sources: an alias of ``KEY_SOURCES``, ``params.X``, ``tags.X``, or a bare
    name ``X`` (param ``X``, then tag ``X``); ``a|b`` tries the specs in order."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split("|")):
        if not part:
            continue
        if part in KEY_SOURCES:
            out.extend(KEY_SOURCES[part])
        elif part.startswith(("params.", "tags.")):
            out.append(part)
        else:
            out.extend((f"params.{part}", f"tags.{part}"))
    if not out:
        raise ValueError(f"empty grouping key {spec!r}")
    return tuple(out)


def run_value(run, spec: str) -> Optional[str]:
    """The first non-empty value of ``spec``'s sources in ``run`` (None if none is set)."""
    for src in key_sources(spec):
        kind, name = src.split(".", 1)
        store = run.data.params if kind == "params" else run.data.tags
        value = store.get(name)
        if value is not None and str(value).strip() not in _MISSING:
            return str(value)
    return None


def short_label(value: Optional[str]) -> str:
    """Display form: paths -> last two components, dotted class paths -> class name, None -> '-'."""
    if value is None:
        return "-"
    if "/" in value or os.sep in value:
        parts = [p for p in Path(value).parts if p not in ("/", "")]
        return "/".join(parts[-2:]) if parts else value
    if value.count(".") >= 2 and " " not in value and not value.replace(".", "").isdigit():
        return value.rsplit(".", 1)[1]
    return value


def method_labels(values: list[Optional[str]], baseline: str = "OPD", treated: str = "anchored") -> dict:
    """Method key values -> names: 0 -> ``baseline``; > 0 -> ``treated`` (``treated(w)`` when several weights
    occur); non-numeric values keep their own name; None -> ``?``."""
    nums: dict[Optional[str], Optional[float]] = {}
    for v in values:
        try:
            nums[v] = float(v) if v is not None else None
        except ValueError:
            nums[v] = None
    positive = sorted({x for x in nums.values() if x is not None and x > 0})
    out = {}
    for v, x in nums.items():
        if v is None:
            out[v] = "?"
        elif x is None:
            out[v] = v
        elif x == 0:
            out[v] = baseline
        else:
            out[v] = treated if len(positive) == 1 else f"{treated}({x:g})"
    return out


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, std, len(finite)


def _cell(mean: float, std: float, n: int, runs: int, digits: int = 3) -> str:
    """``mean ± std``; ``(n=k)`` when only k of the group's runs have a finite value; ``-`` when none has."""
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "") + (f" (n={n})" if n < runs else "")


def _delta(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.3f}"


def _pipe_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned Markdown pipe table (readable as plain text too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _better(metric: str, treated: float, baseline: float) -> bool:
    d = metric_direction(metric)
    if d == 0:
        return abs(treated) < abs(baseline)
    return treated > baseline if d > 0 else treated < baseline


def _summary_verb(metric: str) -> str:
    d = metric_direction(metric)
    return {1: f"{metric} improved", -1: f"{metric} reduced", 0: f"|{metric}| reduced"}[d]


#: Loss weights a resume may change (logged as ``resumed/<name>``): a run trained under two methods says so.
METHOD_WEIGHTS = ("opd_weight", "anchor_weight", "retain_weight")


def _resumed_with(run) -> str:
    """`` (resumed with anchor_weight 0.5)`` for a run whose loss weights changed at a resume, else ``""``: such a run
    is its own row, never pooled with the method it started as."""
    params = run.data.params
    changed = [f"{name} {params[f'resumed/{name}']}" for name in METHOD_WEIGHTS if f"resumed/{name}" in params]
    return f" (resumed with {', '.join(changed)})" if changed else ""


def _method_label(run, method_key: str, label: str) -> str:
    """When methods are told apart by the anchor weight: ``label`` + ``" + retain"`` for a run with the retention
    term; a run without the on-policy term (``model.opd_weight: 0``) is named by its extra terms (``off-policy
    CD``); a run whose weights changed at a resume says so (:func:`_resumed_with`)."""
    if method_key != DEFAULT_METHOD_KEY:
        return label
    return _label_from_weights(run, label) + _resumed_with(run)


def _label_from_weights(run, label: str) -> str:
    try:
        if float(run_value(run, "opd_weight") or 1) == 0:  # the config's extra terms: cfg/model.extra_terms.<i>...
            params = run.data.params
            terms = [params[k] for k in sorted(params) if re.fullmatch(r"cfg/model\.extra_terms\.\d+\.class_path", k)]
            names = [TERM_LABELS.get(t.rsplit(".", 1)[-1], t.rsplit(".", 1)[-1]) for t in terms]
            return " + ".join(names) or label
        return label + (RETAIN_SUFFIX if float(run_value(run, "retain_weight") or 0) > 0 else "")
    except ValueError:
        return label


def _rank_key(metric: str, value: float) -> float:
    """Smaller is better after this transform (the registered direction: higher, lower or closer to zero)."""
    d = metric_direction(metric)
    return abs(value) if d == 0 else -value if d > 0 else value


def best_k_values(history: dict[str, list[tuple[int, float]]], k: int, metrics: Sequence[str],
                  metric_prefix: str = "eval/", by: Optional[str] = None, min_step: int = 1) -> dict[str, float]:
    """OPCD's "mean of the k best checkpoints" for one run, from its metric history.

    ``history``: full metric name -> ``[(step, value), ...]`` (a later entry at the same step wins). Only
    evaluation steps ``>= min_step`` count (step 0 is the initial model, not a trained checkpoint). With ``by``,
    the k steps with the best finite ``{prefix}{by}`` are chosen once and every metric is the mean of its values
    at those steps; without it each metric is the mean of its own k best values (better: the metric's registered
    direction).
    Fewer than k evaluated steps: the mean over those there are; none: NaN. Keys are full metric names.
    """
    def series(name: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for step, value in history.get(name, []):
            if step >= min_step:
                out[int(step)] = float(value)
        return {st: v for st, v in out.items() if math.isfinite(v)}

    result: dict[str, float] = {}
    chosen: Optional[list[int]] = None
    if by is not None:
        ranked = sorted(series(f"{metric_prefix}{by}").items(), key=lambda sv: (_rank_key(by, sv[1]), sv[0]))
        chosen = [st for st, _ in ranked[:k]]
    for m in metrics:
        values = series(f"{metric_prefix}{m}")
        if chosen is not None:
            picked = [values[st] for st in chosen if st in values]
        else:
            picked = sorted(values.values(), key=lambda v: _rank_key(m, v))[:k]
        result[f"{metric_prefix}{m}"] = sum(picked) / len(picked) if picked else math.nan
    return result


def compare_runs(runs: list, group_by: Sequence[str] = DEFAULT_GROUP_BY, method_key: str = DEFAULT_METHOD_KEY,
                 metrics: Optional[Sequence[str]] = None, metric_prefix: str = "eval/",
                 baseline: str = "OPD", values: Optional[dict[str, dict[str, float]]] = None,
                 tables: Optional[dict[str, RunTable]] = None, n_resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """Group MLflow runs by configuration and method, average the final metrics over seeds.

    ``metrics``: the columns (None = :func:`compare_metrics` of these runs). ``values`` (run id -> full metric
    name -> value) replaces a run's final metrics, e.g. by :func:`best_k_values` (the mean of its k best
    evaluation steps). ``tables`` (run id -> its final per-example table) add intervals: per method and metric
    when every run of the method has a table, per difference when the two methods' runs pair up by seed.

    Returns ``{"configs": [{"key": {...}, "methods": {name: {"runs": [...], "metrics": {m: {mean, std, n[, lo, hi,
    n_items]}}}}, "deltas": {name: {m: delta}}, "paired": {name: {m: {diff, lo, hi, n_items}}}}], "methods": [...],
    "summary": {name: {m: (improved, comparable)}}, "interval_summary": {name: {m: (improved, comparable)}},
    "skipped": [run ids without any metric of the prefix]}``.
    """
    used, skipped = [], []
    for run in runs:
        if any(k.startswith(metric_prefix) for k in run.data.metrics):
            used.append(run)
        else:
            skipped.append(run.info.run_id)
    metrics = list(metrics) if metrics is not None else compare_metrics(used, metric_prefix)
    tables = tables or {}
    raw_methods = [run_value(r, method_key) for r in used]
    labels = method_labels(raw_methods, baseline=baseline)
    groups: dict[tuple, dict[str, list]] = {}
    for run, raw in zip(used, raw_methods):
        key = tuple(run_value(run, g) for g in group_by)
        groups.setdefault(key, {}).setdefault(_method_label(run, method_key, labels[raw]), []).append(run)
    method_order = sorted({m for g in groups.values() for m in g}, key=lambda m: (m != baseline, m))
    configs = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else v for v in k)):
        entry = {"key": dict(zip(group_by, key)), "methods": {}, "deltas": {}, "paired": {}}
        for method in method_order:
            rs = sorted(groups[key].get(method, []), key=lambda r: _seed_order(run_value(r, "seed")))
            if not rs:
                continue
            have = [tables.get(r.info.run_id) for r in rs]
            ivs = method_intervals(have, metrics, n_resamples) if values is None and all(have) else {}
            stats = {}
            for m in metrics:
                mean, std, n = _mean_std([(values or {}).get(r.info.run_id, r.data.metrics).get(
                    f"{metric_prefix}{m}", math.nan) for r in rs])
                stats[m] = {"mean": mean, "std": std, "n": n}
                if m in ivs:
                    stats[m].update(lo=ivs[m].lo, hi=ivs[m].hi, n_items=ivs[m].n_items)
            entry["methods"][method] = {"runs": [r.info.run_id for r in rs],
                                        "seeds": [run_value(r, "seed") for r in rs], "metrics": stats}
        base = entry["methods"].get(baseline)
        for method, data in entry["methods"].items():
            if method == baseline or base is None:
                continue
            entry["deltas"][method] = {m: data["metrics"][m]["mean"] - base["metrics"][m]["mean"] for m in metrics}
            if values is None and data["seeds"] == base["seeds"] and len(set(data["seeds"])) == len(data["seeds"]):
                treated = [tables.get(r) for r in data["runs"]]
                control = [tables.get(r) for r in base["runs"]]
                if all(treated) and all(control):
                    entry["paired"][method] = {m: d._asdict() for m, d in
                                               paired_differences(treated, control, metrics, n_resamples).items()}
        configs.append(entry)
    summary: dict[str, dict[str, tuple[int, int]]] = {}
    interval_summary: dict[str, dict[str, tuple[int, int]]] = {}
    for method in method_order:
        if method == baseline:
            continue
        per_metric, per_metric_iv = {}, {}
        for m in metrics:
            better = comparable = 0
            diffs = []
            for c in configs:
                if method not in c["methods"] or baseline not in c["methods"]:
                    continue
                t = c["methods"][method]["metrics"][m]["mean"]
                b = c["methods"][baseline]["metrics"][m]["mean"]
                if math.isnan(t) or math.isnan(b):
                    continue
                comparable += 1
                better += _better(m, t, b)
                paired = c["paired"].get(method, {}).get(m)
                if paired is not None:
                    diffs.append(Difference(**paired))
            per_metric[m] = (better, comparable)
            if diffs:
                tally = count_improvements(diffs, metric_direction(m) or -1)  # 0: |treated| - |baseline| < 0
                per_metric_iv[m] = (tally.interval, tally.comparable)
        summary[method] = per_metric
        interval_summary[method] = per_metric_iv
    kept: dict[str, tuple[int, int]] = {}
    if "retention" in metrics:
        for method in method_order:
            ivs = [Interval(s["mean"], s["lo"], s["hi"], s["n_items"], 0) for c in configs
                   if method in c["methods"] and "lo" in (s := c["methods"][method]["metrics"]["retention"])]
            if ivs:
                tally = count_at_least(ivs, RETENTION_KEPT)
                kept[method] = (tally.interval, tally.comparable)
    return {"configs": configs, "methods": method_order, "summary": summary, "interval_summary": interval_summary,
            "retention_kept_by_interval": kept, "skipped": skipped, "group_by": list(group_by),
            "metrics": list(metrics), "baseline": baseline, "metric_prefix": metric_prefix, "n_runs": len(used),
            "n_with_tables": sum(r.info.run_id in tables for r in used),
            "version_differences": version_differences(used)}


def _seed_order(seed: Optional[str]) -> tuple:
    """Runs in seed order (numbers numerically), so two methods' runs pair up by seed."""
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def version_differences(runs: list) -> dict[str, dict[str, list[str]]]:
    """Libraries whose ``version/<name>`` tag differs between ``runs``: ``{name: {version: [run ids]}}``.

    A run without the tag (logged before versions were recorded) counts as ``unrecorded``; a library no run
    recorded is not reported.
    """
    values: dict[str, dict[str, list[str]]] = {}
    names = sorted({k[len(VERSION_TAG_PREFIX):] for r in runs for k in r.data.tags if k.startswith(VERSION_TAG_PREFIX)})
    for name in names:
        per: dict[str, list[str]] = {}
        for r in runs:
            per.setdefault(r.data.tags.get(f"{VERSION_TAG_PREFIX}{name}", "unrecorded"), []).append(r.info.run_id)
        if len(per) > 1:
            values[name] = per
    return values


def version_warning(differences: dict[str, dict[str, list[str]]]) -> Optional[str]:
    """One line naming each library whose version differs between the compared runs (None if none does)."""
    if not differences:
        return None
    parts = []
    for name, per in differences.items():
        parts.append(f"{name} " + " / ".join(f"{v} ({len(ids)} run{'s' if len(ids) != 1 else ''})"
                                             for v, ids in sorted(per.items())))
    return "warning: the compared runs differ in library versions: " + "; ".join(parts)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """``harm reduced in N of M configurations`` (and the other metrics) per non-baseline method, and per
    method ``retention >= 0.9 in N of M configurations`` (does it still follow the other contexts?); each count
    again by the intervals where the runs have per-example tables."""
    lines = []
    treated = [m for m in result["methods"] if m != result["baseline"]]
    order = ["harm"] + [m for m in result["metrics"] if m != "harm"]
    with_intervals = result.get("interval_summary", {})
    for method in treated:
        prefix = "" if len(treated) == 1 else f"{method}: "
        for m in order:
            if m not in result["summary"][method]:
                continue
            better, comparable = result["summary"][method][m]
            if comparable:
                lines.append(f"{prefix}{_summary_verb(m)} in {better} of {comparable} configurations")
            if m in with_intervals.get(method, {}):
                sure, n = with_intervals[method][m]
                missing = f" ({comparable - n} without per-example tables: not counted)" if n < comparable else ""
                lines.append(f"{prefix}{_summary_verb(m)} in {sure} of {n} configurations with the paired 95% "
                             f"interval excluding 0{missing}")
    if "retention" in result["metrics"]:
        for method in result["methods"]:
            means = [c["methods"][method]["metrics"]["retention"]["mean"] for c in result["configs"]
                     if method in c["methods"]]
            means = [x for x in means if not math.isnan(x)]
            if means:
                kept = sum(x >= RETENTION_KEPT for x in means)
                lines.append(f"{method}: retention >= {RETENTION_KEPT} in {kept} of {len(means)} configurations")
            if method in result.get("retention_kept_by_interval", {}):
                sure, n = result["retention_kept_by_interval"][method]
                lines.append(f"{method}: retention >= {RETENTION_KEPT} in {sure} of {n} configurations with the whole "
                             "95% interval")
    if result.get("n_runs") and not result.get("n_with_tables"):
        lines.append("note: no run has a per-example table of its final evaluation (logged without artifacts, or "
                     "before they existed): point estimates only, no intervals")
    warning = version_warning(result.get("version_differences") or {})
    if warning:
        lines.append(warning)
    return lines


def format_compare_table(result: dict[str, Any]) -> str:
    """Per configuration and method ``mean ± std [lo, hi]`` (std over seeds; the 95% interval over items where
    the runs have tables), and per treated method the difference to the baseline ``Δ [lo, hi]`` (paired)."""
    header = list(result["group_by"]) + ["method", "runs"] + list(result["metrics"])
    rows = []
    for c in result["configs"]:
        key_cells = [short_label(c["key"][g]) for g in result["group_by"]]
        first = True
        for method, data in c["methods"].items():
            cells = key_cells if first else [""] * len(key_cells)
            rows.append(cells + [method, str(len(data["runs"]))]
                        + [_cell(**{k: data["metrics"][m][k] for k in ("mean", "std", "n")}, runs=len(data["runs"]))
                           + _interval_suffix(data["metrics"][m]) for m in result["metrics"]])
            first = False
        for method, delta in c["deltas"].items():
            paired = c.get("paired", {}).get(method, {})
            rows.append([""] * len(key_cells) + [f"Δ {method} − {result['baseline']}", ""]
                        + [format_interval(Difference(**paired[m]), signed=True) if m in paired else _delta(delta[m])
                           for m in result["metrics"]])
    return _pipe_table(header, rows)


def _interval_suffix(stats: dict) -> str:
    if "lo" not in stats or not (math.isfinite(stats["lo"]) and math.isfinite(stats["hi"])):
        return ""
    return f" [{stats['lo']:.3f}, {stats['hi']:.3f}]"
