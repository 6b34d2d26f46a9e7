"""The shipped world configs at their default regime (docs: README "The built-in rule world"): plain OPD keeps
following the other contexts better than the anchored run does -- the direction the regime was chosen for."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"


def _final_retention(mlflow_uri, config: str, run_name: str) -> float:
    main(["fit", "--config", str(EXPERIMENTS / config), "--trainer.max_steps", "50",
          "--data.task.n_val", "20", "--data.task.eval_other_contexts", "4",
          "--data.task.eval_other_items", "10", "--trainer.logger.init_args.run_name", run_name,
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("world")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return run.data.metrics["eval/retention"]


@pytest.mark.slow
def test_default_regime_opd_keeps_other_contexts_better_than_anchored(mlflow_uri):
    opd = _final_retention(mlflow_uri, "world_opd.yaml", "regime-opd")
    anchored = _final_retention(mlflow_uri, "world_anchored.yaml", "regime-anchored")
    assert opd > anchored, (opd, anchored)
    assert opd >= 0.9  # the regime's point: plain OPD does not forget the other contexts


def test_method_curves_plot_has_one_line_per_method(tmp_path, monkeypatch):
    from lightning_ctx.eval import artifacts

    drawn = []
    real = artifacts._new_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        drawn.append(fig)
        return fig

    monkeypatch.setattr(artifacts, "_new_figure", spy)
    curves = {"OPD": {"harm": [(0, 0.0), (50, 0.5)], "retention": [(0, 1.0), (50, 0.98)]},
              "anchored": {"harm": [(0, 0.0), (50, 0.0)], "retention": [(0, 1.0), (50, 0.8)]},
              "anchored + retain": {"harm": [(50, 0.0)], "retention": [(50, 1.0)]}}
    path = artifacts.plot_method_curves(tmp_path / "t.png", curves)
    assert path.read_bytes()[:4] == b"\x89PNG"
    harm_ax, ret_ax = drawn[0].axes
    assert [line.get_label() for line in harm_ax.lines] == ["OPD", "anchored", "anchored + retain"]
    assert list(ret_ax.lines[1].get_ydata()) == [1.0, 0.8] and harm_ax.get_title() == "harm"
