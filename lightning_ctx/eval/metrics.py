"""Context-removability metrics (docs/design.md, "Metrics") as torchmetrics ``Metric``s.

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
from typing import Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_ctx.eval.hidden_cos import HiddenCosine
from lightning_ctx.eval.item_metrics import removability_items
from lightning_ctx.eval.metric_base import OUT_DTYPE, SumMetric, check_numel, flag, numeric, ratio

__all__ = [
    "ContextRemovability",
    "MeanTokenKL",
    "HiddenCosine",
    "Retention",
    "RemovabilityMetrics",
    "REMOVABILITY_KEYS",
]

#: Offsets of the one definition's ratios (``len_inflation``: -1), and its keys: ``ContextRemovability``'s, in order.
_OFFSETS = {k: m.offset for k, m in removability_items(*([],) * 6).items()}
REMOVABILITY_KEYS = tuple(_OFFSETS)


class ContextRemovability(SumMetric):
    """Accuracy with/without the context, context-induced harm/help, length inflation, truncation.

    ``update(correct_no_ctx, correct_ctx, len_no_ctx, len_ctx, truncated_no_ctx=None,
    truncated_ctx=None)`` takes one entry per evaluation item (any shape, flattened; all inputs
    must have the same number of elements). Item ``i`` was answered once without the context
    (``*_no_ctx``) and once with it (``*_ctx``). Lengths are response tokens (the EOS token
    counted or not, as the caller decides: the same convention on both sides).
    ``truncated_*`` marks responses cut at ``max_new_tokens`` (no EOS produced).

    The definitions are those of :func:`~lightning_ctx.eval.item_metrics.removability_items` (the evaluator's,
    with intervals): each state is the sum of one of its per-item numerators or denominators, so this metric
    streams and syncs across ranks what the per-item tables give at once. ``compute()`` returns a dict of
    0-dim float32 tensors:

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
        self._count("n_items")
        for key in REMOVABILITY_KEYS:
            self._sum(f"{key}_num")
            self._sum(f"{key}_den")

    def update(
        self,
        correct_no_ctx: Tensor,
        correct_ctx: Tensor,
        len_no_ctx: Tensor,
        len_ctx: Tensor,
        truncated_no_ctx: Optional[Tensor] = None,
        truncated_ctx: Optional[Tensor] = None,
    ) -> None:
        r0 = flag(correct_no_ctx)
        r1 = flag(correct_ctx)
        l0 = numeric(len_no_ctx)
        l1 = numeric(len_ctx)
        t0 = torch.zeros_like(r0) if truncated_no_ctx is None else flag(truncated_no_ctx)
        t1 = torch.zeros_like(r0) if truncated_ctx is None else flag(truncated_ctx)
        check_numel(
            "correct_no_ctx", r0, correct_ctx=r1, len_no_ctx=l0, len_ctx=l1,
            truncated_no_ctx=t0, truncated_ctx=t1,
        )
        items = removability_items(*(x.detach().cpu().double().numpy() for x in (r0, r1, l0, l1, t0, t1)))
        dev = self.n_items.device
        self.n_updates += 1
        self.n_items += r0.numel()
        for key, m in items.items():
            setattr(self, f"{key}_num", getattr(self, f"{key}_num") + torch.tensor(m.num.sum(), device=dev,
                                                                                      dtype=torch.float64))
            setattr(self, f"{key}_den", getattr(self, f"{key}_den") + torch.tensor(m.den.sum(), device=dev,
                                                                                      dtype=torch.float64))

    def compute(self) -> dict[str, Tensor]:
        self._record_total_updates()
        return {k: ratio(getattr(self, f"{k}_num"), getattr(self, f"{k}_den")) + _OFFSETS[k] for k in REMOVABILITY_KEYS}


class MeanTokenKL(SumMetric):
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
        return ratio(self.value_sum, self.n_tokens)



class Retention(SumMetric):
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
        r = flag(correct)
        ref = None if reference_correct is None else flag(reference_correct)
        check_numel("correct", r, reference_correct=ref)
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
        acc = ratio(self.n_correct, self.n_items)
        if n_ref_items > 0:
            if n_ref_items != n_items:
                raise ValueError(
                    f"Retention: {n_ref_items} of {n_items} items came with reference_correct; give a "
                    "per-item reference for every update or for none (then use reference_accuracy)"
                )
            retention = ratio(self.n_correct_on_ref_items, self.n_ref_correct)
            ref_acc = ratio(self.n_ref_correct, self.n_ref_items)
        else:
            ref = math.nan if self.reference_accuracy is None else self.reference_accuracy
            ref_acc = torch.tensor(ref, dtype=OUT_DTYPE, device=acc.device)
            if math.isnan(ref) or ref == 0.0:
                retention = torch.full_like(acc, math.nan)
            else:
                retention = (acc.double() / ref).to(OUT_DTYPE)
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
