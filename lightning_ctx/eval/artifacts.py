"""Evaluation artifacts: the per-example JSON/HTML table, the curves and the per-layer hidden-state plot.

Write functions only (no Lightning, no logger): :func:`write_examples` writes one evaluation's tables into a
folder, :func:`plot_curves` the metrics a registry draws (with their intervals as bands); the evaluation
callbacks upload them. Plots draw on matplotlib's Agg canvas directly, so no global backend is switched.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["EXAMPLE_COLUMNS", "RETENTION_COLUMNS", "clean", "write_examples_html", "write_examples", "curves_figure",
           "plot_curves", "plot_hidden_cos", "plot_method_curves"]


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf floats -> None, tensors -> Python values."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


_HTML_STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.ok { background: #e3f6e3; } td.bad { background: #fbe3e3; }
tr.harm td.id { border-left: 4px solid #d33; } tr.help td.id { border-left: 4px solid #3a3; }
pre { margin: 0; white-space: pre-wrap; font-family: monospace; }
"""

EXAMPLE_COLUMNS = ("id", "context", "prompt", "answer", "response_no_ctx", "correct_no_ctx", "len_no_ctx",
                   "truncated_no_ctx", "response_ctx", "correct_ctx", "len_ctx", "truncated_ctx",
                   "initial_correct_no_ctx", "teacher_correct_ctx", "sampled_acc_no_ctx", "sampled_acc_ctx")
RETENTION_COLUMNS = ("id", "context", "prompt", "answer", "response", "correct", "reference_correct", "len")


