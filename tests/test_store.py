"""A moved or copied ``mlruns/`` keeps its artifacts reachable (``lightning_ctx.store``), for compare, the notebook's
artifact listing and ``mlflow ui``."""

import shutil

import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main
from lightning_ctx.store import reroot_artifacts
from lightning_ctx.tracking import MLflowLogger


def _store_with_run(folder, template):
    """A store like the CLI's (``MLflowLogger``: artifacts under ``<store>/artifacts``) with one finished run."""
    (folder / "mlruns").mkdir(parents=True)
    shutil.copy(template, folder / "mlruns" / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    logger = MLflowLogger(experiment_name="world", run_name="world-opd", tracking_uri=uri,
                          tags={"anchor_weight": "0.0", "target_context": "SHOW"})
    client, run_id = logger.experiment, logger.run_id
    client.log_text(run_id, "model: {}\n", "config.yaml")
    client.log_text(run_id, "[]", "eval/step_000004/examples.json")
    for key, value in {"eval/acc_no_ctx": 1.0, "eval/acc_ctx": 0.25, "eval/harm": 0.75}.items():
        client.log_metric(run_id, key, value, step=4)
    client.set_terminated(run_id)
    return run_id


def _listing(uri, run_id):
    client = MlflowClient(uri)
    return sorted(a.path for a in client.list_artifacts(run_id)) + sorted(
        a.path for a in client.list_artifacts(run_id, "eval/step_000004"))


EXPECTED = ["config.yaml", "eval", "eval/step_000004/examples.json"]


def test_moved_store_keeps_compare_and_artifacts(tmp_path, mlflow_template_db, monkeypatch):
    run_id = _store_with_run(tmp_path / "a", mlflow_template_db)
    assert _listing(f"sqlite:///{tmp_path / 'a' / 'mlruns' / 'mlflow.db'}", run_id) == EXPECTED
    (tmp_path / "b").mkdir()
    shutil.move(tmp_path / "a" / "mlruns", tmp_path / "b" / "mlruns")  # another folder, as after docker -v or scp
    uri = f"sqlite:///{tmp_path / 'b' / 'mlruns' / 'mlflow.db'}"
    assert _listing(uri, run_id) == []  # MLflow alone: the recorded absolute paths are gone

    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(SystemExit) as info:
        main(["compare", "--tracking-uri", uri, "--experiment", "world", "--out-dir", str(tmp_path / "cmp")])
    assert info.value.code == 0
    assert "0.750" in (tmp_path / "cmp" / "compare.md").read_text()  # the metrics, read from the moved store
    assert _listing(uri, run_id) == EXPECTED  # compare re-rooted the store: plain MLflow finds the files again
    path = MlflowClient(uri).download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert open(path).read() == "model: {}\n"
    assert reroot_artifacts(uri) == 0  # nothing left to do


def test_copied_store_reads_the_original_until_it_is_gone(tmp_path, mlflow_template_db):
    run_id = _store_with_run(tmp_path / "orig", mlflow_template_db)
    shutil.copytree(tmp_path / "orig" / "mlruns", tmp_path / "copy" / "mlruns")
    uri = f"sqlite:///{tmp_path / 'copy' / 'mlruns' / 'mlflow.db'}"
    assert reroot_artifacts(uri) == 0  # the recorded paths still exist: left alone
    shutil.rmtree(tmp_path / "orig")
    assert reroot_artifacts(uri) == 2  # the experiment and the run (Default's folder never was under this store)
    assert _listing(uri, run_id) == EXPECTED
    location = MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert location == str(tmp_path / "copy" / "mlruns" / "artifacts" / run_id / "artifacts")


def test_deleted_artifacts_in_place_are_not_rewritten(tmp_path, mlflow_template_db):
    run_id = _store_with_run(tmp_path / "s", mlflow_template_db)
    uri = f"sqlite:///{tmp_path / 's' / 'mlruns' / 'mlflow.db'}"
    before = MlflowClient(uri).get_run(run_id).info.artifact_uri
    shutil.rmtree(tmp_path / "s" / "mlruns" / "artifacts" / run_id)  # files deleted, store not moved
    assert reroot_artifacts(uri) == 0
    assert MlflowClient(uri).get_run(run_id).info.artifact_uri == before


def test_other_stores_are_left_alone(tmp_path):
    assert reroot_artifacts("http://127.0.0.1:5000") == 0
    assert reroot_artifacts(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}") == 0
    assert not (tmp_path / "none").exists()  # no empty database created


def test_ui_reroots_then_runs_mlflow_ui(tmp_path, mlflow_template_db, monkeypatch):
    import os
    import sys

    run_id = _store_with_run(tmp_path / "a", mlflow_template_db)
    shutil.move(tmp_path / "a" / "mlruns", tmp_path / "mlruns")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: calls.append((exe, argv)))
    with pytest.raises(SystemExit) as info:
        main(["ui", "--tracking-uri", uri, "--port", "5001"])
    assert info.value.code == 0
    assert calls == [(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port",
                                       "5001"])]
    assert _listing(uri, run_id) == EXPECTED  # re-rooted before the UI starts
