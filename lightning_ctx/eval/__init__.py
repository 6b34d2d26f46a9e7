"""Context-removability evaluation (docs/design.md, "Metrics").

* :mod:`~lightning_ctx.eval.metrics` (with ``hidden_cos`` and ``metric_base``): the torchmetrics metrics;
* :mod:`~lightning_ctx.eval.evaluator` (with ``decoding``): decode, verify, measure -- without a Trainer;
* :mod:`~lightning_ctx.eval.artifacts`: the per-example table and the plots (write functions only);
* :mod:`~lightning_ctx.eval.callback`: the Lightning callback that schedules, logs and uploads.
"""

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

__all__ = ["ContextRemovabilityCallback", "Evaluator", "EvalResult", "EvalSettings", "References", "Sharding",
           "ContextRemovability", "MeanTokenKL", "HiddenCosine", "Retention", "RemovabilityMetrics",
           "REMOVABILITY_KEYS"]
