"""The context-removability evaluation without a Trainer (docs/design.md, "Metrics").

``Evaluator`` decodes greedily (and optionally ``num_samples`` samples) from a causal LM on a list of
records twice -- without and with each record's context --, verifies the answers, keeps one row per item
(the per-example table) and computes the metrics of :data:`~lightning_ctx.eval.registry.REMOVABILITY` from
those rows, each with its bootstrap interval over items (``{name}_lo``, ``{name}_hi``, ``n_items``):

* ``acc_no_ctx``, ``acc_ctx``, ``harm``, ``help``, ``both_correct``, lengths (response tokens,
  EOS included), ``len_inflation``, truncation (no EOS within ``max_new_tokens``);
* with ``num_samples`` k: the same from the k samples per item and condition as ``sampled/*`` (sample j without
  paired with sample j with the context), and for k >= 2 ``sampled/harm_rate``, ``sampled/harm_floor`` (what a
  context with no effect would give), ``sampled/harm_excess`` and the same for ``help``;
* ``retention`` / ``other_ctx_acc`` on *retention records* (items posed with other contexts c'): the
  accuracy on them over the initial model's, item by item (or over a scalar ``reference_accuracy``);
* ``ctx_kl`` = mean per-token KL(no-ctx || with-ctx), teacher-forced on the greedy no-context response,
  and ``hidden_cos/layer_k`` = cosine similarity of hidden states with vs without the context at the
  response positions of that same pass (``k`` indexes HF's ``hidden_states`` tuple: 0 = embedding output,
  ``k`` = output of block ``k``; by default every block ``1..L``): token-level, no interval.

``Evaluator.references`` measures the reference points once: the teacher's greedy accuracy with the
context and the initial model's without it and on the retention items.

Usable anywhere, e.g. in a notebook::

    ev = Evaluator(tokenizer, verifier="exact", settings=EvalSettings(max_new_tokens=16))
    ev.evaluate(model, records).metrics

Under DDP pass ``Sharding(rank, world_size)``: each rank decodes every ``world_size``-th item, the rows and
the token-level states are gathered from every rank, and every rank computes the same metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lightning_ctx.data.render import PromptRenderer
from lightning_ctx.eval.decoding import Answers, ResponseDecoder, as_record
from lightning_ctx.eval.hidden_cos import HiddenCosine
from lightning_ctx.eval.intervals import DEFAULT_RESAMPLES
from lightning_ctx.eval.item_metrics import removability_items, retention_items, values
from lightning_ctx.eval.metrics import MeanTokenKL
from lightning_ctx.eval.registry import REMOVABILITY, ItemRows
from lightning_ctx.models.scoring import ScoringInputs, eval_mode, join_prompt_and_response, response_logits
from lightning_ctx.objectives import per_token_divergence
from lightning_ctx.rollout import SamplingSettings

__all__ = ["EvalSettings", "EvalResult", "References", "Sharding", "Evaluator", "ContextMechanics", "gather_objects",
           "resolve_layers", "seeded_rng"]


@dataclass
class EvalSettings:
    """Decoding and batching of one evaluation (greedy always; ``num_samples`` > 0 adds sampled decoding)."""

    max_new_tokens: int = 64
    batch_size: int = 32
    num_samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0  # sampling seed; the caller's RNG state is left untouched
    hidden_layers: Optional[list[int]] = None  # indices into hidden_states; None = every block
    n_resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples of the intervals over items (0 = no intervals)

    def sampling(self, greedy: bool) -> SamplingSettings:
        if greedy:
            return SamplingSettings(max_new_tokens=self.max_new_tokens, greedy=True)
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k)


@dataclass
class EvalResult:
    """One evaluation: unprefixed metrics with their intervals and every rank's per-example rows (by index)."""

    step: int
    split: str
    metrics: dict[str, float]
    examples: list[dict] = field(default_factory=list)
    retention_examples: list[dict] = field(default_factory=list)


@dataclass
class References:
    """``metrics``: ``teacher_acc_ctx`` ...; ``items``: kind (``teacher_ctx``, ``initial_no_ctx``,
    ``retention``) -> {item index: right?} over every rank's items."""

    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[int, bool]] = field(default_factory=dict)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@dataclass
