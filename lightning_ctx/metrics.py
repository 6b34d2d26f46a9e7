"""Context-removability metrics (DESIGN.md §3) as torchmetrics ``Metric``s.

Pure tensors in, 0-dim float tensors (or dicts of them) out; no Lightning import. Every state is
a sum (``dist_reduce_fx="sum"``), so under DDP ``compute()`` gathers all ranks and returns the
metric over the union of their data, and two metric objects can be combined with
``merge_state``. Counts are kept as ``int64`` and sums as ``float64``, so totals are exact or
near-exact however many evaluation items there are (``float64`` states cannot live on Apple MPS).

Conventions shared by all metrics:

* A ratio whose denominator is zero is **NaN**, never 0: e.g. ``harm`` when no item is right
  without the context is undefined, and a 0 there would read as "no harm".
* A metric that saw no data (or was never updated) computes to NaN everywhere; it does not raise.
* ``correct`` flags may be ``bool`` or 0/1 numbers (anything non-zero counts as right).

``RemovabilityMetrics`` bundles the four metrics into one ``nn.Module`` whose ``compute()``
returns the flat ``dict[str, float]`` the evaluation callback logs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = [
    "ContextRemovability",
    "MeanTokenKL",
    "HiddenCosine",
    "Retention",
    "RemovabilityMetrics",
    "REMOVABILITY_KEYS",
]

#: Keys of ``ContextRemovability.compute()``, in logging order.
REMOVABILITY_KEYS = (
    "acc_no_ctx",
    "acc_ctx",
    "harm",
    "help",
    "both_correct",
    "len_no_ctx",
    "len_ctx",
    "len_inflation",
    "trunc_no_ctx",
    "trunc_ctx",
)

_OUT_DTYPE = torch.float32


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` as a 0-dim float32 tensor; NaN where ``den == 0``."""
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    nan = torch.full_like(num, float("nan"))
    out = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), nan)
    return out.to(_OUT_DTYPE)


