"""MLflow defaults: a local SQLite store under ``./mlruns/`` (no server), config as params + artifact.

``MLFLOW_TRACKING_URI`` overrides the store. Lightning's own ``MLFlowLogger()`` defaults to the file
store (which MLflow 3 refuses) and LightningCLI's ``SaveConfigCallback`` asserts on a logger without a
``save_dir``; both are handled here.

``lightning-ctx compare`` (:func:`compare_main`) reads runs back from any tracking URI, groups them by
configuration (``--group-by``, default task / target context / model; see ``KEY_SOURCES``) and method
(``model.anchor_weight`` 0 = OPD, > 0 = anchored), averages the final ``eval/*`` metrics over seeds and
prints a paper-style table with deltas and "harm reduced in N of M configurations"; it also writes
``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` to ``--out-dir``.

Every run records the installed versions of the main libraries as tags ``version/<name>``
(:data:`VERSION_PACKAGES`, plus ``version/python``); ``compare`` warns when the compared runs differ in them.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

DEFAULT_STORE_DIR = "mlruns"
DEFAULT_EXPERIMENT = "lightning-ctx"

#: Distributions whose installed version every run records as the tag ``version/<name>`` (with ``python``).
VERSION_PACKAGES = ("torch", "lightning", "transformers", "tokenizers", "mlflow", "torchmetrics", "peft",
                    "bitsandbytes", "lightning-ctx")
VERSION_TAG_PREFIX = "version/"
NOT_INSTALLED = "not installed"


def installed_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.13.0+cpu", ..., "peft": "not installed"}`` for :data:`VERSION_PACKAGES`."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = NOT_INSTALLED
    return out


def version_tags() -> dict[str, str]:
    """:func:`installed_versions` as MLflow tags: ``{"version/torch": "2.13.0+cpu", ...}``."""
    return {f"{VERSION_TAG_PREFIX}{k}": v for k, v in installed_versions().items()}


def default_tracking_uri(store_dir: str | Path = DEFAULT_STORE_DIR) -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<abs>/mlruns/mlflow.db`` (the folder is created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _sqlite_dir(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with SQLite defaults; checkpoints go next to the store.

    Args mirror ``MLFlowLogger``; ``tracking_uri=None`` means :func:`default_tracking_uri`.
    """

    def __init__(self, experiment_name: str = DEFAULT_EXPERIMENT, run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
                 artifact_location: Optional[str] = None, run_id: Optional[str] = None,
                 log_model: bool = False, prefix: str = "", synchronous: Optional[bool] = None):
        uri = tracking_uri or default_tracking_uri()
        tags = {**(tags or {}), **version_tags()}  # a new run gets them at creation (see ``experiment``)
        store = _sqlite_dir(uri)
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
            if artifact_location is None:
                artifact_location = str(store / "artifacts")
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, tags=tags,
                         save_dir=str(store) if store is not None else None, log_model=log_model, prefix=prefix,
                         artifact_location=artifact_location, run_id=run_id, synchronous=synchronous)
        self._store_dir = store
        self._versions_tagged = False

    @property
    @rank_zero_experiment
    def experiment(self):
        """The MlflowClient (rank 0 only; other ranks get Lightning's dummy). On first use the run gets the tags
        ``version/<library>`` (:func:`version_tags`); a resumed run whose versions changed keeps its original tags
        and gets the new ones as ``resumed/version/<library>``."""
        client = MLFlowLogger.experiment.fget(self)
        if not self._versions_tagged and self._run_id is not None:
            self._versions_tagged = True
            existing = client.get_run(self._run_id).data.tags
            for key, value in version_tags().items():
                if key not in existing:
                    client.set_tag(self._run_id, key, value)
                elif existing[key] != value and existing.get(f"resumed/{key}") != value:
                    client.set_tag(self._run_id, f"resumed/{key}", value)
        return client

    @property
    def save_dir(self) -> Optional[str]:
        """The store folder (checkpoints themselves go to ``<default_root_dir>/checkpoints``)."""
        if self._store_dir is not None:
            return str(self._store_dir)
        return super().save_dir

    def continue_run(self, run_id: str) -> None:
        """Log into an existing run (a resumed fit) instead of creating a new one."""
        if self._experiment_id is not None and self._run_id != run_id:
            raise RuntimeError("continue_run must be called before the logger creates its run")
        self._run_id = run_id

    def log_hyperparams(self, params) -> None:
        """Like MLFlowLogger's, but a resumed run may re-log params: equal ones are skipped, changed
        ones (MLflow forbids changing a param) are kept under ``resumed/<name>`` instead of crashing."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        flat = _flatten_dict(_convert_params(params))
        existing = self.experiment.get_run(self.run_id).data.params
        if not existing:
            return super().log_hyperparams(params)
        fresh = {}
        for key, value in flat.items():
            text = str(value)[:6000]
            if key not in existing:
                fresh[key] = value
            elif existing[key] != text and f"resumed/{key}" not in existing:
                fresh[f"resumed/{key}"] = value
        if fresh:
            super().log_hyperparams(fresh)


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"model.anchor_weight": 0.5, ...}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
    elif isinstance(cfg, (list, tuple)) and cfg and any(isinstance(v, (dict, list)) for v in cfg):
        for i, v in enumerate(cfg):
            out.update(flatten_config(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = cfg
    return out


# Keys that legitimately change between a run and its resumption (MLflow forbids changing a param).
_VOLATILE_KEYS = ("ckpt_path", "config", "print_config")


class MLflowConfigCallback(SaveConfigCallback):
    """Logs the resolved CLI config to every MLflow logger: flattened params + ``config.yaml`` artifact."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config_yaml = self.parser.dump(self.config, skip_none=False)
        import yaml

        cfg = yaml.safe_load(config_yaml)
        params = {k: v for k, v in flatten_config(cfg).items() if k.split(".")[0] not in _VOLATILE_KEYS}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.log_hyperparams({f"cfg/{k}": v for k, v in params.items()})
                artifacts = {a.path for a in logger.experiment.list_artifacts(logger.run_id)}
                # A resumed run keeps its original config.yaml and adds the one it resumed with.
                name = "config.yaml" if "config.yaml" not in artifacts else f"config_resumed_step{trainer.global_step}.yaml"
                logger.experiment.log_text(logger.run_id, config_yaml, name)


