"""``HiddenCosine``: per-layer cosine similarity of hidden states with vs without the context."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ctx.eval.metric_base import OUT_DTYPE, SumMetric, ratio

__all__ = ["HiddenCosine", "HiddenStates"]

HiddenStates = Union[Tensor, Sequence[Tensor]]


class HiddenCosine(SumMetric):
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
                    raise ValueError(f"layer {k}: hidden shape {tuple(a.shape)} does not match mask "
                                     f"{tuple(mask.shape)}")
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
        per_layer = [ratio(s, self.n_tokens) for s in self.cos_sum]
        out = {f"hidden_cos/layer_{k}": v for k, v in enumerate(per_layer)}
        out["hidden_cos/mean"] = (
            ratio(self.cos_sum.sum(), self.n_tokens * self.cos_sum.numel())
            if per_layer
            else torch.tensor(float("nan"), dtype=OUT_DTYPE, device=self.n_tokens.device)
        )
        return out
