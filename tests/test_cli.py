"""End-to-end: ``lightning-ctx fit`` on tiny saved checkpoints, read back from MLflow."""

import math
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main
from tests.helpers import make_records


def _fit(student, train, extra=()):
    main(["fit", "--model.student", student, "--data.task.train_file", train, "--data.batch_size", "4",
          "--model.max_new_tokens", "6", "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])


def _only_run(uri):
    runs = mlflow.search_runs(experiment_names=["lightning-ctx"], output_format="list")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("anchor", [0.0, 0.5])
def test_fit_logs_loss_terms_to_mlflow(tiny_dirs, jsonl_file, mlflow_uri, family, anchor):
    train = jsonl_file(make_records(8))
    _fit(tiny_dirs[family], train, ["--model.anchor_weight", str(anchor)])
    run = _only_run(mlflow_uri)
    metrics = run.data.metrics
    for name in ("train/loss", "train/opd", "train/entropy", "train/response_len", "train/tokens_per_s"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert ("train/anchor" in metrics) == (anchor > 0)
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 2  # one point per step
    params = run.data.params
    assert float(params["cfg/model.anchor_weight"]) == anchor and params["cfg/model.student"] == tiny_dirs[family]
    assert "config.yaml" in [a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)]


def test_print_config_shows_every_knob(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--print_config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for knob in ("student:", "teacher:", "anchor_weight:", "train_file:", "val_file:", "test_file:",
                 "divergence:", "chunk_size:", "max_new_tokens:", "MLflowLogger"):
        assert knob in out, knob


def test_user_errors_exit_2_with_one_line(tmp_path, tiny_dirs, jsonl_file, mlflow_uri, capsys):
    bad = jsonl_file(['{"id": "a", "context": "c", "prompt": "1 2", "answer": "x"}', '{"id": "b", "prompt": "3"}'])
    with pytest.raises(SystemExit) as info:
        _fit(tiny_dirs["qwen2"], bad)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2, field 'context'" in err and "Traceback" not in err
    assert not mlflow.search_runs(experiment_names=["lightning-ctx"], output_format="list")
    with pytest.raises(SystemExit) as info:
        _fit(str(tmp_path / "no-such-model"), bad)
    assert info.value.code == 2 and "model.student: " in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lightning_ctx.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fit" in out.stdout and "validate" in out.stdout


def test_a_task_switched_in_keeps_its_own_defaults(tiny_dirs, mlflow_uri):
    """jsonargparse #460 carries a previous class's init_args into a new class_path: with the task as the only
    class that a config switches (the DataModule is fixed), the task's own defaults hold and the loader's knobs are
    the DataModule's, wherever they are set."""
    from lightning_ctx.cli import ContextCLI
    from lightning_ctx.tasks.world import WorldTask

    cli = ContextCLI(args=["--data.task", "lightning_ctx.tasks.world.WorldTask", "--model.student", tiny_dirs["qwen2"],
                           "--data.task.n_val", "7", "--data.max_prompt_length", "100"], run=False)
    task = cli.datamodule.task
    assert isinstance(task, WorldTask) and task.sizes == {"train": 800, "val": 7, "test": 100}
    assert task.eval_other_contexts == 8 and cli.datamodule.max_prompt_length == 100
