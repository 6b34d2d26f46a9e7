"""A short distillation on the built-in rule world, end to end through the CLI and its shipped config."""

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main

CONFIG = Path(__file__).resolve().parents[3] / "experiments" / "world_anchored_retain.yaml"


@pytest.mark.slow
def test_world_anchored_retain_fit(mlflow_uri):
    main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "3", "--data.batch_size", "8",
          "--data.task.n_val", "20", "--data.task.eval_other_contexts", "2",
          "--data.task.eval_other_items", "5", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"])
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("world").experiment_id])
    m = run.data.metrics
    for name in ("train/opd", "train/anchor", "train/retain", "train/loss"):
        assert math.isfinite(m[name]), name
    # The retention term is fed by other contexts and the loss is the weighted sum of the three terms.
    history = {name: {p.step: p.value for p in client.get_metric_history(run.info.run_id, name)}
               for name in ("train/opd", "train/anchor", "train/retain", "train/loss")}
    for step, loss in history["train/loss"].items():
        expected = (history["train/opd"][step] + 0.5 * history["train/anchor"][step]
                    + 0.5 * history["train/retain"][step])
        assert loss == pytest.approx(expected, rel=1e-5)
    # The evaluation callback ran at the end on held-out items, with retention from other contexts.
    for name in ("eval/acc_no_ctx", "eval/acc_ctx", "eval/harm", "eval/retention", "ref/teacher_acc_ctx"):
        assert name in m, name
    assert m["ref/teacher_acc_ctx"] == 1.0  # the shipped base follows the SHOW context perfectly
    assert run.data.params["cfg/data.task.init_args.target_context"] == "SHOW"