def _html_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    columns = [c for c in columns if any(c in r for r in rows)]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for r in rows:
        cls = ""
        if r.get("correct_no_ctx") is True and r.get("correct_ctx") is False:
            cls = " class='harm'"
        elif r.get("correct_no_ctx") is False and r.get("correct_ctx") is True:
            cls = " class='help'"
        cells = []
        for c in columns:
            v = r.get(c)
            td = "td"
            if isinstance(v, bool) and (c.startswith("correct") or c.endswith("correct") or c.startswith("initial_")
                                        or c.startswith("teacher_")):
                td = f"td class='{'ok' if v else 'bad'}'"
            elif c == "id":
                td = "td class='id'"
            text = html.escape(_fmt(v))
            if c.startswith("response") or c in ("prompt", "context", "answer"):
                text = f"<pre>{text}</pre>"
            cells.append(f"<{td}>{text}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def write_examples_html(path: str | Path, payload: dict) -> Path:
    """Self-contained HTML page for one evaluation's ``payload`` (the ``examples.json`` content)."""
    metrics = payload.get("metrics", {})
    refs = payload.get("references", {})
    summary_rows = [{"metric": k, "value": v} for k, v in list(metrics.items()) + list(refs.items())]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(payload.get('title', 'evaluation'))}</title><style>{_HTML_STYLE}</style></head><body>",
        f"<h2>{html.escape(payload.get('title', 'evaluation'))}</h2>",
        "<p>Rows with a red left border are <b>harmed</b> (right without the context, wrong with it); green "
        "border: helped. Lengths are response tokens including EOS; truncated = no EOS within max_new_tokens.</p>",
        _html_table(summary_rows, ("metric", "value")),
        f"<h3>Items ({len(payload.get('examples', []))})</h3>",
        _html_table(payload.get("examples", []), EXAMPLE_COLUMNS),
    ]
    if payload.get("retention_examples"):
        parts += [f"<h3>Retention items, other contexts ({len(payload['retention_examples'])})</h3>",
                  _html_table(payload["retention_examples"], RETENTION_COLUMNS)]
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _series(history: Sequence[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """``key``'s values and interval ends over ``history`` (NaN where missing)."""
    def get(h, k):
        v = h["metrics"].get(k)
        return math.nan if v is None else float(v)
    return ([get(h, key) for h in history], [get(h, f"{key}_lo") for h in history],
            [get(h, f"{key}_hi") for h in history])


def curves_figure(history: Sequence[dict], registry, references: Optional[dict] = None,
                  title: str = "context removability"):
    """The ``registry``'s curve metrics over ``history`` (``[{"step": s, "metrics": {...}}, ...]``): fractions on
    the left, lengths on the right, each with its 95% interval over items as a band; ``references`` (name ->
    value) as horizontal lines on the left. A metric without any finite value is left out."""
    fig = _new_figure(11, 4)
    ax_acc, ax_len = fig.subplots(1, 2)
    steps = [h["step"] for h in history]
    for ax, panel in ((ax_acc, "fraction"), (ax_len, "length")):
        for key in registry.curve_names(panel):
            ys, lo, hi = _series(history, key)
            if not any(math.isfinite(y) for y in ys):
                continue
            (line,) = ax.plot(steps, ys, marker="o", label=key)
            if any(math.isfinite(v) for v in lo + hi):
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    for (key, v), style in zip((references or {}).items(), (":", "--", "-.")):
        if v is not None and math.isfinite(v):
            ax_acc.axhline(v, linestyle=style, color="gray", linewidth=1, label=f"ref {key}")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_len):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    ax_acc.set_ylabel("fraction (band: 95% interval over items)")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_title("accuracy, harm, retention")
    ax_len.set_ylabel("tokens (incl. EOS)")
    ax_len.set_title("length")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(path: str | Path, history: Sequence[dict], registry, references: Optional[dict] = None,
                title: str = "context removability") -> Path:
    """:func:`curves_figure` saved as a PNG."""
    curves_figure(history, registry, references, title).savefig(path)
    return Path(path)


def plot_hidden_cos(path: str | Path, history: Sequence[dict],
                    title: str = "hidden-state cosine, with vs without context", max_lines: int = 8) -> Path:
    """Per-layer ``hidden_cos`` of up to ``max_lines`` evaluations spread over ``history`` (the latest bold)."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(6, 4)
    ax = fig.subplots()
    history = [h for h in history if any(k.startswith("hidden_cos/layer_") for k in h["metrics"])]
    if len(history) > max_lines:  # evenly spaced evaluations, always including the first and the latest
        picks = sorted({round(i * (len(history) - 1) / (max_lines - 1)) for i in range(max_lines)})
        history = [history[i] for i in picks]
    cmap = colormaps["viridis"]
    drawn = 0
    for i, h in enumerate(history):
        layers = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in h["metrics"].items()
                        if k.startswith("hidden_cos/layer_") and v is not None)
        last = i == len(history) - 1
        ax.plot([k for k, _ in layers], [v for _, v in layers], marker="o", color=cmap(i / max(1, len(history) - 1)),
                alpha=1.0 if last else 0.5, linewidth=2.5 if last else 1, label=f"step {h['step']}")
        drawn += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_examples(folder: str | Path, *, title: str, stage: str, step: int, split: str, metrics: dict[str, float],
                   references: dict[str, float], rows: Sequence[dict], retention_rows: Sequence[dict]) -> list[Path]:
    """One evaluation's per-example table as ``examples.json`` and ``examples.html`` in ``folder``."""
    folder = Path(folder)
    payload = clean({"title": title, "step": step, "split": split, "stage": stage, "metrics": metrics,
                     "references": references,
                     "examples": [{k: v for k, v in r.items() if k != "index"} for r in rows],
                     "retention_examples": [{k: v for k, v in r.items() if k != "index"} for r in retention_rows]})
    (folder / "examples.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    write_examples_html(folder / "examples.html", payload)
    return [folder / "examples.json", folder / "examples.html"]


def plot_method_curves(path: str | Path, curves: dict[str, dict[str, list[tuple]]],
                       metrics: Sequence[str] = ("harm", "retention"), title: str = "") -> Path:
    """Several methods on one figure, one panel per metric: ``curves[method][metric] = [(step, value), ...]`` or
    ``[(step, value, lo, hi), ...]`` (the 95% interval over items, drawn as a band).

    Shows the trade-off at a glance: which method removes the harm, and what each costs in retention.
    """
    fig = _new_figure(5 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for method, series in curves.items():
            points = sorted(series.get(metric, []))
            if not points:
                continue
            steps = [p[0] for p in points]
            (line,) = ax.plot(steps, [p[1] for p in points], marker="o", label=method)
            if all(len(p) == 4 for p in points):
                ax.fill_between(steps, [p[2] for p in points], [p[3] for p in points], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
