"""Context-removability evaluation (docs/design.md, "Metrics").

* :mod:`~lightning_ctx.eval.registry`: every metric registered once, with its per-item definition and roles;
  :mod:`~lightning_ctx.eval.item_metrics` and :mod:`~lightning_ctx.eval.intervals`: the definitions and the
  bootstrap intervals over items (numpy);
* :mod:`~lightning_ctx.eval.metrics` (with ``hidden_cos`` and ``metric_base``): the torchmetrics metrics;
* :mod:`~lightning_ctx.eval.evaluator` (with ``decoding``): decode, verify, measure -- without a Trainer;
* :mod:`~lightning_ctx.eval.artifacts`: the per-example table and the plots (write functions only);
* :mod:`~lightning_ctx.eval.base_callback`: when an evaluation runs in a Trainer, what is logged, kept and
  uploaded; :mod:`~lightning_ctx.eval.callback`: the context-removability callback on it.
"""

from lightning_ctx.eval.base_callback import Evaluation, EvaluationCallback
from lightning_ctx.eval.callback import ContextRemovabilityCallback
from lightning_ctx.eval.evaluator import EvalResult, EvalSettings, Evaluator, References, Sharding
from lightning_ctx.eval.metrics import (
    REMOVABILITY_KEYS,
    ContextRemovability,
    HiddenCosine,
    MeanTokenKL,
    RemovabilityMetrics,
    Retention,
)
from lightning_ctx.eval.registry import REMOVABILITY, ItemRows, MetricRegistry, MetricSpec

__all__ = ["ContextRemovabilityCallback", "EvaluationCallback", "Evaluation", "Evaluator", "EvalResult",
           "EvalSettings", "References", "Sharding", "ContextRemovability", "MeanTokenKL", "HiddenCosine", "Retention",
           "RemovabilityMetrics", "REMOVABILITY_KEYS", "REMOVABILITY", "MetricRegistry", "MetricSpec", "ItemRows"]
