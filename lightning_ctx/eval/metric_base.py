"""The shared base of the context-removability metrics: sum-reduced states and NaN-safe ratios.

Every state is a sum (``dist_reduce_fx="sum"``), so under DDP ``compute()`` returns the metric over
the union of all ranks' data and two metric objects can be merged with ``merge_state``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["OUT_DTYPE", "SumMetric", "ratio", "flag", "numeric", "check_numel"]

OUT_DTYPE = torch.float32


def ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` as a 0-dim float32 tensor; NaN where ``den == 0``."""
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    nan = torch.full_like(num, float("nan"))
    out = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), nan)
    return out.to(OUT_DTYPE)


def flag(x: Tensor) -> Tensor:
    """Flatten a right/wrong (or truncated) flag tensor to 1-D bool."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex():
        x = x != 0
    return x.reshape(-1).to(torch.bool)


def numeric(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    return x.reshape(-1)


def check_numel(name_ref: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.numel() != ref.numel():
            raise ValueError(
                f"{name} has {t.numel()} elements but {name_ref} has {ref.numel()}; "
                "all per-item inputs must describe the same items"
            )


class SumMetric(Metric):
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