def _flag(x: Tensor) -> Tensor:
    """Flatten a right/wrong (or truncated) flag tensor to 1-D bool."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex():
        x = x != 0
    return x.reshape(-1).to(torch.bool)


def _numeric(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    return x.reshape(-1)


def _check_numel(name_ref: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.numel() != ref.numel():
            raise ValueError(
                f"{name} has {t.numel()} elements but {name_ref} has {ref.numel()}; "
                "all per-item inputs must describe the same items"
            )


class _SumMetric(Metric):
    """Base: sum-reduced states, mergeable (``merge_state``), and a synced update counter.

    ``n_updates`` is itself a sum-reduced state, so after ``compute()`` (which syncs across DDP
    ranks) ``total_updates`` tells whether *any* rank ever updated the metric.
    ``RemovabilityMetrics`` uses it to omit metrics that were never fed, consistently on all ranks.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("n_updates", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.total_updates: int = 0

    def _count(self, name: str) -> None:
        self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _sum(self, name: str) -> None:
        self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def reset(self) -> None:
        super().reset()
        self.total_updates = 0

    def _record_total_updates(self) -> None:
        # called inside compute(), i.e. on synced states
        self.total_updates = int(self.n_updates.item())


class ContextRemovability(_SumMetric):
    """Accuracy with/without the context, context-induced harm/help, length inflation, truncation.

    ``update(correct_no_ctx, correct_ctx, len_no_ctx, len_ctx, truncated_no_ctx=None,
    truncated_ctx=None)`` takes one entry per evaluation item (any shape, flattened; all inputs
    must have the same number of elements). Item ``i`` was answered once without the context
    (``*_no_ctx``) and once with it (``*_ctx``). Lengths are response tokens (the EOS token
    counted or not, as the caller decides: the same convention on both sides).
    ``truncated_*`` marks responses cut at ``max_new_tokens`` (no EOS produced).

    ``compute()`` returns a dict of 0-dim float32 tensors:

    ==================  =================================================================
    ``acc_no_ctx``      #right without c / N
    ``acc_ctx``         #right with c / N
    ``harm``            #(right without c and wrong with c) / #(right without c)
    ``help``            #(wrong without c and right with c) / #(wrong without c)
    ``both_correct``    #(right without and with c) / N
    ``len_no_ctx``      mean response tokens without c
    ``len_ctx``         mean response tokens with c
    ``len_inflation``   ``len_ctx / len_no_ctx - 1``
    ``trunc_no_ctx``    fraction of no-context responses truncated (0 if never given)
    ``trunc_ctx``       fraction of with-context responses truncated (0 if never given)
    ==================  =================================================================

    Edge cases (all deliberate, none raises):

    * no item right without c  -> ``harm`` is NaN (undefined, *not* 0 = "no harm");
    * every item right without c -> ``help`` is NaN;
    * an empty response (length 0) counts as length 0 in the means, and is right or wrong exactly
      as the verifier said (no special casing);
    * ``len_no_ctx == 0`` (all no-context responses empty) -> ``len_inflation`` is NaN;
    * no updates at all (or only empty ones) -> every value is NaN;
    * ``truncated_*`` omitted in an update -> those items count as not truncated.
    """

    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in (
            "n_items",
            "n_right_no_ctx",
            "n_right_ctx",
            "n_harm",  # right without c, wrong with c
            "n_help",  # wrong without c, right with c
            "n_both",
            "n_trunc_no_ctx",
            "n_trunc_ctx",
        ):
            self._count(name)
        self._sum("sum_len_no_ctx")
        self._sum("sum_len_ctx")

    def update(
        self,
        correct_no_ctx: Tensor,
        correct_ctx: Tensor,
        len_no_ctx: Tensor,
        len_ctx: Tensor,
        truncated_no_ctx: Optional[Tensor] = None,
        truncated_ctx: Optional[Tensor] = None,
    ) -> None:
        r0 = _flag(correct_no_ctx)
        r1 = _flag(correct_ctx)
        l0 = _numeric(len_no_ctx)
        l1 = _numeric(len_ctx)
        t0 = None if truncated_no_ctx is None else _flag(truncated_no_ctx)
        t1 = None if truncated_ctx is None else _flag(truncated_ctx)
        _check_numel(
            "correct_no_ctx", r0, correct_ctx=r1, len_no_ctx=l0, len_ctx=l1,
            truncated_no_ctx=t0, truncated_ctx=t1,
        )
        dev = self.n_items.device
        r0, r1 = r0.to(dev), r1.to(dev)
        self.n_updates += 1
        self.n_items += r0.numel()
        self.n_right_no_ctx += r0.sum()
        self.n_right_ctx += r1.sum()
        self.n_harm += (r0 & ~r1).sum()
        self.n_help += (~r0 & r1).sum()
        self.n_both += (r0 & r1).sum()
        self.sum_len_no_ctx += l0.to(dev, torch.float64).sum()
        self.sum_len_ctx += l1.to(dev, torch.float64).sum()
        if t0 is not None:
            self.n_trunc_no_ctx += t0.to(dev).sum()
        if t1 is not None:
            self.n_trunc_ctx += t1.to(dev).sum()

    def compute(self) -> dict[str, Tensor]:
        self._record_total_updates()
        n = self.n_items
        len_no = _ratio(self.sum_len_no_ctx, n)
        len_ctx = _ratio(self.sum_len_ctx, n)
        return {
            "acc_no_ctx": _ratio(self.n_right_no_ctx, n),
            "acc_ctx": _ratio(self.n_right_ctx, n),
            "harm": _ratio(self.n_harm, self.n_right_no_ctx),
            "help": _ratio(self.n_help, n - self.n_right_no_ctx),
            "both_correct": _ratio(self.n_both, n),
            "len_no_ctx": len_no,
            "len_ctx": len_ctx,
            # ratio of sums == ratio of means (same N); NaN when len_no_ctx is 0 or undefined
            "len_inflation": _ratio(self.sum_len_ctx, self.sum_len_no_ctx) - 1.0,
            "trunc_no_ctx": _ratio(self.n_trunc_no_ctx, n),
            "trunc_ctx": _ratio(self.n_trunc_ctx, n),
        }


class MeanTokenKL(_SumMetric):
    """Mean per-token value over masked positions, e.g. ``ctx_kl``.

    ``update(per_token_kl: [B, T], mask: [B, T] | None = None)`` adds the values at positions where
    ``mask`` is non-zero (response tokens) and counts them; ``mask=None`` means every position.
    Padding positions are *selected out*, not multiplied by 0, so garbage there (even inf/NaN)
    cannot leak into the result. ``compute()`` = sum / number of masked tokens over all updates
    (a per-token mean over the whole evaluation set, not a mean of per-batch means); NaN if no token
    was ever counted.
    """

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sum("value_sum")
        self._count("n_tokens")

    def update(self, per_token_kl: Tensor, mask: Optional[Tensor] = None) -> None:
        values = per_token_kl.detach()
        if mask is None:
            mask = torch.ones_like(values, dtype=torch.bool)
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != per_token_kl shape {tuple(values.shape)}")
        mask = mask.to(values.device) != 0
        dev = self.n_tokens.device
        self.n_updates += 1
        self.value_sum += torch.where(mask, values.to(torch.float64), 0.0).sum().to(dev)
        self.n_tokens += mask.sum().to(dev)

    def compute(self) -> Tensor:
        self._record_total_updates()
        return _ratio(self.value_sum, self.n_tokens)


HiddenStates = Union[Tensor, Sequence[Tensor]]


class HiddenCosine(_SumMetric):
    """Per-layer mean cosine similarity of hidden states with vs without the context.

    ``update(h_no_ctx, h_ctx, mask=None)``: each of ``h_no_ctx``/``h_ctx`` is either a sequence of
    per-layer tensors or one stacked tensor whose first dim is the layer:

    * ``mask=None``: per layer ``[N_tokens, D]`` (stacked: ``[L, N, D]``; a single 2-D ``[N, D]``
      tensor is one layer). Row ``i`` of both inputs must be the same response token.
    * ``mask`` given (``[B, T]``, non-zero at response positions): per layer ``[B, T, D]``
      (stacked: ``[L, B, T, D]``); only masked positions are used. Per-layer sequences are processed
      one layer at a time, so HF's ``output_hidden_states`` tuple can be passed without stacking.

    Layer ``k`` is the ``k``-th entry given (with HF's tuple, entry 0 is the embedding output: the
    caller chooses whether to include it). Similarity is computed in float32 per token,
    ``<a, b> / (max(|a|, eps) * max(|b|, eps))``, clamped to [-1, 1]; **two identical vectors
    (including two zero vectors) have similarity exactly 1** by convention, a zero vector against a
    non-zero one has 0.

    The number of layers is fixed by ``num_layers`` or at the first update; a later update with a
    different count raises. ``compute()`` returns ``{"hidden_cos/layer_k": mean over tokens}`` for
    each layer and ``"hidden_cos/mean"`` (mean over layers; every layer sees the same tokens, so it
    is also the mean over all token-layer pairs); NaN if no token was seen. Under DDP a rank that saw
    no data takes the layer count from the other ranks during sync; passing ``num_layers`` anyway
    makes the state shape explicit.
    """

    higher_is_better = True

    def __init__(self, num_layers: Optional[int] = None, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_layers is not None and num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.eps = eps
        self.add_state(
            "cos_sum", default=torch.zeros(num_layers or 0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self._count("n_tokens")

    @staticmethod
    def _layers(h: HiddenStates, mask: Optional[Tensor], name: str) -> list[Tensor]:
        if isinstance(h, Tensor):
            if mask is None:
                if h.ndim == 2:
                    return [h]
                if h.ndim != 3:
                    raise ValueError(f"{name}: expected [L, N, D] or [N, D] without a mask, got {tuple(h.shape)}")
            elif h.ndim == mask.ndim + 1:  # a single layer [*mask.shape, D]
                return [h]
            return list(h.unbind(0))
        layers = list(h)
        if not layers:
            raise ValueError(f"{name}: no layers given")
        return layers

    @staticmethod
    def cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
        """Row-wise cosine similarity with the conventions above (identical rows -> 1)."""
        a32, b32 = a.float(), b.float()
        dot = (a32 * b32).sum(-1)
        na = a32.norm(dim=-1).clamp_min(eps)
        nb = b32.norm(dim=-1).clamp_min(eps)
        cos = (dot / (na * nb)).clamp(-1.0, 1.0)
        return torch.where((a == b).all(-1), torch.ones_like(cos), cos)

    def update(self, h_no_ctx: HiddenStates, h_ctx: HiddenStates, mask: Optional[Tensor] = None) -> None:
        a_layers = self._layers(h_no_ctx, mask, "h_no_ctx")
        b_layers = self._layers(h_ctx, mask, "h_ctx")
        if len(a_layers) != len(b_layers):
            raise ValueError(f"h_no_ctx has {len(a_layers)} layers but h_ctx has {len(b_layers)}")
        num_layers = len(a_layers)
        if self.num_layers is not None and num_layers != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers (fixed at init/first update), got {num_layers}")

        sums = []
        n_tok = None
        for k, (a, b) in enumerate(zip(a_layers, b_layers)):
            a, b = a.detach(), b.detach()
            if a.shape != b.shape:
                raise ValueError(f"layer {k}: h_no_ctx shape {tuple(a.shape)} != h_ctx shape {tuple(b.shape)}")
            if mask is not None:
                if a.shape[:-1] != mask.shape:
                    raise ValueError(f"layer {k}: hidden shape {tuple(a.shape)} does not match mask {tuple(mask.shape)}")
                sel = mask.to(a.device) != 0
                a, b = a[sel], b[sel]
            elif a.ndim != 2:
                raise ValueError(f"layer {k}: expected [N_tokens, D] without a mask, got {tuple(a.shape)}")
            if n_tok is None:
                n_tok = a.shape[0]
            elif a.shape[0] != n_tok:
                raise ValueError(f"layer {k} has {a.shape[0]} tokens, layer 0 has {n_tok}")
            sums.append(self.cosine(a, b, self.eps).to(torch.float64).sum())
        dev = self.n_tokens.device
        if self.num_layers is None:
            self.num_layers = num_layers
        if self.cos_sum.numel() != num_layers:  # first update without num_layers at init
            self.cos_sum = torch.zeros(num_layers, dtype=torch.float64, device=dev)
            self._defaults["cos_sum"] = torch.zeros(num_layers, dtype=torch.float64)  # reset keeps [L]
        self.n_updates += 1
        self.cos_sum += torch.stack(sums).to(dev)
        self.n_tokens += n_tok

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:
        # A rank that never saw data has a 0-length ``cos_sum`` when the layer count was not given at
        # init; agree on the layer count first so the sum-reduce stacks equal shapes.
        local = torch.tensor([self.cos_sum.numel()], device=self.cos_sum.device)
        counts = {int(c) for c in dist_sync_fn(local, group=process_group or self.process_group)}
        counts.discard(0)
        if len(counts) > 1:
            raise ValueError(f"HiddenCosine: ranks disagree on the number of layers: {sorted(counts)}")
        if counts and self.cos_sum.numel() == 0:
            self.cos_sum = torch.zeros(counts.pop(), dtype=torch.float64, device=self.cos_sum.device)
        super()._sync_dist(dist_sync_fn, process_group)

    def merge_state(self, incoming_state) -> None:
        if isinstance(incoming_state, Metric) and not isinstance(incoming_state, HiddenCosine):
            raise ValueError(f"cannot merge {type(incoming_state).__name__} into HiddenCosine")
        other = incoming_state.metric_state if isinstance(incoming_state, Metric) else incoming_state
        inc = other.get("cos_sum")
        if isinstance(inc, Tensor):
            if self.cos_sum.numel() == 0 and inc.numel() > 0:
                self.cos_sum = torch.zeros_like(inc, dtype=torch.float64, device=self.cos_sum.device)
                self.num_layers = self.num_layers or inc.numel()
            elif inc.numel() == 0 and self.cos_sum.numel() > 0:
                other = dict(other, cos_sum=torch.zeros_like(self.cos_sum))
        super().merge_state(other)

    def compute(self) -> dict[str, Tensor]:
        self._record_total_updates()
        per_layer = [_ratio(s, self.n_tokens) for s in self.cos_sum]
        out = {f"hidden_cos/layer_{k}": v for k, v in enumerate(per_layer)}
        out["hidden_cos/mean"] = (
            _ratio(self.cos_sum.sum(), self.n_tokens * self.cos_sum.numel())
            if per_layer
            else torch.tensor(float("nan"), dtype=_OUT_DTYPE, device=self.n_tokens.device)
        )
        return out


class Retention(_SumMetric):
    """Does the student still follow contexts it was *not* asked to internalize?

    ``update(correct, reference_correct=None)``: ``correct`` = the student's right/wrong on items
    posed with *other* contexts ``c'`` (not the distilled one). Two reference forms:

    * **scalar**: ``Retention(reference_accuracy=a)`` or ``set_reference(a)`` with ``a`` = the
      initial model's accuracy on the same items; ``retention = other_ctx_acc / a``.
    * **per item**: pass ``reference_correct`` (the initial model's right/wrong on the same items,
      aligned with ``correct``); ``retention = sum(correct) / sum(reference_correct)``.

    If every update carried ``reference_correct``, the per-item form is used (it wins over a scalar
    reference: it is measured on exactly these items). Mixing updates with and without
    ``reference_correct`` makes ``compute()`` raise ``ValueError``. Retention may exceed 1.

    ``compute()`` returns 0-dim float32 tensors ``retention``, ``other_ctx_acc`` (= #right / N) and
    ``reference_acc`` (the reference accuracy used). ``retention`` is NaN when there is no reference,
    when the reference accuracy is 0 (or ``sum(reference_correct) == 0``), or when there is no data.
    """

    higher_is_better = True

    def __init__(self, reference_accuracy: Optional[float] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference_accuracy: Optional[float] = None
        self.set_reference(reference_accuracy)
        self._count("n_items")
        self._count("n_correct")
        self._count("n_ref_items")  # items that came with reference_correct
        self._count("n_correct_on_ref_items")
        self._count("n_ref_correct")

    def set_reference(self, reference_accuracy: Optional[float]) -> None:
        """Set (or clear, with ``None``) the initial model's accuracy on the other-context items."""
        if reference_accuracy is not None:
            reference_accuracy = float(reference_accuracy)
            if not (0.0 <= reference_accuracy <= 1.0):
                raise ValueError(f"reference_accuracy must be in [0, 1], got {reference_accuracy}")
        self.reference_accuracy = reference_accuracy
        self._computed = None  # invalidate a cached compute()

    def update(self, correct: Tensor, reference_correct: Optional[Tensor] = None) -> None:
        r = _flag(correct)
        ref = None if reference_correct is None else _flag(reference_correct)
        _check_numel("correct", r, reference_correct=ref)
        dev = self.n_items.device
        r = r.to(dev)
        self.n_updates += 1
        self.n_items += r.numel()
        n_right = r.sum()
        self.n_correct += n_right
        if ref is not None:
            self.n_ref_items += r.numel()
            self.n_correct_on_ref_items += n_right
            self.n_ref_correct += ref.to(dev).sum()

    def compute(self) -> dict[str, Tensor]:
        self._record_total_updates()
        n_ref_items, n_items = int(self.n_ref_items), int(self.n_items)
        acc = _ratio(self.n_correct, self.n_items)
        if n_ref_items > 0:
            if n_ref_items != n_items:
                raise ValueError(
                    f"Retention: {n_ref_items} of {n_items} items came with reference_correct; give a "
                    "per-item reference for every update or for none (then use reference_accuracy)"
                )
            retention = _ratio(self.n_correct_on_ref_items, self.n_ref_correct)
            ref_acc = _ratio(self.n_ref_correct, self.n_ref_items)
        else:
            ref = math.nan if self.reference_accuracy is None else self.reference_accuracy
            ref_acc = torch.tensor(ref, dtype=_OUT_DTYPE, device=acc.device)
            if math.isnan(ref) or ref == 0.0:
                retention = torch.full_like(acc, math.nan)
            else:
                retention = (acc.double() / ref).to(_OUT_DTYPE)
        return {"retention": retention, "other_ctx_acc": acc, "reference_acc": ref_acc}


_NOT_UPDATED = "was called before the ``update`` method"


class RemovabilityMetrics(nn.Module):
    """All context-removability metrics in one ``nn.Module`` (so ``.to(device)`` moves every state).

    Feed the parts directly::

        m = RemovabilityMetrics(num_layers=4, reference_accuracy=0.93).to(device)
        m.removability.update(correct_no_ctx, correct_ctx, len_no_ctx, len_ctx, trunc_no, trunc_ctx)
        m.ctx_kl.update(per_token_kl, response_mask)
        m.hidden.update(hidden_no_ctx, hidden_ctx, response_mask)
        m.retention.update(correct_other_ctx)          # or (correct, reference_correct)
        m.compute()  # -> dict[str, float]
        m.reset()

    ``compute()`` returns one flat ``dict[str, float]`` with keys ``acc_no_ctx, acc_ctx, harm, help,
    both_correct, len_no_ctx, len_ctx, len_inflation, trunc_no_ctx, trunc_ctx`` (always; NaN without
    data), ``ctx_kl``, ``hidden_cos/layer_k`` ..., ``hidden_cos/mean``, ``retention``,
    ``other_ctx_acc``. The ``ctx_kl``, ``hidden_cos/*`` and ``retention``/``other_ctx_acc`` keys are
    omitted when the corresponding metric was never updated (on any rank: the decision uses the
    DDP-synced update count, so every rank returns the same keys). Under DDP call ``compute()`` on
    every rank, as with any torchmetrics metric.

    ``metric_kwargs`` (e.g. ``sync_on_compute``, ``process_group``) go to every metric.
    """

    def __init__(
        self,
        num_layers: Optional[int] = None,
        reference_accuracy: Optional[float] = None,
        hidden_eps: float = 1e-8,
        **metric_kwargs,
    ) -> None:
        super().__init__()
        self.removability = ContextRemovability(**metric_kwargs)
        self.ctx_kl = MeanTokenKL(**metric_kwargs)
        self.hidden = HiddenCosine(num_layers=num_layers, eps=hidden_eps, **metric_kwargs)
        self.retention = Retention(reference_accuracy=reference_accuracy, **metric_kwargs)

    def set_reference(self, reference_accuracy: Optional[float]) -> None:
        self.retention.set_reference(reference_accuracy)

    @staticmethod
    def _compute(metric: Metric):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f".*{_NOT_UPDATED}.*")
            return metric.compute()

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        rem = self._compute(self.removability)
        out.update({k: float(rem[k]) for k in REMOVABILITY_KEYS})
        kl = self._compute(self.ctx_kl)
        if self.ctx_kl.total_updates > 0:
            out["ctx_kl"] = float(kl)
        hid = self._compute(self.hidden)
        if self.hidden.total_updates > 0:
            out.update({k: float(v) for k, v in hid.items()})
        ret = self._compute(self.retention)
        if self.retention.total_updates > 0:
            out["retention"] = float(ret["retention"])
            out["other_ctx_acc"] = float(ret["other_ctx_acc"])
        return out

    def reset(self) -> None:
        for m in (self.removability, self.ctx_kl, self.hidden, self.retention):
            m.reset()