class Sharding:
    """This process's share of the items (every ``world_size``-th, from ``rank``) and the gather across ranks."""

    rank: int = 0
    world_size: int = 1

    def shard(self, records: Sequence) -> list[tuple[int, Any]]:
        return [(i, r) for i, r in enumerate(records) if i % self.world_size == self.rank]

    @staticmethod
    def gather(obj: Any) -> list[Any]:
        return gather_objects(obj)

    def gather_rows(self, rows: list[dict]) -> list[dict]:
        """Every rank's rows, in item order (``index``)."""
        return sorted((r for part in self.gather(rows) for r in part), key=lambda r: r["index"])


@dataclass
class ContextMechanics:
    """``ctx_kl`` and ``hidden_cos`` of the turns or responses scored without and with the context: the states of
    the two torchmetrics, merged across ranks after a gather (``merge``), computed once (``compute``)."""

    layers: list[int] = field(default_factory=list)  # indices into hidden_states
    ctx_kl: MeanTokenKL = field(default_factory=lambda: MeanTokenKL(sync_on_compute=False))
    hidden: HiddenCosine = field(default_factory=lambda: HiddenCosine(sync_on_compute=False))

    def update(self, model, in0: ScoringInputs, in1: ScoringInputs, mask: torch.Tensor, vocab_size: int) -> None:
        """The same response tokens scored teacher-forced without (``in0``) and with (``in1``) the context;
        ``mask``: the scored tokens."""
        logits0, hid0 = response_logits(model, in0, vocab_size, output_hidden_states=True)
        logits1, hid1 = response_logits(model, in1, vocab_size, output_hidden_states=True)
        self.ctx_kl.update(per_token_divergence(logits0.float(), logits1.float(), mask, kind="reverse_kl"), mask)
        R = in0.response_len
        self.hidden.update([hid0[k][:, in0.prefix_len:in0.prefix_len + R] for k in self.layers],
                           [hid1[k][:, in1.prefix_len:in1.prefix_len + R] for k in self.layers], mask)

    def to(self, device) -> ContextMechanics:
        self.ctx_kl, self.hidden = self.ctx_kl.to(device), self.hidden.to(device)
        return self

    def merge(self, other: ContextMechanics) -> None:
        self.ctx_kl.merge_state(other.ctx_kl.cpu().to(self.ctx_kl.device))
        self.hidden.merge_state(other.hidden.cpu().to(self.hidden.device))

    @classmethod
    def gathered(cls, mine: ContextMechanics, sharding: Sharding) -> ContextMechanics:
        """Every rank's states merged (on every rank)."""
        parts = sharding.gather(mine.to("cpu"))
        out = parts[0]
        for p in parts[1:]:
            out.merge(p)
        return out

    def compute(self) -> dict[str, float]:
        """``ctx_kl``, ``hidden_cos/layer_k`` (named by their ``hidden_states`` index) and ``hidden_cos/mean``; empty
        when nothing was scored."""
        if not int(self.ctx_kl.n_updates):
            return {}
        out = {"ctx_kl": float(self.ctx_kl.compute())}
        out.update({k: float(v) for k, v in name_hidden_layers(self.hidden.compute(), self.layers).items()})
        return out


def name_hidden_layers(values: dict, layers: Sequence[int]) -> dict:
    """``hidden_cos/layer_k`` keys named by their ``hidden_states`` index, not by their position in ``layers``."""
    return {(f"hidden_cos/layer_{layers[int(k.rsplit('_', 1)[1])]}" if k.startswith("hidden_cos/layer_") else k): v
            for k, v in values.items()}


def resolve_layers(model, hidden_layers: Optional[Sequence[int]]) -> list[int]:
    """Indices into ``hidden_states`` (length ``L + 1``) compared by ``hidden_cos`` (None = every block)."""
    n_blocks = int(getattr(model.config, "num_hidden_layers"))
    if hidden_layers is None:
        return list(range(1, n_blocks + 1))
    out = []
    for k in hidden_layers:
        kk = k + n_blocks + 1 if k < 0 else k
        if not 0 <= kk <= n_blocks:
            raise ValueError(f"hidden_layers: {k} is out of range for a model with {n_blocks} blocks "
                             f"(0 = embeddings, 1..{n_blocks} = blocks, negative from the end)")
        out.append(kk)
    return sorted(dict.fromkeys(out))


