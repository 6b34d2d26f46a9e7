"""The context-removability evaluation callback (DESIGN.md section 3).

``ContextRemovabilityCallback`` decodes greedily (and optionally ``num_samples`` samples) from the
**student** on a held-out split twice -- without and with each record's context --, verifies the
answers with the data module's verifier and feeds :class:`~lightning_ctx.metrics.RemovabilityMetrics`:

* ``acc_no_ctx``, ``acc_ctx``, ``harm``, ``help``, ``both_correct``, lengths (response tokens,
  EOS included), ``len_inflation``, truncation (no EOS within ``max_new_tokens``);
* ``ctx_kl`` = mean per-token KL(student no-ctx || student with-ctx), teacher-forced on the greedy
  no-context response;
* ``hidden_cos/layer_k`` = cosine similarity of hidden states with vs without the context at the
  response positions of that same teacher-forced pass (``k`` indexes HF's ``hidden_states`` tuple:
  0 = embedding output, ``k`` = output of block ``k``; by default every block ``1..L``);
* ``retention`` / ``other_ctx_acc`` when *retention records* (items posed with other contexts c')
  exist: the student's greedy accuracy on them over the initial model's, item by item.

Metrics are logged to every logger as ``{prefix}{name}`` (``eval/harm``) at the global step; the
sampled variants as ``{prefix}sampled/{name}``. References are logged once: ``ref/teacher_acc_ctx``
(teacher, greedy, with context) and ``ref/initial_acc_no_ctx`` (the initial model without context),
plus ``ref/teacher_len_ctx``, ``ref/initial_len_no_ctx`` and ``ref/initial_other_ctx_acc``.

When it runs: during ``fit`` every ``every_n_steps`` optimizer steps (``None``: after each of the
trainer's own validation loops), at the end of training, and optionally at step 0
(``eval_at_start``); on ``validate`` (split ``split``) and ``test`` (split ``test_split``, metric prefix
``test_prefix``). Every rank decodes its shard of the items; the torchmetrics states sync across DDP
ranks on ``compute()``; only global rank 0 writes artifacts.

Artifacts (rank 0, per evaluation; MLflow loggers get them through ``log_artifact``, loggers with a
``log_dir`` get copies there): ``{prefix}step_000050/examples.json`` and ``examples.html`` (one row per
item: id, context, prompt, answer, responses without / with context, right/wrong, lengths,
truncation, the reference models' right/wrong), ``{prefix}curves.png`` (accuracies, harm, retention
and lengths over the training steps) and ``{prefix}hidden_cos.png`` (per-layer similarity).

The initial model (reference for ``ref/initial_*`` and the per-item retention reference) is the
teacher when the teacher is the frozen initial student (``model.teacher: null``); with a separate
teacher checkpoint it is the student itself, measured before the first training step
(``on_train_start`` of a fresh fit); otherwise it is unavailable and those references are skipped
(``retention`` is then NaN, ``other_ctx_acc`` is still logged).
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ctx.knobs import above, at_least, check_class_args, existing_file, within
from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import DataError, TaskRecord, load_jsonl
from lightning_ctx.data.render import left_pad
from lightning_ctx.models.scoring import eval_mode, join_prompt_and_response, response_logits
from lightning_ctx.metrics import REMOVABILITY_KEYS, ContextRemovability, RemovabilityMetrics, Retention
from lightning_ctx.objectives import per_token_divergence
from lightning_ctx.rollout import Rollout, SamplingSettings, sample_responses

__all__ = ["ContextRemovabilityCallback", "EvalResult", "write_examples_html", "plot_curves", "plot_hidden_cos"]

#: Metrics drawn in ``curves.png`` (accuracy-like, left panel) and lengths (right panel).
CURVE_KEYS = ("acc_no_ctx", "acc_ctx", "harm", "both_correct", "retention")
LENGTH_KEYS = ("len_no_ctx", "len_ctx")


@dataclass
class EvalResult:
    """One evaluation: unprefixed metrics (synced over ranks) and this rank's per-example rows."""

    step: int
    split: str
    metrics: dict[str, float]
    examples: list[dict] = field(default_factory=list)
    retention_examples: list[dict] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------

