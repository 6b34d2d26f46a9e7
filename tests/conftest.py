import json
import sys

import pytest
import torch

torch.set_num_threads(1)  # two cores shared with other processes: one thread each is faster


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny random Qwen2- and Llama-architecture checkpoints saved with save_pretrained."""
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {fam: str(save_tiny_checkpoint(root / fam, fam, seed=1)) for fam in ("qwen2", "llama")}


@pytest.fixture
def jsonl_file(tmp_path):
    def write(records, name="train.jsonl"):
        path = tmp_path / name
        with path.open("w") as fh:
            for r in records:
                fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(path)
    return write


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory):
    """An already-migrated empty MLflow SQLite store: creating one costs ~10 s, copying it nothing."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, mlflow_template_db):
    import shutil

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_template_db, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)  # mlflow's module-level URI outlives a test: reset it for each one
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _fits_are_marked_slow(request, monkeypatch):
    """Every test that fits a model is marked ``slow`` (``pytest -m "not slow"`` is the quick subset): a test
    whose ``Trainer.fit`` runs without the mark fails, so the marks cannot drift. Tests that fit in a
    subprocess are marked by hand."""
    import lightning.pytorch as pl

    real_fit = pl.Trainer.fit
    fitted = []

    def fit(self, *args, **kwargs):
        fitted.append(True)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    yield
    if fitted and request.node.get_closest_marker("slow") is None:
        pytest.fail("this test fits a model: mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A tiny random Qwen3 stand-in (Qwen3-style template with ``enable_thinking``) whose vocabulary has the game
    moves, with room for multi-turn episodes (16384 positions)."""
    from lightning_ctx.models.tiny import save_tiny_checkpoint
    from lightning_ctx.tasks.games.env import GAME_WORDS

    root = tmp_path_factory.mktemp("tiny_qwen3")
    return str(save_tiny_checkpoint(root / "qwen3", "qwen3", seed=3, extra_words=GAME_WORDS, max_positions=16384))


@pytest.fixture
def outside_package(tmp_path, monkeypatch):
    """``install(name, source)``: a module importable as ``name`` that lives outside the package (a user's own
    plugin), removed from ``sys.modules`` again after the test."""
    names = []

    def install(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        names.append(name)
        return name

    yield install
    for name in names:
        sys.modules.pop(name, None)