def _device_of(model) -> torch.device:
    inner = getattr(model, "_student", model)  # BaseWeightsTeacher wraps the student
    try:
        return next(inner.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _eval_modes(*models):
    """Every given ``nn.Module`` in eval mode inside, modes restored after (others evaluate themselves)."""
    stack = contextlib.ExitStack()
    for m in models:
        if isinstance(m, torch.nn.Module):
            stack.enter_context(eval_mode(m))
    return stack


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int):
    """A forked RNG seeded with ``seed``: the sampled evaluation leaves the training RNG untouched."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Evaluator(ResponseDecoder):
    """Decode, verify and measure one model with and without the context (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (decodes responses; default renderer, EOS and pad ids).
        verifier: ``(response text, answer) -> right?`` or a verifier name (``exact``, ...).
        renderer: turns ``(prompt, context)`` into ids (default: ``PromptRenderer(tokenizer)``).
        eos_token_ids / pad_token_id: default the tokenizer's.
        engine: the rollout engine (None = HF ``generate``).
        vocab_size: logit width compared in ``ctx_kl`` (None = the model's output embedding rows).
        settings: :class:`EvalSettings`.
        device: where prompts and metric states live (None = the evaluated model's device).
        forward_context: a context-manager factory around the forward passes (e.g. autocast).
        sharding: DDP rank / world size (None = one process).
        progress: a progress bar (rank 0 only).
    """

    def __init__(self, tokenizer, verifier: Callable | str, renderer: Optional[PromptRenderer] = None, *,
                 eos_token_ids: Optional[Sequence[int]] = None, pad_token_id: Optional[int] = None, engine=None,
                 vocab_size: Optional[int] = None, settings: Optional[EvalSettings] = None,
                 device: Optional[torch.device] = None, forward_context: Optional[Callable] = None,
                 sharding: Optional[Sharding] = None, progress: bool = False):
        super().__init__(tokenizer, verifier, renderer, eos_token_ids, pad_token_id, engine)
        self.vocab_size = vocab_size
        self.settings = settings or EvalSettings()
        self.device = device
        self.forward_context = forward_context or contextlib.nullcontext
        self.sharding = sharding or Sharding()
        self.progress = progress

    @classmethod
    def from_datamodule(cls, dm, **kwargs) -> Evaluator:
        """The data module's tokenizer, renderer and verifier (``dm.connect(tokenizer)`` done before)."""
        dm.validate()
        return cls(dm.tokenizer, dm.verifier, dm.renderer, **kwargs)

    @classmethod
    def for_module(cls, pl_module, renderer, verifier, settings: EvalSettings, **kwargs) -> Evaluator:
        """The ids, engine, logit width and device of an ``OnPolicyDistillation`` module."""
        return cls(pl_module.tokenizer, verifier, renderer, eos_token_ids=pl_module.eos_token_ids,
                   pad_token_id=pl_module.pad_token_id, engine=getattr(pl_module, "engine", None),
                   vocab_size=getattr(pl_module, "vocab_size", None), settings=settings, device=pl_module.device,
                   **kwargs)

    def resolve_layers(self, model) -> list[int]:
        return resolve_layers(model, self.settings.hidden_layers)

    def _batches(self, items: list) -> list[list]:
        bs = self.settings.batch_size
        return [items[s:s + bs] for s in range(0, len(items), bs)]

    def _bar(self, total: int, desc: str):
        if not self.progress or self.sharding.rank != 0 or total <= 1:
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (a log keeps every redraw); the summary line stays
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)

    # -- the evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, records: Sequence, retention_records: Optional[Sequence] = None, *,
                 references: Optional[References] = None, reference_accuracy: Optional[float] = None,
                 step: int = 0, split: str = "val", desc: Optional[str] = None) -> EvalResult:
        """Every metric of ``model`` on ``records`` (each rank decodes its shard; rows gathered from every rank).

        ``references`` (from :meth:`references`) add the per-item reference flags to the rows and make
        ``retention`` per item; without them ``reference_accuracy`` is the scalar retention reference.
        """
        records = [as_record(r, f"{split} split") for r in records]
        retention_records = [as_record(r) for r in retention_records or []]
        layers = self.resolve_layers(model)
        device = self.device or _device_of(model)
        mechanics = ContextMechanics(layers).to(device)
        items = (references or References()).items
        ref_ret = items.get("retention")
        # per-item retention reference only when every item has one
        if ref_ret is not None and not all(i in ref_ret for i in range(len(retention_records))):
            ref_ret = None
        main = self._batches(self.sharding.shard(records))
        other = self._batches(self.sharding.shard(retention_records))
        rows: list[dict] = []
        ret_rows: list[dict] = []
        with self._bar(len(main) + len(other), desc or f"step {step}") as bar, _eval_modes(model), \
                self.forward_context():
            for n, chunk in enumerate(main):
                seed_offset = step + n * self.settings.batch_size
                rows += self._main_batch(model, chunk, mechanics, items, device, seed_offset)
                if bar is not None:
                    bar.update(1)
            for chunk in other:
                ret_rows += self._retention_batch(model, chunk, ref_ret, device)
                if bar is not None:
                    bar.update(1)
        rows, ret_rows = self.sharding.gather_rows(rows), self.sharding.gather_rows(ret_rows)
        out = REMOVABILITY.measure(ItemRows(rows, ret_rows, {"reference_accuracy": reference_accuracy}),
                                   seed=self.settings.seed, n_resamples=self.settings.n_resamples)
        out.update(ContextMechanics.gathered(mechanics, self.sharding).compute())
        return EvalResult(step=step, split=split, metrics=out, examples=rows, retention_examples=ret_rows)

    def _main_batch(self, model, chunk, mechanics, items, device, seed_offset) -> list[dict]:
        recs = [r for _, r in chunk]
        greedy = self.settings.sampling(greedy=True)
        a0 = self.answer(model, recs, False, greedy, device)
        a1 = self.answer(model, recs, True, greedy, device)
        r0, r1 = a0.rollout, a1.rollout
        self._teacher_forced(model, a0, a1, mechanics)
        samples = self._sampled_pass(model, recs, a0, a1, seed_offset) if self.settings.num_samples else None
        ref_no, ref_ctx = items.get("initial_no_ctx", {}), items.get("teacher_ctx", {})
        rows = []
        for j, (i, rec) in enumerate(chunk):
            row = {"index": i, "id": rec.id, "context": rec.context, "prompt": rec.prompt, "answer": rec.answer,
                   "response_no_ctx": a0.texts[j], "correct_no_ctx": a0.correct[j], "len_no_ctx": int(r0.lengths[j]),
                   "truncated_no_ctx": not bool(r0.finished[j]),
                   "response_ctx": a1.texts[j], "correct_ctx": a1.correct[j], "len_ctx": int(r1.lengths[j]),
                   "truncated_ctx": not bool(r1.finished[j])}
            if i in ref_no:
                row["initial_correct_no_ctx"] = ref_no[i]
            if i in ref_ctx:
                row["teacher_correct_ctx"] = ref_ctx[i]
            if samples is not None:
                row.update(samples[j])
            rows.append(row)
        return rows

    def _teacher_forced(self, model, a0: Answers, a1: Answers, mechanics: ContextMechanics) -> None:
        """``ctx_kl`` and ``hidden_cos``: the greedy no-context response scored without and with the context."""
        r0 = a0.rollout
        in0 = join_prompt_and_response(a0.prompt_ids, a0.prompt_mask, r0.response_ids, r0.response_mask)
        in1 = join_prompt_and_response(a1.prompt_ids, a1.prompt_mask, r0.response_ids, r0.response_mask)
        mechanics.update(model, in0, in1, r0.response_mask, self.vocab_size or _output_vocab_size(model))

    def _sampled_pass(self, model, recs, a0: Answers, a1: Answers, seed_offset) -> list[dict]:
        """``num_samples`` samples per item without / with the context: per item the k answers' flags, lengths and
        truncation in sample order (sample j without is paired with sample j with), and the two accuracies."""
        k = self.settings.num_samples
        settings = self.settings.sampling(greedy=False)
        with seeded_rng(a0.prompt_ids.device, self.settings.seed + seed_offset):
            ra = self.decode(model, a0.prompt_ids.repeat_interleave(k, 0), a0.prompt_mask.repeat_interleave(k, 0),
                             settings)
            rb = self.decode(model, a1.prompt_ids.repeat_interleave(k, 0), a1.prompt_mask.repeat_interleave(k, 0),
                             settings)
        answers = [r.answer for r in recs for _ in range(k)]
        out = [{} for _ in recs]
        for tag, rollout in (("no_ctx", ra), ("ctx", rb)):
            right = [bool(self.verifier(t, a)) for t, a in zip(self.texts(rollout), answers)]
            lengths, truncated = rollout.lengths.tolist(), (~rollout.finished).tolist()
            for i, row in enumerate(out):
                part = slice(i * k, (i + 1) * k)
                row[f"sampled_acc_{tag}"] = sum(right[part]) / k
                row[f"sampled_correct_{tag}"] = right[part]
                row[f"sampled_len_{tag}"] = [int(x) for x in lengths[part]]
                row[f"sampled_truncated_{tag}"] = [bool(x) for x in truncated[part]]
        return out

    def _retention_batch(self, model, chunk, ref_ret, device) -> list[dict]:
        recs = [r for _, r in chunk]
        a = self.answer(model, recs, True, self.settings.sampling(greedy=True), device)
        rows = []
        for j, (i, rec) in enumerate(chunk):
            row = {"index": i, "id": rec.id, "context": rec.context, "prompt": rec.prompt, "answer": rec.answer,
                   "response": a.texts[j], "correct": a.correct[j], "len": int(a.rollout.lengths[j])}
            if ref_ret is not None:
                row["reference_correct"] = ref_ret[i]
            rows.append(row)
        return rows

    # -- references: the teacher (with context) and the initial model (without context) ------------
    @torch.no_grad()
    def references(self, teacher, records: Sequence, retention_records: Optional[Sequence] = None,
                   initial_model=None) -> References:
        """Greedy teacher accuracy with the context; with an ``initial_model`` also its accuracy without the
        context and on the retention items (the per-item retention reference). Items of every rank."""
        records = [as_record(r, "records") for r in records]
        retention_records = [as_record(r) for r in retention_records or []]
        greedy = self.settings.sampling(greedy=True)
        device = self.device or _device_of(initial_model if initial_model is not None else teacher)
        rows: list[dict] = []  # per item: the teacher with c and the initial model without c
        ret_rows: list[dict] = []
        with _eval_modes(teacher, initial_model), self.forward_context():
            for chunk in self._batches(self.sharding.shard(records)):
                recs = [r for _, r in chunk]
                at = self.answer(teacher, recs, True, greedy, device)
                ai = self.answer(initial_model, recs, False, greedy, device) if initial_model is not None else None
                for j, (i, _) in enumerate(chunk):
                    row = {"index": i, "teacher_ctx": at.correct[j], "teacher_len": int(at.rollout.lengths[j])}
                    if ai is not None:
                        row.update(initial_no_ctx=ai.correct[j], initial_len=int(ai.rollout.lengths[j]))
                    rows.append(row)
            if initial_model is not None and retention_records:
                for chunk in self._batches(self.sharding.shard(retention_records)):
                    cr = self.answer(initial_model, [r for _, r in chunk], True, greedy, device).correct
                    ret_rows += [{"index": i, "retention": cr[j]} for j, (i, _) in enumerate(chunk)]
        # every rank keeps every item's flags (consistent checkpoint state under DDP)
        rows, ret_rows = self.sharding.gather_rows(rows), self.sharding.gather_rows(ret_rows)
        col = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        refs = {}
        if rows:  # the one definition of accuracy and length (the no-context side is the teacher's without a model)
            side0 = ("initial_no_ctx", "initial_len") if initial_model is not None else ("teacher_ctx", "teacher_len")
            v = values(removability_items(col(rows, side0[0]), col(rows, "teacher_ctx"), col(rows, side0[1]),
                                          col(rows, "teacher_len")))
            refs = {"teacher_acc_ctx": v["acc_ctx"], "teacher_len_ctx": v["len_ctx"]}
            if initial_model is not None:
                refs.update(initial_acc_no_ctx=v["acc_no_ctx"], initial_len_no_ctx=v["len_no_ctx"])
        else:
            refs = {"teacher_acc_ctx": math.nan, "teacher_len_ctx": math.nan}
        if ret_rows:
            refs["initial_other_ctx_acc"] = values(retention_items(col(ret_rows, "retention")))["other_ctx_acc"]
        items = {kind: {r["index"]: r[kind] for r in rs if kind in r}
                 for kind, rs in (("teacher_ctx", rows), ("initial_no_ctx", rows), ("retention", ret_rows))}
        return References(refs, {k: v for k, v in items.items() if v})


def _output_vocab_size(model) -> int:
    from lightning_ctx.models.loading import output_vocab_size

    return output_vocab_size(getattr(model, "_student", model))