class TrackingError(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


def check_tracking_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an MLflow server URI does not answer (SQLite/file stores are always local).

    A TCP connect with a short timeout, instead of MLflow's own retries, which take minutes.
    """
    from urllib.parse import urlparse
    import socket

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise TrackingError(f"MLflow tracking server {uri} does not answer ({err}); start it, or unset "
                            f"MLFLOW_TRACKING_URI to use the local SQLite store under ./mlruns") from None


# =================================================================================================
# ``lightning-ctx compare``: runs -> per-configuration, per-method table (mean over seeds) + plot
# =================================================================================================

#: Metrics of the paper-style table (final values of ``{metric_prefix}{name}``).
COMPARE_METRICS = ("acc_no_ctx", "acc_ctx", "harm", "len_inflation", "retention")
#: How "better" reads for the summary lines: +1 higher is better, -1 lower, 0 closer to zero.
METRIC_DIRECTION = {"acc_no_ctx": 1, "acc_ctx": 1, "harm": -1, "help": 1, "both_correct": 1, "len_inflation": 0,
                    "retention": 1, "other_ctx_acc": 1, "ctx_kl": -1, "hidden_cos/mean": 1}
#: Logical grouping keys -> where to read them, first present wins. ``tags.X`` = run tag, ``params.X`` = run
#: param (the CLI logs the resolved config as ``cfg/<key>`` params and the module hparams unprefixed).
KEY_SOURCES: dict[str, tuple[str, ...]] = {
    "task": ("tags.task", "params.cfg/data.init_args.task", "params.cfg/data.init_args.train_file",
             "params.cfg/data.class_path"),
    "target": ("tags.target_context", "tags.target", "params.cfg/data.init_args.target_context",
               "params.target_context"),
    "model": ("tags.model", "params.cfg/model.student", "params.student"),
    "seed": ("tags.seed", "params.cfg/seed_everything", "params.cfg/data.init_args.seed"),
    "anchor_weight": ("tags.anchor_weight", "params.cfg/model.anchor_weight", "params.anchor_weight"),
}
DEFAULT_GROUP_BY = ("task", "target", "model")
DEFAULT_METHOD_KEY = "anchor_weight"
_MISSING = ("", "None", "null", "none")


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
    d = METRIC_DIRECTION.get(metric, 1)
    if d == 0:
        return abs(treated) < abs(baseline)
    return treated > baseline if d > 0 else treated < baseline


def _summary_verb(metric: str) -> str:
    d = METRIC_DIRECTION.get(metric, 1)
    return {1: f"{metric} improved", -1: f"{metric} reduced", 0: f"|{metric}| reduced"}[d]


def compare_runs(runs: list, group_by: Sequence[str] = DEFAULT_GROUP_BY, method_key: str = DEFAULT_METHOD_KEY,
                 metrics: Sequence[str] = COMPARE_METRICS, metric_prefix: str = "eval/",
                 baseline: str = "OPD") -> dict[str, Any]:
    """Group MLflow runs by configuration and method, average the final metrics over seeds.

    Returns ``{"configs": [{"key": {...}, "methods": {name: {"runs": [...], "metrics": {m: {mean, std, n}}}},
    "deltas": {name: {m: delta}}}], "methods": [...], "summary": {name: {m: (improved, comparable)}},
    "skipped": [run ids without any metric of the prefix]}``.
    """
    used, skipped = [], []
    for run in runs:
        if any(k.startswith(metric_prefix) for k in run.data.metrics):
            used.append(run)
        else:
            skipped.append(run.info.run_id)
    raw_methods = [run_value(r, method_key) for r in used]
    labels = method_labels(raw_methods, baseline=baseline)
    groups: dict[tuple, dict[str, list]] = {}
    for run, raw in zip(used, raw_methods):
        key = tuple(run_value(run, g) for g in group_by)
        groups.setdefault(key, {}).setdefault(labels[raw], []).append(run)
    method_order = sorted({m for g in groups.values() for m in g}, key=lambda m: (m != baseline, m))
    configs = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else v for v in k)):
        entry = {"key": dict(zip(group_by, key)), "methods": {}, "deltas": {}}
        for method in method_order:
            rs = groups[key].get(method)
            if not rs:
                continue
            stats = {}
            for m in metrics:
                mean, std, n = _mean_std([r.data.metrics.get(f"{metric_prefix}{m}", math.nan) for r in rs])
                stats[m] = {"mean": mean, "std": std, "n": n}
            entry["methods"][method] = {"runs": [r.info.run_id for r in rs],
                                        "seeds": [run_value(r, "seed") for r in rs], "metrics": stats}
        base = entry["methods"].get(baseline)
        for method, data in entry["methods"].items():
            if method == baseline or base is None:
                continue
            entry["deltas"][method] = {m: data["metrics"][m]["mean"] - base["metrics"][m]["mean"] for m in metrics}
        configs.append(entry)
    summary: dict[str, dict[str, tuple[int, int]]] = {}
    for method in method_order:
        if method == baseline:
            continue
        per_metric = {}
        for m in metrics:
            better = comparable = 0
            for c in configs:
                if method not in c["methods"] or baseline not in c["methods"]:
                    continue
                t = c["methods"][method]["metrics"][m]["mean"]
                b = c["methods"][baseline]["metrics"][m]["mean"]
                if math.isnan(t) or math.isnan(b):
                    continue
                comparable += 1
                better += _better(m, t, b)
            per_metric[m] = (better, comparable)
        summary[method] = per_metric
    return {"configs": configs, "methods": method_order, "summary": summary, "skipped": skipped,
            "group_by": list(group_by), "metrics": list(metrics), "baseline": baseline,
            "metric_prefix": metric_prefix, "n_runs": len(used), "version_differences": version_differences(used)}


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
    """``harm reduced in N of M configurations`` (and the other metrics), per non-baseline method."""
    lines = []
    treated = [m for m in result["methods"] if m != result["baseline"]]
    order = ["harm"] + [m for m in result["metrics"] if m != "harm"]
    for method in treated:
        prefix = "" if len(treated) == 1 else f"{method}: "
        for m in order:
            if m not in result["summary"][method]:
                continue
            better, comparable = result["summary"][method][m]
            if comparable:
                lines.append(f"{prefix}{_summary_verb(m)} in {better} of {comparable} configurations")
    warning = version_warning(result.get("version_differences") or {})
    if warning:
        lines.append(warning)
    return lines


def format_compare_table(result: dict[str, Any]) -> str:
    header = list(result["group_by"]) + ["method", "runs"] + list(result["metrics"])
    rows = []
    for c in result["configs"]:
        key_cells = [short_label(c["key"][g]) for g in result["group_by"]]
        first = True
        for method, data in c["methods"].items():
            cells = key_cells if first else [""] * len(key_cells)
            rows.append(cells + [method, str(len(data["runs"]))]
                        + [_cell(**{k: data["metrics"][m][k] for k in ("mean", "std", "n")}, runs=len(data["runs"]))
                           for m in result["metrics"]])
            first = False
        for method, delta in c["deltas"].items():
            rows.append([""] * len(key_cells) + [f"Δ {method} − {result['baseline']}", ""]
                        + [_delta(delta[m]) for m in result["metrics"]])
    return _pipe_table(header, rows)


def plot_compare(result: dict[str, Any], path: str | Path) -> Path:
    """Bars per configuration and method (error bars = std over seeds), one panel per metric."""
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
                es.append(s["std"] if s["n"] > 1 else 0.0)
            ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=method)
        ax.set_ylabel(m)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(configs)))
    axes[-1].set_xticklabels(labels, rotation=20 if len(configs) > 4 else 0, ha="right" if len(configs) > 4 else "center",
                             fontsize=8)
    axes[-1].set_xlabel(", ".join(varying))
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{result['metric_prefix']}* (final), mean over seeds")
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
                   + [f"{m}_{s}" for m in result["metrics"] for s in ("mean", "std", "n")])
        for c in result["configs"]:
            for method, data in c["methods"].items():
                w.writerow([c["key"][g] if c["key"][g] is not None else "" for g in result["group_by"]]
                           + [method, len(data["runs"])]
                           + [data["metrics"][m][s] for m in result["metrics"] for s in ("mean", "std", "n")])

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

    p = argparse.ArgumentParser(
        prog="lightning-ctx compare",
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
    p.add_argument("--metrics", default=",".join(COMPARE_METRICS), help="columns (default: %(default)s)")
    p.add_argument("--metric-prefix", default="eval/", help="metric name prefix (default: %(default)s)")
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


def compare_main(argv: list[str]) -> int:
    """``lightning-ctx compare``: select runs, group, print the table, write outputs. Exit 1 if nothing matches."""
    import sys

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    args = build_compare_parser().parse_args(argv)
    err = lambda msg: print(f"lightning-ctx compare: {msg}", file=sys.stderr)  # noqa: E731
    uri = args.tracking_uri or default_tracking_uri()
    group_by = _split_list([args.group_by])
    metrics = _split_list([args.metrics])
    if not metrics:
        err("--metrics is empty")
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
    result = compare_runs(runs, group_by=group_by, method_key=args.method_key, metrics=metrics,
                          metric_prefix=args.metric_prefix, baseline=args.baseline)
    if result["n_runs"] == 0:
        err(f"{len(runs)} run(s) matched but none has {args.metric_prefix}* metrics ({where}); were they "
            "trained with lightning_ctx.eval.ContextRemovabilityCallback?")
        return 1
    header = [f"{result['n_runs']} runs from {uri}; grouped by {', '.join(group_by) or '(nothing)'}; "
              f"method from {args.method_key}; final {args.metric_prefix}* metrics, mean ± std over seeds."]
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