def _as_record(obj: Any, source: str = "retention records") -> TaskRecord:
    if isinstance(obj, TaskRecord):
        return obj
    return TaskRecord.from_dict(obj, path=source)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf floats -> None, tensors -> Python values."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# -------------------------------------------------------------------------------------------------
# artifacts: HTML table and plots (matplotlib's Agg canvas directly: no global backend switch)
# -------------------------------------------------------------------------------------------------

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


# -------------------------------------------------------------------------------------------------
# the callback
# -------------------------------------------------------------------------------------------------

class ContextRemovabilityCallback(Callback):
    """Context-removability evaluation during ``fit`` and on ``validate`` / ``test``.

    Args:
        every_n_steps: evaluate every N optimizer steps during fit; ``None`` = after each of the
            trainer's validation loops instead (``val_check_interval``); 0 = only at the end.
        eval_at_start: also evaluate at step 0, before training (the first point of the curves).
        eval_at_end: evaluate at the end of fit (skipped when the last step was just evaluated).
        split: split evaluated during fit and ``validate`` (``val``); ``test_split`` on ``test``.
        max_items: cap on evaluated items (None = the whole split); ``max_retention_items`` likewise.
        batch_size: prompts per decoding batch (None = the data module's ``eval_batch_size``).
        max_new_tokens: decoding budget (None = the module's ``max_new_tokens``).
        num_samples: additionally draw this many samples per item at ``temperature`` / ``top_p``
            and log ``{prefix}sampled/*`` (0 = greedy only). ``seed``: sampling seed (the training
            RNG is left untouched).
        hidden_layers: indices into HF's ``hidden_states`` (0 = embeddings, k = block k, negative
            from the end); None = every block ``1..L``.
        retention_file: JSONL of retention records (other contexts c' and their answers); without it
            the data module's ``retention_records(split)`` is used when it has one. ``retention=False``
            turns retention off.
        log_references: log ``ref/*`` (teacher and initial model) once.
        log_artifacts: write the per-example table and plots (rank 0).
        prefix / test_prefix: metric name prefixes (``eval/`` and ``test/``).
        progress: a progress bar (rank 0) and a one-line summary after each evaluation.
    """

    KNOB_CHECKS = (
        at_least("every_n_steps", 0), at_least("max_items", 1), at_least("batch_size", 1),
        at_least("max_new_tokens", 1), at_least("num_samples", 0),
        above("temperature", 0, when=lambda a: a["num_samples"] > 0, hint="sampled evaluation needs it"),
        within("top_p", 0, 1, low_open=True), existing_file("retention_file"), at_least("max_retention_items", 1),
    )

    def __init__(
        self,
        every_n_steps: Optional[int] = 50,
        eval_at_start: bool = False,
        eval_at_end: bool = True,
        split: str = "val",
        test_split: str = "test",
        max_items: Optional[int] = None,
        batch_size: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        num_samples: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        hidden_layers: Optional[list[int]] = None,
        retention: bool = True,
        retention_file: Optional[str] = None,
        max_retention_items: Optional[int] = None,
        log_references: bool = True,
        log_artifacts: bool = True,
        prefix: str = "eval/",
        test_prefix: str = "test/",
        progress: bool = True,
    ):
        check_class_args(ContextRemovabilityCallback, locals(), "trainer.callbacks.")
        super().__init__()
        self.every_n_steps = every_n_steps
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.split = split
        self.test_split = test_split
        self.max_items = max_items
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.hidden_layers = list(hidden_layers) if hidden_layers is not None else None
        self.retention = retention
        self.retention_file = retention_file
        self.max_retention_items = max_retention_items
        self.log_references = log_references
        self.log_artifacts = log_artifacts
        self.prefix = prefix
        self.test_prefix = test_prefix
        self.progress = progress

        # state (saved in checkpoints)
        self.history: list[dict] = []  # [{"step", "prefix", "metrics"}] in evaluation order
        self.references: dict[str, dict[str, float]] = {}  # split -> {"teacher_acc_ctx": ..., ...}
        # split -> kind ("initial_no_ctx", "teacher_ctx", "retention") -> {item index: right?}
        self.reference_items: dict[str, dict[str, dict[int, bool]]] = {}
        self._last_eval: Optional[tuple[str, int]] = None
        self._retention_cache: dict[str, Optional[list[TaskRecord]]] = {}
        self._refs_logged: set[str] = set()
        self._warned: set[str] = set()

    # -- configuration resolved against the module / data ------------------------------------------
    def _settings(self, pl_module, greedy: bool) -> SamplingSettings:
        n = self.max_new_tokens or int(getattr(pl_module.hparams, "max_new_tokens", 0) or pl_module.sampling.max_new_tokens)
        if greedy:
            return SamplingSettings(max_new_tokens=n, greedy=True)
        return SamplingSettings(max_new_tokens=n, temperature=self.temperature, top_p=self.top_p)

    def resolve_layers(self, model) -> list[int]:
        """Indices into ``hidden_states`` (length ``L + 1``) this callback compares."""
        n_blocks = int(getattr(model.config, "num_hidden_layers"))
        if self.hidden_layers is None:
            return list(range(1, n_blocks + 1))
        out = []
        for k in self.hidden_layers:
            kk = k + n_blocks + 1 if k < 0 else k
            if not 0 <= kk <= n_blocks:
                raise ValueError(f"hidden_layers: {k} is out of range for a model with {n_blocks} blocks "
                                 f"(0 = embeddings, 1..{n_blocks} = blocks, negative from the end)")
            out.append(kk)
        return sorted(dict.fromkeys(out))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @staticmethod
    def _datamodule(trainer):
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, ContextPairDataModule):
            raise DataError("ContextRemovabilityCallback needs a ContextPairDataModule (or a subclass) as `data`")
        return dm

    @staticmethod
    def _ensure_ready(dm, pl_module) -> None:
        dm.connect(pl_module.tokenizer)

    def eval_records(self, dm, split: str) -> list[TaskRecord]:
        records = [_as_record(r, f"{split} split") for r in dm.records(split)]
        return records[: self.max_items] if self.max_items is not None else records

    def retention_records(self, dm, split: str) -> Optional[list[TaskRecord]]:
        """Items with *other* contexts: ``retention_file``, else ``dm.retention_records(split)``."""
        if not self.retention:
            return None
        if split in self._retention_cache:
            return self._retention_cache[split]
        records = None
        if self.retention_file:
            records = load_jsonl(self.retention_file)
        else:
            records = [_as_record(r) for r in dm.retention_records(split)] or None
        if records is not None and self.max_retention_items is not None:
            records = records[: self.max_retention_items]
        self._retention_cache[split] = records or None
        return self._retention_cache[split]

    def _batch_size(self, dm) -> int:
        return self.batch_size or int(getattr(dm, "eval_batch_size", 0) or 32)

    # -- decoding seam (tests replace it) ----------------------------------------------------------
    def decode(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings,
               pl_module) -> Rollout:
        """Responses of ``model`` for left-padded prompts (the module's EOS/pad ids and rollout engine)."""
        return sample_responses(model, prompt_ids, prompt_mask, settings, pl_module.eos_token_ids,
                                pl_module.pad_token_id, getattr(pl_module, "engine", None))

    def _texts(self, pl_module, rollout: Rollout) -> list[str]:
        eos = set(int(e) for e in pl_module.eos_token_ids)
        out = []
        for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
            toks = [t for t, m in zip(ids, mask) if m and t not in eos]
            out.append(pl_module.tokenizer.decode(toks, skip_special_tokens=True).strip())
        return out

    @staticmethod
    def _encode(renderer, records: Sequence[TaskRecord], with_context: bool, pad_id: int, device):
        rows = [renderer.ids(r.prompt, r.context if with_context else None) for r in records]
        ids, mask = left_pad(rows, pad_id)
        return ids.to(device), mask.to(device)

    def _answer(self, model, records, with_context, settings, pl_module, renderer, verifier):
        ids, mask = self._encode(renderer, records, with_context, pl_module.pad_token_id, pl_module.device)
        rollout = self.decode(model, ids, mask, settings, pl_module)
        texts = self._texts(pl_module, rollout)
        correct = [bool(verifier(t, r.answer)) for t, r in zip(texts, records)]
        return ids, mask, rollout, texts, correct

    def _sharded(self, records: Sequence, rank: int, world: int) -> list[tuple[int, Any]]:
        return [(i, r) for i, r in enumerate(records) if i % world == rank]

    @staticmethod
    def _progress_bar(total: int, desc: str, enabled: bool):
        if not enabled or total <= 1:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    @staticmethod
    def _rng_context(device: torch.device, seed: int):
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        ctx = torch.random.fork_rng(devices=devices)

        @contextlib.contextmanager
        def seeded():
            with ctx:
                torch.manual_seed(seed)
                yield
        return seeded()

    # -- the evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, pl_module, records: Sequence[TaskRecord], renderer, verifier,
                 retention_records: Optional[Sequence[TaskRecord]] = None, step: int = 0, split: str = "val",
                 batch_size: int = 32, rank: int = 0, world_size: int = 1, progress: bool = False,
                 forward_context=None, desc: Optional[str] = None) -> EvalResult:
        """Decode, verify and compute every metric for ``records`` (this rank's shard when ``world_size > 1``).

        Usable without a Trainer (tests, notebooks). Returns synced metrics and this rank's rows.
        ``reference_items`` (if computed) add the per-item references to the rows and to retention.
        """
        student = pl_module.student
        layers = self.resolve_layers(student)
        device = pl_module.device
        metrics = RemovabilityMetrics(num_layers=len(layers)).to(device)
        sampled = ContextRemovability().to(device) if self.num_samples else None
        greedy = self._settings(pl_module, greedy=True)
        sample_settings = self._settings(pl_module, greedy=False) if self.num_samples else None
        fwd = forward_context or contextlib.nullcontext
        mine = self._sharded(records, rank, world_size)
        mine_ret = self._sharded(retention_records or [], rank, world_size)
        n_batches = math.ceil(len(mine) / batch_size) + math.ceil(len(mine_ret) / batch_size)
        bar = self._progress_bar(n_batches, desc or f"{self.prefix}step {step}", progress and rank == 0)
        rows: list[dict] = []
        ret_rows: list[dict] = []
        ref_items = self.reference_items.get(split, {})
        ref_no = ref_items.get("initial_no_ctx", {})
        ref_ctx = ref_items.get("teacher_ctx", {})
        ref_ret = ref_items.get("retention")
        # per-item retention reference only when every item has one (Retention refuses a mix)
        if ref_ret is not None and not all(i in ref_ret for i in range(len(retention_records or []))):
            ref_ret = None
        try:
            with eval_mode(pl_module), fwd():
                for start in range(0, len(mine), batch_size):
                    chunk = mine[start:start + batch_size]
                    idx = [i for i, _ in chunk]
                    recs = [r for _, r in chunk]
                    ids0, m0, r0, t0, c0 = self._answer(student, recs, False, greedy, pl_module, renderer, verifier)
                    ids1, m1, r1, t1, c1 = self._answer(student, recs, True, greedy, pl_module, renderer, verifier)
                    metrics.removability.update(torch.tensor(c0), torch.tensor(c1), r0.lengths, r1.lengths,
                                                ~r0.finished, ~r1.finished)
                    # teacher-forced on the greedy no-context response, without and with the context
                    in0 = join_prompt_and_response(ids0, m0, r0.response_ids, r0.response_mask)
                    in1 = join_prompt_and_response(ids1, m1, r0.response_ids, r0.response_mask)
                    logits0, hid0 = response_logits(student, in0, pl_module.vocab_size, output_hidden_states=True)
                    logits1, hid1 = response_logits(student, in1, pl_module.vocab_size, output_hidden_states=True)
                    mask = r0.response_mask
                    kl = per_token_divergence(logits0.float(), logits1.float(), mask, kind="reverse_kl")
                    metrics.ctx_kl.update(kl, mask)
                    R = in0.response_len
                    metrics.hidden.update([hid0[k][:, in0.prefix_len:in0.prefix_len + R] for k in layers],
                                          [hid1[k][:, in1.prefix_len:in1.prefix_len + R] for k in layers], mask)
                    del logits0, logits1, hid0, hid1
                    s0 = s1 = None
                    if sampled is not None:
                        s0, s1 = self._sampled_pass(pl_module, recs, ids0, m0, ids1, m1, sample_settings, verifier,
                                                    sampled, step + start)
                    for j, (i, rec) in enumerate(chunk):
                        row = {"index": i, "id": rec.id, "context": rec.context, "prompt": rec.prompt,
                               "answer": rec.answer,
                               "response_no_ctx": t0[j], "correct_no_ctx": c0[j], "len_no_ctx": int(r0.lengths[j]),
                               "truncated_no_ctx": not bool(r0.finished[j]),
                               "response_ctx": t1[j], "correct_ctx": c1[j], "len_ctx": int(r1.lengths[j]),
                               "truncated_ctx": not bool(r1.finished[j])}
                        if i in ref_no:
                            row["initial_correct_no_ctx"] = ref_no[i]
                        if i in ref_ctx:
                            row["teacher_correct_ctx"] = ref_ctx[i]
                        if s0 is not None:
                            row["sampled_acc_no_ctx"] = s0[j]
                            row["sampled_acc_ctx"] = s1[j]
                        rows.append(row)
                    if bar is not None:
                        bar.update(1)
                for start in range(0, len(mine_ret), batch_size):
                    chunk = mine_ret[start:start + batch_size]
                    recs = [r for _, r in chunk]
                    _, _, rr, tt, cc = self._answer(student, recs, True, greedy, pl_module, renderer, verifier)
                    if ref_ret is not None:
                        metrics.retention.update(torch.tensor(cc), torch.tensor([ref_ret[i] for i, _ in chunk]))
                    else:
                        metrics.retention.update(torch.tensor(cc))
                    for j, (i, rec) in enumerate(chunk):
                        row = {"index": i, "id": rec.id, "context": rec.context, "prompt": rec.prompt,
                               "answer": rec.answer, "response": tt[j], "correct": cc[j], "len": int(rr.lengths[j])}
                        if ref_ret is not None:
                            row["reference_correct"] = ref_ret[i]
                        ret_rows.append(row)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        values = metrics.compute()
        # name hidden layers by their hidden_states index, not by their position in `layers`
        renamed: dict[str, float] = {}
        for k, v in values.items():
            if k.startswith("hidden_cos/layer_"):
                renamed[f"hidden_cos/layer_{layers[int(k.rsplit('_', 1)[1])]}"] = v
            else:
                renamed[k] = v
        if sampled is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
                sv = sampled.compute()
            renamed.update({f"sampled/{k}": float(sv[k]) for k in REMOVABILITY_KEYS})
        return EvalResult(step=step, split=split, metrics=renamed, examples=rows, retention_examples=ret_rows)

    def _sampled_pass(self, pl_module, recs, ids0, m0, ids1, m1, settings, verifier, metric, seed_offset):
        """``num_samples`` samples per item without / with the context; pairs (sample j, sample j) feed ``metric``."""
        k = self.num_samples
        with self._rng_context(pl_module.device, self.seed + seed_offset):
            ra = self.decode(pl_module.student, ids0.repeat_interleave(k, 0), m0.repeat_interleave(k, 0), settings,
                             pl_module)
            rb = self.decode(pl_module.student, ids1.repeat_interleave(k, 0), m1.repeat_interleave(k, 0), settings,
                             pl_module)
        answers = [r.answer for r in recs for _ in range(k)]
        ca = [bool(verifier(t, a)) for t, a in zip(self._texts(pl_module, ra), answers)]
        cb = [bool(verifier(t, a)) for t, a in zip(self._texts(pl_module, rb), answers)]
        metric.update(torch.tensor(ca), torch.tensor(cb), ra.lengths, rb.lengths, ~ra.finished, ~rb.finished)
        per_a = [sum(ca[i * k:(i + 1) * k]) / k for i in range(len(recs))]
        per_b = [sum(cb[i * k:(i + 1) * k]) / k for i in range(len(recs))]
        return per_a, per_b

    # -- references: the teacher (with context) and the initial model (without context) ------------
    @torch.no_grad()
    def compute_references(self, pl_module, records: Sequence[TaskRecord], renderer, verifier,
                           retention_records: Optional[Sequence[TaskRecord]], initial_model=None,
                           split: str = "val", batch_size: int = 32, rank: int = 0, world_size: int = 1,
                           forward_context=None) -> dict[str, float]:
        """Greedy teacher accuracy with context, initial-model accuracy without context and on the retention
        items (the per-item retention reference), for one split. Fills ``self.references[split]`` and
        ``self.reference_items[split]`` (per-item flags by item index, on every rank)."""
        greedy = self._settings(pl_module, greedy=True)
        device = pl_module.device
        rem = ContextRemovability().to(device)
        ret = Retention().to(device)
        items: dict[str, dict[int, bool]] = {"teacher_ctx": {}, "initial_no_ctx": {}, "retention": {}}
        fwd = forward_context or contextlib.nullcontext
        mine = self._sharded(records, rank, world_size)
        with eval_mode(pl_module), fwd():
            for start in range(0, len(mine), batch_size):
                chunk = mine[start:start + batch_size]
                recs = [r for _, r in chunk]
                _, _, rt, _, ct = self._answer(pl_module.teacher, recs, True, greedy, pl_module, renderer, verifier)
                if initial_model is not None:
                    _, _, ri, _, ci = self._answer(initial_model, recs, False, greedy, pl_module, renderer, verifier)
                else:  # placeholder side, not reported
                    ri, ci = rt, ct
                rem.update(torch.tensor(ci), torch.tensor(ct), ri.lengths, rt.lengths)
                for j, (i, _) in enumerate(chunk):
                    items["teacher_ctx"][i] = ct[j]
                    if initial_model is not None:
                        items["initial_no_ctx"][i] = ci[j]
            if initial_model is not None and retention_records:
                mine_ret = self._sharded(retention_records, rank, world_size)
                for start in range(0, len(mine_ret), batch_size):
                    chunk = mine_ret[start:start + batch_size]
                    _, _, _, _, cr = self._answer(initial_model, [r for _, r in chunk], True, greedy, pl_module,
                                                  renderer, verifier)
                    ret.update(torch.tensor(cr))
                    for j, (i, _) in enumerate(chunk):
                        items["retention"][i] = cr[j]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
            rv = rem.compute()
            tv = ret.compute()
        refs = {"teacher_acc_ctx": float(rv["acc_ctx"]), "teacher_len_ctx": float(rv["len_ctx"])}
        if initial_model is not None:
            refs["initial_acc_no_ctx"] = float(rv["acc_no_ctx"])
            refs["initial_len_no_ctx"] = float(rv["len_no_ctx"])
            if retention_records:
                refs["initial_other_ctx_acc"] = float(tv["other_ctx_acc"])
        # every rank keeps every item's flags (consistent checkpoint state under DDP)
        merged: dict[str, dict[int, bool]] = {k: {} for k in items}
        for part in _gather_objects(items):
            for k, v in part.items():
                merged[k].update(v)
        self.references[split] = refs
        self.reference_items[split] = {k: v for k, v in merged.items() if v}
        return refs

    @staticmethod
    def initial_model(trainer, pl_module, before_training: bool):
        """The teacher when it is the frozen initial student; else the student before any training step."""
        hp = getattr(pl_module, "hparams", {})
        teacher_src = hp.get("teacher") if hasattr(hp, "get") else None
        # None = frozen copy of the initial student; "base" = the LoRA student's base weights, adapter off.
        if teacher_src in (None, "base") and getattr(pl_module, "teacher", None) is not None:
            return pl_module.teacher
        if before_training and trainer is not None and trainer.global_step == 0:
            return pl_module.student
        return None

    # -- orchestration inside a Trainer ------------------------------------------------------------
    def _run(self, trainer, pl_module, stage: str) -> Optional[EvalResult]:
        split = self.test_split if stage == "test" else self.split
        prefix = self.test_prefix if stage == "test" else self.prefix
        step = int(trainer.global_step)
        key = (prefix, step)
        if stage == "fit" and self._last_eval == key:  # e.g. end of fit right after a scheduled evaluation
            return None
        dm = self._datamodule(trainer)
        self._ensure_ready(dm, pl_module)
        records = self.eval_records(dm, split)
        if not records:
            self._warn_once(f"empty:{split}", f"ContextRemovabilityCallback: the {split!r} split has no records; "
                                              "skipping evaluation")
            return None
        retention = self.retention_records(dm, split)
        bs = self._batch_size(dm)
        fwd = trainer.precision_plugin.forward_context if hasattr(trainer, "precision_plugin") else None
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        if self.log_references and split not in self._refs_logged:
            self._ensure_references(trainer, pl_module, split, before_training=stage == "fit" and step == 0)
        result = self.evaluate(pl_module, records, dm.renderer, dm.verifier, retention, step=step, split=split,
                               batch_size=bs, rank=rank, world_size=world, progress=self.progress,
                               forward_context=fwd, desc=f"{prefix}step {step} ({split})")
        if stage == "fit":
            self._last_eval = key
        self._log_metrics(trainer, {f"{prefix}{k}": v for k, v in result.metrics.items()}, step)
        for k, v in result.metrics.items():
            trainer.callback_metrics[f"{prefix}{k}"] = torch.tensor(v)
        if stage == "fit":
            self.history.append({"step": step, "prefix": prefix, "metrics": dict(result.metrics)})
        rows = [r for part in _gather_objects(result.examples) for r in part] if self.log_artifacts else []
        ret_rows = [r for part in _gather_objects(result.retention_examples) for r in part] \
            if self.log_artifacts else []
        if trainer.is_global_zero:
            m = result.metrics
            summary = " ".join(f"{k}={m[k]:.3f}" for k in ("acc_no_ctx", "acc_ctx", "harm", "len_inflation",
                                                           "ctx_kl", "hidden_cos/mean", "retention") if k in m)
            if self.progress:
                rank_zero_info(f"[{prefix}step {step}, {split}, {len(records)} items] {summary}")
            if self.log_artifacts:
                rows.sort(key=lambda r: r["index"])
                ret_rows.sort(key=lambda r: r["index"])
                self._write_artifacts(trainer, stage, prefix, step, split, result.metrics, rows, ret_rows)
        return result

    def ref_prefix(self, split: str) -> str:
        """``ref/`` for the main split, ``ref/<split>/`` for another (e.g. the test split)."""
        return "ref/" if split == self.split else f"ref/{split}/"

    def _ensure_references(self, trainer, pl_module, split: str, before_training: bool) -> None:
        dm = self._datamodule(trainer)
        self._ensure_ready(dm, pl_module)
        records = self.eval_records(dm, split)
        if split not in self.references:
            if not records:
                return
            initial = self.initial_model(trainer, pl_module, before_training)
            if initial is None:
                self._warn_once("no-initial", "ContextRemovabilityCallback: the initial model is not available (a "
                                "separate teacher and training already started): ref/initial_* are not logged and "
                                "retention has no reference (NaN)")
            fwd = trainer.precision_plugin.forward_context if hasattr(trainer, "precision_plugin") else None
            self.compute_references(pl_module, records, dm.renderer, dm.verifier, self.retention_records(dm, split),
                                    initial, split, self._batch_size(dm), int(trainer.global_rank),
                                    int(trainer.world_size), fwd)
        prefix = self.ref_prefix(split)
        self._log_metrics(trainer, {f"{prefix}{k}": v for k, v in self.references[split].items()},
                          int(trainer.global_step))
        self._refs_logged.add(split)

    def _log_metrics(self, trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:  # a logger refusing NaN/inf: retry with the finite values only
                finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
                if len(finite) == len(metrics):
                    raise
                self._warn_once(f"nan:{type(logger).__name__}",
                                f"{type(logger).__name__} refused non-finite metrics ({err}); logging finite ones only")
                logger.log_metrics(finite, step=step)
        for logger in trainer.loggers:
            if hasattr(logger, "save"):
                logger.save()

    def _write_artifacts(self, trainer, stage, prefix, step, split, metrics, rows, ret_rows) -> None:
        base = prefix.rstrip("/") or "eval"
        step_dir = f"{base}/{'validate_' if stage == 'validate' else ''}step_{step:06d}"
        payload = {"title": f"{base} step {step} ({split} split, {stage})", "step": step, "split": split,
                   "stage": stage, "metrics": _clean(metrics), "references": _clean(self.references.get(split, {})),
                   "examples": [{k: v for k, v in r.items() if k != "index"} for r in rows],
                   "retention_examples": [{k: v for k, v in r.items() if k != "index"} for r in ret_rows]}
        tmp = Path(tempfile.mkdtemp(prefix="lightning_ctx_eval_"))
        try:
            (tmp / "examples.json").write_text(json.dumps(_clean(payload), indent=1, ensure_ascii=False),
                                               encoding="utf-8")
            write_examples_html(tmp / "examples.html", _clean(payload))
            files = [(tmp / "examples.json", step_dir), (tmp / "examples.html", step_dir)]
            hist = [h for h in self.history if h["prefix"] == prefix]
            if stage == "fit" and hist:
                files.append((plot_curves(tmp / "curves.png", hist, self.references.get(split),
                                          title=f"context removability ({split})"), base))
            layer_hist = hist if stage == "fit" and hist else [{"step": step, "metrics": metrics}]
            if any(k.startswith("hidden_cos/layer_") for k in metrics):
                files.append((plot_hidden_cos(tmp / "hidden_cos.png", layer_hist), base))
            self._upload(trainer, files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _upload(self, trainer, files: list[tuple[Path, str]]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for path, artifact_path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)
            else:
                log_dir = getattr(logger, "log_dir", None)
                if log_dir:
                    for path, artifact_path in files:
                        dest = Path(log_dir) / artifact_path
                        dest.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, dest / path.name)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Fail before training when the evaluated split is empty or the retention file is bad."""
        if stage not in ("fit", "validate", "test"):
            return
        dm = self._datamodule(trainer)
        self._ensure_ready(dm, pl_module)
        split = self.test_split if stage == "test" else self.split
        if not dm.records(split):
            raise DataError(f"ContextRemovabilityCallback evaluates the {split!r} split but it has no records "
                            f"(set data.{split}_file, or the callback's split)", field=f"data.{split}_file")
        self.retention_records(dm, split)
        self.resolve_layers(pl_module.student)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.log_references and self.split not in self._refs_logged:
            self._ensure_references(trainer, pl_module, self.split, before_training=trainer.global_step == 0)
        if self.eval_at_start and trainer.global_step == 0:
            self._run(trainer, pl_module, "fit")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0:
            self._run(trainer, pl_module, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        fn = trainer.state.fn
        fn = getattr(fn, "value", fn)
        if fn == "fit" and self.every_n_steps is None:
            self._run(trainer, pl_module, "fit")
        elif fn == "validate":
            self._run(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "test")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.eval_at_end:
            self._run(trainer, pl_module, "fit")

    # -- checkpoint state --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "references": self.references,
                "reference_items": self.reference_items,
                "last_eval": list(self._last_eval) if self._last_eval else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.references = {s: dict(v) for s, v in state_dict.get("references", {}).items()}
        self.reference_items = {s: {k: {int(i): bool(b) for i, b in v.items()} for k, v in kinds.items()}
                                for s, kinds in state_dict.get("reference_items", {}).items()}
        last = state_dict.get("last_eval")
        self._last_eval = tuple(last) if last else None
