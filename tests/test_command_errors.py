"""Every command's user errors end in one line naming the file or knob and what to do, never a Python traceback
(#26.10, #26.12, #26.13, #26.14); stores created by two processes at once."""

import json
import os
import subprocess
import sys

import pytest

from lightning_ctx.cli import main


def _one_line(capsys, fn, code=2):
    with pytest.raises(SystemExit) as info:
        fn()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("lightning-ctx")]
    assert len(lines) == 1 and info.value.code == code, (info.value.code, err)
    return lines[0]


def _fit(*args):
    main(["fit", "--model.student", "builtin:world", "--trainer.max_steps", "1", *args])


# ------------------------------------------------------------------ tracking stores


@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/x/mlruns"])
def test_mlflow_file_store_is_named_with_the_sqlite_uri_to_use(tmp_path, monkeypatch, capsys, uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    line = _one_line(capsys, _fit)
    assert f"MLFLOW_TRACKING_URI={uri} is MLflow's file store" in line and "sqlite:///" in line


def test_a_read_only_store_is_refused_before_any_run(mlflow_uri, monkeypatch, capsys):
    from pathlib import Path

    db = Path(mlflow_uri.removeprefix("sqlite:///"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == db and mode & os.W_OK
                        else real_access(p, mode, **kw))  # tests run as root, who may write anywhere
    line = _one_line(capsys, lambda: _fit("--config", "builtin:world.yaml"))
    assert f"the MLflow store {db} is read-only" in line and "MLFLOW_TRACKING_URI" in line


@pytest.mark.slow  # creates an MLflow schema twice at once (~10 s each)
def test_two_processes_creating_one_new_store_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = "import sys; from lightning_ctx.tracking import prepare_store; prepare_store(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    from mlflow.tracking import MlflowClient

    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]


def test_compare_on_a_mistyped_store_path_creates_nothing(tmp_path, capsys):
    db = tmp_path / "mlrun" / "mlflow.db"
    line = _one_line(capsys, lambda: main(["compare", "--tracking-uri", f"sqlite:///{db}",
                                           "--out-dir", str(tmp_path / "out")]))
    assert f"no MLflow store at {db}" in line and not db.parent.exists()


# ------------------------------------------------------------------ data, models, output paths


def test_a_lone_surrogate_in_jsonl_names_the_line(tmp_path, mlflow_uri, capsys):
    good = {"id": "a", "context": "ADD2", "prompt": "1 2", "answer": "1 2"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, id="b", context="\ud800")) + "\n")
    line = _one_line(capsys, lambda: _fit("--data.task.train_file", str(path)))
    assert f"{path}, line 2" in line and "\\ud800" in line


def test_errors_while_the_data_is_built_are_one_line(tmp_path, mlflow_uri, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("")
    mcqa = ["--data.task", "lightning_ctx.tasks.mcqa.MCQATask"]
    line = _one_line(capsys, lambda: _fit(*mcqa, "--data.task.system_prompt_file", str(prompt)))
    assert str(prompt) in line and "empty" in line
    prompt.write_text("Be a doctor.")
    line = _one_line(capsys, lambda: _fit(*mcqa, "--data.task.system_prompt", "x", "--data.task.system_prompt_file",
                                          str(prompt)))
    assert ("field 'data.task.system_prompt': give data.task.system_prompt or data.task.system_prompt_file, not both"
            in line)
    line = _one_line(capsys, lambda: _fit("--data.task", "lightning_ctx.tasks.safety.SafetyTask",
                                          "--data.task.system_prompt", "s", "--data.task.fields", '{"bogus": "x"}'))
    assert "fields" in line and "bogus" in line


def test_a_model_path_that_is_a_file_says_so(tmp_path, mlflow_uri, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    line = _one_line(capsys, lambda: main(["fit", "--model.student", str(weights), "--trainer.max_steps", "1"]))
    assert f"{weights} is a file, not a model folder" in line


@pytest.mark.parametrize("argv, needle", [
    (["pretrain-world", "--out", "OUT", "--max-steps", "0"], "field '--max-steps': must be >= 1"),
    (["pretrain-world", "--out", "OUT", "--width", "10", "--heads", "4"], "multiple of --heads"),
    (["pretrain-world", "--out", "OUT", "--p-no-context", "2"], "field '--p-no-context'"),
    (["pretrain-world", "--out", "FILE"], "field '--out': is a file"),
    (["pretrain-games", "--out", "OUT", "--batch-size", "0"], "field '--batch-size': must be >= 1"),
    (["pretrain-games", "--out", "OUT", "--p-none", "0.8", "--p-builtin", "0.5"], "must be at most 1"),
    (["pretrain-games", "--out", "OUT", "--lr", "nan"], "field '--lr': must be a positive number"),
    (["pretrain-games", "--out", "FILE"], "field '--out': is a file"),
    (["compare", "--out-dir", "FILE"], "field '--out-dir': is a file"),
    (["extract", "--model", "x", "--out", "FILE/e.txt"], "FILE is a file"),
    (["extract", "--model", "x", "--out", "e.txt", "--env-id", "Nope-v0"], "field '--env-id'"),
    (["compare", "--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9 does not answer"),  # no retries
])
def test_command_arguments_are_checked_before_any_work(tmp_path, monkeypatch, mlflow_uri, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    line = _one_line(capsys, lambda: main(argv))
    assert needle in line
    assert not (tmp_path / "OUT").exists()
