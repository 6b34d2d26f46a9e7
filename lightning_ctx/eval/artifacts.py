"""Evaluation artifacts: the per-example JSON/HTML table, the curves and the per-layer hidden-state plot.

Write functions only (no Lightning, no logger): :func:`write_eval_artifacts` writes one evaluation's
files into a folder and says under which artifact path each belongs; the callback uploads them.
Plots draw on matplotlib's Agg canvas directly, so no global backend is switched.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["CURVE_KEYS", "LENGTH_KEYS", "EXAMPLE_COLUMNS", "RETENTION_COLUMNS", "clean", "write_examples_html",
           "plot_curves", "plot_hidden_cos", "write_eval_artifacts"]

#: Metrics drawn in ``curves.png`` (accuracy-like, left panel) and lengths (right panel).
CURVE_KEYS = ("acc_no_ctx", "acc_ctx", "harm", "both_correct", "retention")
LENGTH_KEYS = ("len_no_ctx", "len_ctx")


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


def plot_curves(path: str | Path, history: Sequence[dict], references: Optional[dict] = None,
                title: str = "context removability") -> Path:
    """``history`` = ``[{"step": s, "metrics": {...}}, ...]`` -> accuracy/harm and length curves (PNG)."""
    fig = _new_figure(11, 4)
    ax_acc, ax_len = fig.subplots(1, 2)
    steps = [h["step"] for h in history]
    for key in CURVE_KEYS:
        ys = [h["metrics"].get(key, math.nan) for h in history]
        if all(y is None or (isinstance(y, float) and math.isnan(y)) for y in ys):
            continue
        ax_acc.plot(steps, [math.nan if y is None else y for y in ys], marker="o", label=key)
    refs = references or {}
    for key, style in (("teacher_acc_ctx", ":"), ("initial_acc_no_ctx", "--")):
        v = refs.get(key)
        if v is not None and not math.isnan(v):
            ax_acc.axhline(v, linestyle=style, color="gray", linewidth=1, label=f"ref {key}")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_len):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("fraction")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_title("accuracy, harm, retention")
    ax_acc.legend(fontsize=7, loc="best")
    ax_acc.grid(alpha=0.3)
    for key in LENGTH_KEYS:
        ys = [h["metrics"].get(key, math.nan) for h in history]
        ax_len.plot(steps, [math.nan if y is None else y for y in ys], marker="o", label=key)
    ax_len.set_xlabel("step")
    ax_len.set_ylabel("response tokens (incl. EOS)")
    ax_len.set_title("response length")
    ax_len.legend(fontsize=7, loc="best")
    ax_len.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
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


def write_eval_artifacts(folder: str | Path, *, stage: str, prefix: str, step: int, split: str,
                         metrics: dict[str, float], references: dict[str, float], rows: Sequence[dict],
                         retention_rows: Sequence[dict], history: Sequence[dict]) -> list[tuple[Path, str]]:
    """Write one evaluation's files into ``folder``; returns ``(file, artifact path)`` pairs.

    ``{base}/[validate_]step_NNNNNN/examples.json`` and ``examples.html`` always; ``{base}/curves.png``
    during fit (``history`` = this prefix's evaluations so far); ``{base}/hidden_cos.png`` when the
    metrics have per-layer similarities. ``base`` is the prefix without its slash (``eval``).
    """
    folder = Path(folder)
    base = prefix.rstrip("/") or "eval"
    step_dir = f"{base}/{'validate_' if stage == 'validate' else ''}step_{step:06d}"
    payload = clean({"title": f"{base} step {step} ({split} split, {stage})", "step": step, "split": split,
                     "stage": stage, "metrics": metrics, "references": references,
                     "examples": [{k: v for k, v in r.items() if k != "index"} for r in rows],
                     "retention_examples": [{k: v for k, v in r.items() if k != "index"} for r in retention_rows]})
    (folder / "examples.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    write_examples_html(folder / "examples.html", payload)
    files = [(folder / "examples.json", step_dir), (folder / "examples.html", step_dir)]
    if stage == "fit" and history:
        files.append((plot_curves(folder / "curves.png", history, references,
                                  title=f"context removability ({split})"), base))
    if any(k.startswith("hidden_cos/layer_") for k in metrics):
        layer_hist = history if stage == "fit" and history else [{"step": step, "metrics": metrics}]
        files.append((plot_hidden_cos(folder / "hidden_cos.png", layer_hist), base))
    return files


def plot_method_curves(path: str | Path, curves: dict[str, dict[str, list[tuple[int, float]]]],
                       metrics: Sequence[str] = ("harm", "retention"), title: str = "") -> Path:
    """Several methods on one figure, one panel per metric: ``curves[method][metric] = [(step, value), ...]``.

    Shows the trade-off at a glance: which method removes the harm, and what each costs in retention.
    """
    fig = _new_figure(5 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for method, series in curves.items():
            points = sorted(series.get(metric, []))
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=method)
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
