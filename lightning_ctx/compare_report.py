"""``lightning-ctx compare``: read runs back from any tracking URI (their final metrics and per-example tables),
print the comparison table and write ``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` to
``--out-dir``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_ctx.compare import (
    DEFAULT_GROUP_BY,
    DEFAULT_METHOD_KEY,
    KEY_SOURCES,
    RunTable,
    best_k_values,
    compare_metrics,
    compare_runs,
    format_compare_table,
    key_sources,
    metric_registries,
    short_label,
    summary_lines,
)
from lightning_ctx.eval.intervals import DEFAULT_RESAMPLES
from lightning_ctx.tracking import open_store

#: The per-example table each evaluation callback uploads per step: file -> (registry name, rows, retention rows).
TABLE_FILES = {"examples.json": ("removability", "examples", "retention_examples"),
               "transcripts.json": ("games", "games", None)}


def plot_compare(result: dict[str, Any], path: str | Path) -> Path:
    """Bars per configuration and method, one panel per metric; error bars: the 95% interval over items when every
    bar has one (the runs' per-example tables), else the std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics, methods, configs = result["metrics"], result["methods"], result["configs"]
    fig = Figure(figsize=(max(6.0, 1.2 + 0.9 * len(configs) * max(1, len(methods)) / 2) * 1.0,
                          2.6 * len(metrics)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)[:, 0]
    # label configurations by the keys that differ between them (all keys if none does)
    varying = [g for g in result["group_by"] if len({c["key"][g] for c in configs}) > 1] or list(result["group_by"])
    labels = [", ".join(short_label(c["key"][g]) for g in varying) or "all" for c in configs]
    width = 0.8 / max(1, len(methods))
    cells = [c["methods"][method]["metrics"][m] for c in configs for method in c["methods"] for m in metrics]
    intervals = bool(cells) and all("lo" in s and math.isfinite(s["lo"]) for s in cells)
    for ax, m in zip(axes, metrics):
        for j, method in enumerate(methods):
            xs, ys, es = [], [], []
            for i, c in enumerate(configs):
                data = c["methods"].get(method)
                if data is None:
                    continue
                s = data["metrics"][m]
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(s["mean"])
                es.append((s["mean"] - s["lo"], s["hi"] - s["mean"]) if intervals
                          else (s["std"] if s["n"] > 1 else 0.0,) * 2)
            ax.bar(xs, ys, width=width, yerr=list(zip(*es)) if es else None, capsize=3, label=method)
        ax.set_ylabel(m)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(configs)))
    crowded = len(configs) > 4
    axes[-1].set_xticklabels(labels, rotation=20 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    axes[-1].set_xlabel(", ".join(varying))
    axes[0].legend(fontsize=8)
    bars = "95% interval over items" if intervals else "std over seeds"
    axes[0].set_title(f"{result['metric_prefix']}* (final), mean over seeds; bars: {bars}")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_compare_outputs(result: dict[str, Any], out_dir: str | Path, header_lines: Sequence[str] = ()) -> dict:
    """``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` in ``out_dir``."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_compare_table(result)
    lines = summary_lines(result)
    md = ["# Context-removability comparison", "", *header_lines, "", table, "",
          *(f"- {line}" for line in lines), "", "## Runs", ""]
    for c in result["configs"]:
        for method, data in c["methods"].items():
            key = ", ".join(f"{g}={short_label(v)}" for g, v in c["key"].items())
            md.append(f"- {key}, {method}: " + ", ".join(f"`{r}` (seed {s})" for r, s in zip(data["runs"],
                                                                                          data["seeds"])))
    (out / "compare.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with (out / "compare.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(list(result["group_by"]) + ["method", "runs"]
                   + [f"{m}_{s}" for m in result["metrics"] for s in ("mean", "std", "n", "lo", "hi")])
        for c in result["configs"]:
            for method, data in c["methods"].items():
                w.writerow([c["key"][g] if c["key"][g] is not None else "" for g in result["group_by"]]
                           + [method, len(data["runs"])]
                           + [data["metrics"][m].get(s, "") for m in result["metrics"]
                              for s in ("mean", "std", "n", "lo", "hi")])

    def _json_safe(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): _json_safe(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_json_safe(v) for v in x]
        return x

    (out / "compare.json").write_text(json.dumps(_json_safe(result), indent=1), encoding="utf-8")
    plot_compare(result, out / "compare.png")
    return {"markdown": out / "compare.md", "csv": out / "compare.csv", "json": out / "compare.json",
            "png": out / "compare.png"}


def _split_list(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for item in (values or []) for v in item.split(",") if v.strip()]


def build_compare_parser():
    import argparse

    from lightning_ctx.console import PlainHelpFormatter

    p = argparse.ArgumentParser(
        prog="lightning-ctx compare", formatter_class=PlainHelpFormatter,
        description="Compare OPD (anchor weight 0) and anchored runs: final eval/* metrics averaged over seeds "
                    "per configuration, a paper-style table, Markdown/CSV/JSON/PNG outputs.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns/mlflow.db)")
    p.add_argument("--experiment", "--experiments", dest="experiments", action="append", default=None,
                   metavar="NAME", help="experiment name(s); repeat or comma-separate (default: all)")
    p.add_argument("--run-ids", action="append", default=None, metavar="ID", nargs="+",
                   help="only these run ids (comma- or space-separated)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.grid = 'paper'\"")
    p.add_argument("--status", default="FINISHED",
                   help="run status to include (FINISHED, RUNNING, FAILED, KILLED) or 'any' (default: FINISHED)")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY),
                   help="configuration keys, comma-separated: aliases " + ", ".join(sorted(KEY_SOURCES))
                        + ", or params.X / tags.X / X; 'a|b' tries a then b (default: %(default)s)")
    p.add_argument("--method-key", default=DEFAULT_METHOD_KEY,
                   help="key whose value names the method: 0 -> baseline (OPD), > 0 -> anchored (default: "
                        "%(default)s = " + " | ".join(KEY_SOURCES[DEFAULT_METHOD_KEY]) + ")")
    p.add_argument("--baseline", default="OPD", help="name of the anchor-weight-0 method (default: %(default)s)")
    p.add_argument("--metrics", default=None,
                   help="columns, comma-separated (default: the registered compare metrics the runs logged: "
                        + ", ".join(compare_metrics()) + ")")
    p.add_argument("--metric-modules", default="", metavar="MODULES",
                   help="Python modules to import first, comma-separated: they register more metrics")
    p.add_argument("--n-resamples", type=int, default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples of the intervals from the runs' per-example tables (0 = no tables, "
                        "point estimates only; default: %(default)s)")
    p.add_argument("--metric-prefix", default="eval/", help="metric name prefix (default: %(default)s)")
    p.add_argument("--best-k", type=int, default=None, metavar="K",
                   help="per run, the mean over its K best evaluation steps (OPCD: the 3 best checkpoints) instead "
                        "of the final values; steps from --best-min-step on")
    p.add_argument("--best-by", default=None, metavar="METRIC",
                   help="with --best-k: choose the K steps by this metric (e.g. acc_ctx) and read every metric there; "
                        "default: each metric its own K best values")
    p.add_argument("--best-min-step", type=int, default=1,
                   help="with --best-k: first step that counts (default %(default)s: step 0 is the initial model)")
    p.add_argument("--out-dir", default="compare", help="where compare.md/.csv/.json/.png go (default: ./compare)")
    return p


def _search_runs(client, experiment_ids: list[str], filter_string: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _histories(client, run, metrics, prefix: str, by: Optional[str]) -> dict[str, list[tuple[int, float]]]:
    """Full metric name -> ``[(step, value)]`` in logging order, for the metrics ``best_k_values`` reads."""
    names = {f"{prefix}{m}" for m in [*metrics, *([by] if by else [])]}
    out = {}
    for name in sorted(names & set(run.data.metrics)):
        hist = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
        out[name] = [(m.step, m.value) for m in hist]
    return out


def final_table(client, run_id: str, metric_prefix: str = "eval/") -> Optional[RunTable]:
    """The run's per-example table of its last evaluation under the prefix's folder (``eval/step_NNNNNN/``) as
    per-item metrics of the compared namespace (``eval/sampled/`` -> the ``sampled/*`` metrics); None without one."""
    import re
    import tempfile

    from lightning_ctx.eval.registry import ItemRows

    base, _, namespace = metric_prefix.partition("/")
    steps = []
    for f in client.list_artifacts(run_id, base):
        m = re.fullmatch(rf"{re.escape(base)}/step_(\d+)", f.path)
        if f.is_dir and m:
            steps.append((int(m.group(1)), f.path))
    if not steps:
        return None
    folder = max(steps)[1]
    present = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
    registries = {reg.name: reg for reg in metric_registries()}
    for name, (registry, rows_key, retention_key) in TABLE_FILES.items():
        if name not in present:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            payload = json.loads(Path(client.download_artifacts(run_id, f"{folder}/{name}", tmp)).read_text())
        if not isinstance(payload, dict):  # not a table this package wrote: no per-item data
            return None
        rows = ItemRows(payload.get(rows_key) or [], payload.get(retention_key) or [] if retention_key else [])
        if not rows.examples:
            return None
        return RunTable.of(registries[registry], rows, namespace)
    return None


def _final_tables(client, runs, metric_prefix: str) -> dict[str, RunTable]:
    """Run id -> its final table, for the runs that have one (MLflow's download progress bars off meanwhile)."""
    import os

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        found = {r.info.run_id: final_table(client, r.info.run_id, metric_prefix) for r in runs}
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    return {rid: t for rid, t in found.items() if t is not None}


def _method_source(method_key: str) -> str:
    """What names the method in the header: the default key also reads the retain weight and, for runs without the
    on-policy term, their extra terms (:func:`lightning_ctx.compare._method_label`)."""
    if method_key != DEFAULT_METHOD_KEY:
        return method_key
    return f"{method_key} (+ retain_weight; extra terms when opd_weight is 0)"


def compare_main(argv: list[str]) -> int:
    """``lightning-ctx compare``: select runs, group, print the table, write outputs. Exit 1 if nothing matches."""
    import sys

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    args = build_compare_parser().parse_args(argv)
    err = lambda msg: print(f"lightning-ctx compare: {msg}", file=sys.stderr)  # noqa: E731
    uri = open_store(args.tracking_uri)  # a moved store re-rooted (lightning_ctx.store)
    group_by = _split_list([args.group_by])
    metrics = _split_list([args.metrics]) if args.metrics is not None else None
    if metrics is not None and not metrics:
        err("--metrics is empty")
        return 1
    from lightning_ctx.errors import ConfigError
    from lightning_ctx.eval.registry import import_metric_modules

    try:
        import_metric_modules(_split_list([args.metric_modules]))
    except ConfigError as e:
        err(str(e))
        return 1
    try:
        for spec in group_by + [args.method_key]:
            key_sources(spec)
    except ValueError as e:
        err(str(e))
        return 1
    client = MlflowClient(tracking_uri=uri)
    names = _split_list(args.experiments)
    try:
        if names:
            exp_ids = []
            for name in names:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    known = sorted(e.name for e in client.search_experiments())
                    err(f"no experiment named {name!r} at {uri} (experiments there: {', '.join(known) or 'none'})")
                    return 1
                exp_ids.append(exp.experiment_id)
        else:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        clauses = [args.filter.strip()] if args.filter.strip() else []  # MLflow filters: AND only, no parentheses
        status = args.status.strip().upper()
        if status != "ANY":
            clauses.append(f"attributes.status = '{status}'")
        run_ids = _split_list([r for group in (args.run_ids or []) for r in group])
        if run_ids:
            clauses.append("attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")")
        filter_string = " AND ".join(clauses)
        runs = _search_runs(client, exp_ids, filter_string) if exp_ids else []
    except MlflowException as e:
        err(f"MLflow query failed at {uri}: {e.message if hasattr(e, 'message') else e}")
        return 1
    where = (f"tracking URI {uri}; experiments: {', '.join(names) if names else 'all'}; "
             f"filter: {filter_string or '(none)'}")
    if not runs:
        err(f"no runs matched ({where}). Check --experiment/--run-ids/--filter, or use --status any to include "
            "unfinished runs.")
        return 1
    if args.best_by is not None and args.best_k is None:
        err("--best-by needs --best-k")
        return 1
    if args.best_k is not None and args.best_k < 1:
        err(f"--best-k must be >= 1, got {args.best_k}")
        return 1
    metrics = metrics if metrics is not None else compare_metrics(runs, args.metric_prefix)
    values = tables = None
    if args.best_k is not None:
        values = {r.info.run_id: best_k_values(_histories(client, r, metrics, args.metric_prefix, args.best_by),
                                               args.best_k, metrics, args.metric_prefix, args.best_by,
                                               args.best_min_step) for r in runs}
    elif args.n_resamples > 0:
        tables = _final_tables(client, runs, args.metric_prefix)
    result = compare_runs(runs, group_by=group_by, method_key=args.method_key, metrics=metrics,
                          metric_prefix=args.metric_prefix, baseline=args.baseline, values=values, tables=tables,
                          n_resamples=max(args.n_resamples, 1))
    if result["n_runs"] == 0:
        err(f"{len(runs)} run(s) matched but none has {args.metric_prefix}* metrics ({where}); were they "
            "trained with lightning_ctx.eval.ContextRemovabilityCallback?")
        return 1
    which = "final" if args.best_k is None else (
        f"mean of the {args.best_k} best evaluation steps (from step {args.best_min_step}"
        + (f", chosen by {args.best_by}" if args.best_by else ", each metric its own") + ") of")
    header = [f"{result['n_runs']} runs from {uri}; grouped by {', '.join(group_by) or '(nothing)'}; "
              f"method from {_method_source(args.method_key)}; {which} {args.metric_prefix}* metrics, "
              "mean ± std over seeds."]
    if result["n_with_tables"]:
        header.append(f"[lo, hi]: 95% bootstrap interval over items ({result['n_with_tables']} of {result['n_runs']} "
                      "runs have their final per-example table); Δ rows: the paired interval of the difference "
                      "(the same items resampled for both methods and all seeds).")
    elif args.best_k is not None:
        header.append("--best-k: point estimates only (the intervals come from the final evaluation's tables).")
    if result["skipped"]:
        header.append(f"{len(result['skipped'])} matched run(s) without {args.metric_prefix}* metrics were skipped.")
    table = format_compare_table(result)
    lines = summary_lines(result)
    print(header[0])
    for h in header[1:]:
        print(h)
    print(table)
    for line in lines:
        print(line)
    if result["baseline"] not in result["methods"] or len(result["methods"]) < 2:
        print(f"note: only method(s) {', '.join(result['methods'])} found; deltas need {result['baseline']} and a "
              f"second method (check --method-key)")
    paths = write_compare_outputs(result, args.out_dir, header)
    print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['json']}, {paths['png']}")
    return 0
