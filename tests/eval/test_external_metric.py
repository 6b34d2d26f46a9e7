"""A metric added from outside the package, at one place (a temporary module, no file of ours touched): computed
from the per-example rows, logged with its interval, in the summary line, on the curves and in ``compare``."""

from __future__ import annotations

import json
import logging
import sys
import textwrap

import numpy as np
import pytest
import yaml

from tests.helpers import make_records

MODULE = "outside_metrics_for_test"
SOURCE = textwrap.dedent('''
    import numpy as np

    from lightning_ctx.eval.item_metrics import RatioOfSums
    from lightning_ctx.eval.registry import REMOVABILITY, MetricSpec, column


    def short_answers(rows):
        """Fraction of the items whose response with the context has at most 3 tokens."""
        short = column(rows.examples, "len_ctx") <= 3
        return {"short_ctx": RatioOfSums(short.astype(float), np.ones(len(short)))}


    REMOVABILITY.add(MetricSpec("short_ctx", -1, summary=True, curve="fraction", compare=True),
                     items=short_answers)
''')


@pytest.fixture
def outside_module(outside_package):
    yield outside_package(MODULE, SOURCE)
    mod = sys.modules.get(MODULE)
    if mod is not None:
        from lightning_ctx.eval.registry import REMOVABILITY

        REMOVABILITY.remove("short_ctx", items=mod.short_answers)


@pytest.mark.slow
def test_metric_from_outside_is_computed_logged_summarised_drawn_and_compared(
        outside_module, tiny_dirs, jsonl_file, mlflow_uri, tmp_path, monkeypatch, caplog, capsys):
    from mlflow import MlflowClient

    from lightning_ctx.cli import main
    from lightning_ctx.compare_report import compare_main
    from lightning_ctx.eval import artifacts

    drawn = []
    real = artifacts.curves_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        drawn.append([line.get_label() for line in fig.axes[0].lines])
        return fig

    monkeypatch.setattr(artifacts, "curves_figure", spy)
    cfg = tmp_path / "cb.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning_ctx.eval.ContextRemovabilityCallback",
        "init_args": {"every_n_steps": 2, "metric_modules": [outside_module], "n_resamples": 300}}]}}))
    train = jsonl_file(make_records(4, "ADD2", seed=1), "train.jsonl")
    val = jsonl_file(make_records(6, "ADD2", seed=2, prefix="v"), "val.jsonl")
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(cfg), "--model.student", tiny_dirs["qwen2"], "--model.max_new_tokens", "4",
              "--data.task.train_file", train, "--data.task.val_file", val, "--data.batch_size", "2",
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
              "false", "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"])

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics
    # computed from the rows: the final table's own count
    local = client.download_artifacts(run.info.run_id, "eval/step_000002/examples.json", str(tmp_path / "dl"))
    rows = json.loads(open(local).read())["examples"]
    assert metrics["eval/short_ctx"] == pytest.approx(np.mean([r["len_ctx"] <= 3 for r in rows]))
    assert metrics["eval/short_ctx_lo"] <= metrics["eval/short_ctx"] <= metrics["eval/short_ctx_hi"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/short_ctx")] == [0, 2]
    # in the summary line, with its interval
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[eval/step 2")]
    assert len(summaries) == 1 and f"short_ctx={metrics['eval/short_ctx']:.3f} [" in summaries[0]
    # on the curves (drawn at step 2, with the evaluations of steps 0 and 2)
    assert drawn and "short_ctx" in drawn[-1]
    # a default column of compare
    assert compare_main(["--tracking-uri", mlflow_uri, "--out-dir", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| task"))
    assert "short_ctx" in header.split("|")[-2]
