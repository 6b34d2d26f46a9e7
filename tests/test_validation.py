"""Bad input stops the run before training: exit 2, one line naming file/line/field, nothing tracked."""

import json
import logging
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main
from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.module import OnPolicyDistillation
from tests.conftest import make_records

GOOD = json.dumps({"id": "a", "context": "ADD2", "prompt": "1 2 3", "answer": "1 2 3"})


def _fit(student, train, *extra):
    main(["fit", "--model.student", student, "--data.train_file", train, "--data.batch_size", "2",
          "--model.max_new_tokens", "4", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", *extra])


def _expect_user_error(capsys, uri, fn, *needles):
    with pytest.raises(SystemExit) as info:
        fn()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("lightning-ctx")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()]), "a run was created"
    assert not Path("checkpoints").exists()
    return lines[0]


@pytest.mark.parametrize("lines, where", [
    ([GOOD, '{"id": "b", "context": "x", "prompt": "1 2'], ["line 2", "invalid JSON"]),
    ([GOOD, '{"id": "b", "context": "x", "answer": "1"}'], ["line 2", "field 'prompt'", "missing"]),
    ([GOOD, '{"id": "b", "context": ["x"], "prompt": "1", "answer": "1"}'], ["line 2", "field 'context'", "string"]),
    ([GOOD, GOOD], ["line 2", "field 'id'", "duplicate id 'a'"]),
    ([], ["empty"]),
])
def test_bad_jsonl(tiny_dirs, jsonl_file, mlflow_uri, capsys, lines, where):
    path = jsonl_file(lines)
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path), path, *where)


def test_record_too_long(tiny_dirs, jsonl_file, mlflow_uri, capsys):
    long_ctx = " ".join(["ADD1"] * 40)
    path = jsonl_file([GOOD, json.dumps({"id": "b", "context": long_ctx, "prompt": "1", "answer": "1"})])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--data.max_prompt_length", "30"),
                       path, "line 2", "field 'context'", "max_prompt_length=30")


def test_prompt_plus_new_tokens_exceeds_model_positions(tiny_dirs, jsonl_file, mlflow_uri, capsys):
    path = jsonl_file([GOOD])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--model.max_new_tokens", "300"),
                       "max_position_embeddings=256", "max_new_tokens=300")


def test_unparseable_answer(tiny_dirs, jsonl_file, mlflow_uri, capsys):
    path = jsonl_file([json.dumps({"id": "q", "context": "c", "prompt": "Pick A or B", "answer": "maybe"})])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--data.verifier", "choice"),
                       path, "line 1", "field 'answer'", "'choice' verifier cannot parse")


def test_unknown_config_key_and_wrong_type(tiny_dirs, jsonl_file, mlflow_uri, capsys, tmp_path):
    path = jsonl_file([GOOD])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  anchor_weight: 0.5\n  anchor_wieght: 0.5\n")
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--config", str(cfg)),
                       f"{cfg}, line 3, field 'model.anchor_wieght'")
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--model.anchor_weight", "lots"),
                       "model.anchor_weight", "float")


def test_missing_model_and_chat_template_and_vocab(tmp_path, tiny_dirs, jsonl_file, mlflow_uri, capsys):
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    path = jsonl_file([GOOD])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(str(tmp_path / "nope"), path), "model path does not exist")
    other = save_tiny_checkpoint(tmp_path / "other", "qwen2", extra_words=["zebra"])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--model.teacher", str(other)),
                       "teacher tokenizer differs")
    plain = save_tiny_checkpoint(tmp_path / "plain", "qwen2")
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(str(plain), path, "--data.template", "chat"),
                       "chat_template")


def test_missing_pad_token_defaults_to_eos(tmp_path, caplog):
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "nopad", "llama", pad=False)
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(str(path))
    assert tok.pad_token_id == tok.eos_token_id and "no pad token" in caplog.text


def test_unreachable_tracking_server_fails_fast(tiny_dirs, jsonl_file, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    path = jsonl_file([GOOD])
    start = time.time()
    with pytest.raises(SystemExit) as info:
        _fit(tiny_dirs["qwen2"], path)
    assert info.value.code == 2 and time.time() - start < 10 + 15  # 10 s budget after a ~15 s model/CLI start
    assert f"127.0.0.1:{port} does not answer" in capsys.readouterr().err


@pytest.fixture
def poison_step(monkeypatch):
    """Make the anchor term NaN from the given global step on."""
    def install(at_step):
        real = OnPolicyDistillation.compute_losses

        def poisoned(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            if self.global_step >= at_step:
                out["anchor"] = out["anchor"] * float("nan")
                out["loss"] = out["opd"] + out["anchor"]
            return out
        monkeypatch.setattr(OnPolicyDistillation, "compute_losses", poisoned)
    return install


def test_nonfinite_loss_stops_with_checkpoint(tiny_dirs, jsonl_file, mlflow_uri, capsys, poison_step):
    poison_step(2)
    path = jsonl_file(make_records(8))
    with pytest.raises(SystemExit) as info:
        _fit(tiny_dirs["qwen2"], path, "--model.anchor_weight", "0.5", "--trainer.max_steps", "5")
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 2: term 'anchor'" in err
    saved = Path("checkpoints/nonfinite-step000002.ckpt")
    assert saved.exists() and f"saved to {saved.resolve()}" in err
    ckpt = torch.load(saved, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"


def test_nonfinite_loss_skip_mode_counts(tiny_dirs, jsonl_file, mlflow_uri, poison_step):
    poison_step(3)
    path = jsonl_file(make_records(8))
    _fit(tiny_dirs["qwen2"], path, "--model.anchor_weight", "0.5", "--trainer.max_steps", "4",
         "--model.on_nonfinite", "skip")
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/skipped_steps"] >= 1
