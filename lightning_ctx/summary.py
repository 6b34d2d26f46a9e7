"""The summary printed at the end of ``lightning-ctx fit`` / ``validate`` / ``test`` (global rank 0): which MLflow run
holds the results, the final evaluation, where the model is, and the commands to look further.

The metrics are read back from the run itself (MLflow's latest value of each), so the table is what ``compare`` and the
UI will show, whichever evaluation callback logged it.
"""

from __future__ import annotations

import math
import os
from typing import Optional

# shown first, in this order; other metrics of the stage follow alphabetically
LEADING = ("acc_no_ctx", "acc_ctx", "harm", "help", "len_inflation", "retention", "ctx_kl", "pass_no_ctx",
           "pass_ctx")
STAGE_PREFIX = {"fit": "eval/", "validate": "eval/", "test": "test/"}
TRAIN_TERMS = ("loss", "opd", "anchor", "retain")


def _fmt(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


def metric_rows(metrics: dict[str, float], prefix: str, per_row: int = 4) -> list[str]:
    """``prefix`` metrics (top level, plus ``hidden_cos/mean``) as aligned ``name value`` cells, ``per_row`` a line."""
    names = {k[len(prefix):] for k in metrics if k.startswith(prefix)}
    names = {n for n in names if "/" not in n or n == "hidden_cos/mean"}
    ordered = [n for n in LEADING if n in names] + sorted(names - set(LEADING))
    cells = [f"{n} {_fmt(metrics[prefix + n])}" for n in ordered]
    width = max((len(c) for c in cells), default=0) + 3
    return ["".join(c.ljust(width) for c in cells[i:i + per_row]).rstrip() for i in range(0, len(cells), per_row)]


def _store_flag(uri: str) -> str:
    """`` --tracking-uri URI`` unless ``uri`` is what the commands use by default here."""
    from pathlib import Path

    default = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"
    return "" if uri == default else f" --tracking-uri {uri}"


def run_summary(trainer, stage: str) -> Optional[str]:
    """The summary text of ``trainer``'s last ``stage`` (None on ranks other than 0)."""
    from lightning.pytorch.loggers import MLFlowLogger

    from lightning_ctx.export import MODEL_ARTIFACT, ModelExport

    if not trainer.is_global_zero:
        return None
    lines = [f"──── {stage} done: step {trainer.global_step} " + "─" * 40]
    loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger) and lg.run_id]
    metrics: dict[str, float] = {}
    logger = loggers[0] if loggers else None
    if logger is not None:
        run = logger.experiment.get_run(logger.run_id)
        metrics = run.data.metrics
        lines.append(f"MLflow run   {run.info.run_id} ({run.info.run_name}), experiment '{logger._experiment_name}', "
                     f"status {run.info.status}")
        lines.append(f"store        {logger._tracking_uri}")
    else:
        lines.append("MLflow run   none (no MLflow logger)")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    prefix = STAGE_PREFIX.get(stage, "eval/")
    rows = metric_rows(metrics, prefix)
    if rows:
        lines.append(f"final {prefix}* (the last evaluation):")
        lines += [f"  {r}" for r in rows]
    else:
        lines.append(f"final {prefix}*: none logged (no evaluation callback ran)")
    if stage == "fit":
        train = [f"{t} {metrics['train/' + t]:.4g}" for t in TRAIN_TERMS if f"train/{t}" in metrics]
        if train:
            lines.append(f"last step    {'   '.join(train)}")
        export = next((cb for cb in trainer.callbacks if isinstance(cb, ModelExport)), None)
        checkpoint = ModelExport.last_checkpoint(trainer)
        if export is not None and export.exported_to:
            lines.append(f"model        {export.exported_to} (save_pretrained folder)")
        if export is not None and export.artifact_uri:
            lines.append(f"model        logged to the run as {MODEL_ARTIFACT}/")
        lines.append(f"checkpoint   {checkpoint}" if checkpoint else
                     "checkpoint   none (trainer.enable_checkpointing is false)" if not trainer.checkpoint_callbacks
                     else "checkpoint   none written")
        if logger is not None and (checkpoint or (export is not None and export.artifact_uri)):
            out = os.path.join("exports", logger.run_id)
            lines.append(f"export       lightning-ctx export --run-id {logger.run_id} --out {out}"
                         f"{_store_flag(logger._tracking_uri)}")
    if logger is not None:
        flag = _store_flag(logger._tracking_uri)
        lines.append(f"look further lightning-ctx ui{flag}")
        lines.append(f"             lightning-ctx compare --experiment {logger._experiment_name}{flag}")
    return "\n".join(lines)
