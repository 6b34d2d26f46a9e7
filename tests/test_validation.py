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
from tests.helpers import make_records

GOOD = json.dumps({"id": "a", "context": "ADD2", "prompt": "1 2 3", "answer": "1 2 3"})


def _fit(student, train, *extra):
    main(["fit", "--model.student", student, "--data.task.train_file", train, "--data.batch_size", "2",
          "--model.max_new_tokens", "4", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", *extra])


def _expect_user_error(capsys, uri, fn, *needles):
    with pytest.raises(SystemExit) as info:
        fn()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("lightning-ctx")]
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
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--data.task.verifier", "choice"),
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
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(str(tmp_path / "nope"), path), "model.student: ",
                       "does not exist", "--model.student /path/to/folder")
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_nonfinite_loss_skip_mode_counts(tiny_dirs, jsonl_file, mlflow_uri, poison_step):
    poison_step(3)
    path = jsonl_file(make_records(8))
    _fit(tiny_dirs["qwen2"], path, "--model.anchor_weight", "0.5", "--trainer.max_steps", "4",
         "--model.on_nonfinite", "skip")
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/skipped_steps"] >= 1


@pytest.fixture
def diverge_at(monkeypatch):
    """Make the student's weights NaN from the given global step on, before it samples (as lr 100 would)."""
    def install(at_step):
        real = OnPolicyDistillation.sample_rollouts

        def diverged(self, batch):
            if self.global_step >= at_step:
                with torch.no_grad():
                    next(self.student.parameters()).fill_(float("nan"))
            return real(self, batch)
        monkeypatch.setattr(OnPolicyDistillation, "sample_rollouts", diverged)
    return install


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_sampling_probabilities_are_a_nonfinite_step(tiny_dirs, jsonl_file, mlflow_uri, capsys, diverge_at,
                                                                mode):
    """(#26.9) NaN next-token probabilities in the rollout used to crash in torch.multinomial with a traceback and
    no checkpoint; they are handled like a non-finite loss: a checkpoint and one line, or a skipped step."""
    diverge_at(2)
    path = jsonl_file(make_records(8))
    args = ("--trainer.max_steps", "4", "--model.on_nonfinite", mode)
    if mode == "raise":
        with pytest.raises(SystemExit) as info:
            _fit(tiny_dirs["qwen2"], path, *args)
        err = capsys.readouterr().err
        assert info.value.code == 3 and "Traceback" not in err
        assert "non-finite loss at step 2: the student's next-token probabilities while sampling" in err
        assert Path("checkpoints/nonfinite-step000002.ckpt").exists()
    else:
        _fit(tiny_dirs["qwen2"], path, *args)
        client = MlflowClient(mlflow_uri)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.data.metrics["train/skipped_steps"] == 2  # steps 2 and 3 both sampled from NaN weights


# ------------------------------------------------------------------ knobs: checked before any model loads


@pytest.fixture
def no_model_loading(monkeypatch):
    """A knob error must stop the run before a model is loaded: loading now fails loudly."""
    import lightning_ctx.models.teachers as module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the knobs were checked")
    monkeypatch.setattr(module, "load_tokenizer", refuse)
    monkeypatch.setattr(module, "load_causal_lm", refuse)


@pytest.mark.parametrize("args, needles", [
    (["--model.anchor_weight", "-1"], ["field 'model.anchor_weight'", "must be >= 0", "-1"]),
    (["--model.retain_weight", "-0.5"], ["field 'model.retain_weight'", ">= 0"]),
    (["--model.jsd_beta", "1.5"], ["field 'model.jsd_beta'", "[0, 1]"]),
    (["--model.scope", "topk", "--model.topk", "0"], ["field 'model.topk'", ">= 1"]),
    (["--model.chunk_size", "0"], ["field 'model.chunk_size'", ">= 1"]),
    (["--model.topk_renormalize", "true"], ["field 'model.topk_renormalize'", "scope is topk", "scope: topk"]),
    (["--model.max_new_tokens", "0"], ["field 'model.max_new_tokens'", ">= 1"]),
    (["--model.temperature", "0"], ["field 'model.temperature'", "> 0", "greedy_rollout"]),
    (["--model.temperature", "-1", "--model.greedy_rollout", "false"], ["field 'model.temperature'"]),
    (["--model.top_p", "0"], ["field 'model.top_p'", "(0, 1]"]),
    (["--model.top_p", "1.01"], ["field 'model.top_p'"]),
    (["--model.top_k", "-3"], ["field 'model.top_k'", ">= 0"]),
    (["--model.lr", "0"], ["field 'model.lr'", "> 0"]),
    (["--model.weight_decay", "-0.1"], ["field 'model.weight_decay'"]),
    (["--model.warmup_steps", "-5"], ["field 'model.warmup_steps'"]),
    (["--model.min_lr_ratio", "2"], ["field 'model.min_lr_ratio'"]),
    (["--model.rollout_engine", "vllm"], ["field 'model.rollout_engine'", "hf_static", "'vllm'"]),
    (["--model.dtype", "float8"], ["field 'model.dtype'", "bfloat16"]),
    (["--model.student", " "], ["field 'model.student'", "non-empty"]),
    (["--data.batch_size", "0"], ["field 'data.batch_size'", ">= 1"]),
    (["--data.eval_batch_size", "-2"], ["field 'data.eval_batch_size'"]),
    (["--data.max_prompt_length", "0"], ["field 'data.max_prompt_length'"]),
    (["--data.max_eval_items", "0"], ["field 'data.max_eval_items'"]),
    (["--data.num_workers", "-1"], ["field 'data.num_workers'"]),
    (["--data.task.verifier", "exactly"], ["field 'data.task.verifier'", "choice", "module:attr"]),
    (["--data.task.verifier", "no_such_module:verify"], ["field 'data.task.verifier'", "module:attr"]),
    (["--data.template", "chatml"], ["field 'data.template'", "plain"]),
    (["--trainer.max_steps", "0"], ["field 'trainer.max_steps'", "-1"]),
    (["--trainer.accumulate_grad_batches", "0"], ["field 'trainer.accumulate_grad_batches'"]),
    (["--trainer.gradient_clip_val", "-1"], ["field 'trainer.gradient_clip_val'"]),
    (["--checkpoint.every_n_train_steps", "-1"], ["field 'checkpoint.every_n_train_steps'"]),
])
def test_knob_out_of_range_from_command_line(tiny_dirs, jsonl_file, mlflow_uri, capsys, no_model_loading,
                                             args, needles):
    path = jsonl_file([GOOD])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, *args), "command line", *needles)


def test_knob_out_of_range_in_config_file_names_file_and_line(tiny_dirs, jsonl_file, mlflow_uri, capsys,
                                                            no_model_loading, tmp_path):
    path = jsonl_file([GOOD])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  anchor_weight: 0.5\n  max_new_tokens: 4\n  lr: -1.0e-4\n")
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--config", str(cfg)),
                       f"{cfg}, line 4, field 'model.lr'", "must be > 0")
    # nested: a task's init_args and a callback's init_args in the shipped world config style
    world = tmp_path / "world.yaml"
    world.write_text("data:\n  task:\n    class_path: lightning_ctx.tasks.world.WorldTask\n    init_args:\n"
                     "      target_context: SHOW\n      n_train: 0\n  batch_size: 64\n")
    _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", str(world)]),
                       f"{world}, line 6, field 'data.task.n_train'", ">= 1")
    _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", str(world), "--data.task.n_train", "-2"]),
                       "command line", "field 'data.task.n_train'", ">= 1")
    cb = tmp_path / "cb.yaml"
    cb.write_text("trainer:\n  max_steps: 2\n  callbacks:\n"
                  "    - class_path: lightning_ctx.eval.ContextRemovabilityCallback\n"
                  "      init_args:\n        every_n_steps: 10\n        num_samples: 2\n        temperature: 0.0\n")
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--config", str(cb)),
                       f"{cb}, line 8, field 'trainer.callbacks.temperature'", "> 0")


def test_a_config_of_the_old_data_shape_is_told_the_new_one(tmp_path, mlflow_uri, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  class_path: lightning_ctx.tasks.world.WorldDataModule\n  init_args:\n"
                   "    target_context: SHOW\n")
    line = _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", str(old)]), str(old))
    assert "the task now goes under data.task" in line and "WorldTask" in line
    line = _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", "builtin:world.yaml",
                                                                "--data.init_args.target_context", "ADD2",
                                                                "--data.init_args.batch_size", "8"]))
    assert "the task now goes under data.task" in line
    assert "write data.task.target_context, data.batch_size;" in line  # each old flag's new name


def test_knob_checks_accept_what_is_valid():
    from lightning_ctx.eval import ContextRemovabilityCallback
    from lightning_ctx.knobs import ConfigError, check_class_args

    check_class_args(OnPolicyDistillation, {"temperature": 0.0, "greedy_rollout": True}, "model.")
    check_class_args(OnPolicyDistillation, {"scope": "full", "top_p": 1.0, "chunk_size": None}, "model.")
    check_class_args(ContextRemovabilityCallback, {"num_samples": 0, "temperature": 0.0}, "cb.")
    with pytest.raises(ConfigError, match="model.greedy_rollout"):
        check_class_args(OnPolicyDistillation, {"temperature": 0.0}, "model.")
    with pytest.raises(ConfigError, match="model.lr"):  # NaN compares false to everything: refused explicitly
        check_class_args(OnPolicyDistillation, {"lr": float("nan")}, "model.")
    with pytest.raises(ConfigError, match="anchor_weight"):  # a bool is not a number here
        check_class_args(OnPolicyDistillation, {"anchor_weight": True}, "model.")
    with pytest.raises(ConfigError, match="anchor_weight"):  # Python users get the same check
        OnPolicyDistillation(student="builtin:world", anchor_weight=-1)
    # choices come from the Literal types (declared once): Optional[Literal] too, None passing
    with pytest.raises(ConfigError, match="model.divergence.*must be one of reverse_kl, forward_kl, jsd, sampled"):
        check_class_args(OnPolicyDistillation, {"divergence": "kl"}, "model.")
    with pytest.raises(ConfigError, match="model.teacher_quantization.*must be one of 4bit, 8bit, got '2bit'"):
        check_class_args(OnPolicyDistillation, {"teacher_quantization": "2bit"}, "model.")
    check_class_args(OnPolicyDistillation, {"teacher_quantization": None, "scope": "topk"}, "model.")
    # a subclass passing **kwargs on keeps its base's checks, with the base's defaults for conditional ones
    with pytest.raises(ConfigError, match="trainer.callbacks.every_n_steps"):
        ContextRemovabilityCallback(every_n_steps=-1)


def test_retain_weight_without_retain_contexts_is_a_config_error(tiny_dirs, jsonl_file, mlflow_uri, capsys):
    path = jsonl_file([GOOD])
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path, "--model.retain_weight", "0.5"),
                       "field 'model.retain_weight'", "no other contexts to retain")


# ------------------------------------------------------------------------------- files a user hands us


def test_bad_files(tiny_dirs, jsonl_file, mlflow_uri, capsys, tmp_path):
    folder = tmp_path / "a_folder.jsonl"
    folder.mkdir()
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], str(folder)),
                       "field 'data.task.train_file'", "is a folder")
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], str(tmp_path / "missing.jsonl")),
                       "field 'data.task.train_file'", "does not exist")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes((GOOD + "\n").encode() + '{"id": "b", "context": "caf\xe9", "prompt": "1", "answer": "1"}\n'
                       .encode("latin-1"))
    _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], str(latin1)),
                       str(latin1), "line 2", "not valid UTF-8", "0xe9", "column 28")
    for lines, needles in [([GOOD, "[1, 2]"], ["line 2", "expected a JSON object"]),
                           ([GOOD, '"just a string"'], ["line 2", "expected a JSON object"]),
                           ([GOOD, json.dumps({"id": " ", "context": "c", "prompt": "1", "answer": "1"})],
                            ["line 2", "field 'id'", "must not be empty"]),
                           ([GOOD, json.dumps({"id": "b", "context": "c", "prompt": "1", "answer": ""})],
                            ["line 2", "field 'answer'", "must not be empty"]),
                           ([GOOD, json.dumps({"id": "b", "context": None, "prompt": "1", "answer": "1"})],
                            ["line 2", "field 'context'", "string"])]:
        path = jsonl_file(lines, name=f"bad{len(needles)}{abs(hash(lines[1])) % 1000}.jsonl")
        _expect_user_error(capsys, mlflow_uri, lambda: _fit(tiny_dirs["qwen2"], path), path, *needles)


def test_jsonl_reader_takes_bom_crlf_and_line_separators_inside_strings(tmp_path):
    from lightning_ctx.data.records import load_jsonl

    path = tmp_path / "windows.jsonl"
    second = json.dumps({"id": "b", "context": "x\u2028y", "prompt": "1", "answer": "1"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\r\n" + second + "\r\n").encode("utf-8"))
    records = load_jsonl(path)
    assert [r.id for r in records] == ["a", "b"] and records[1].context == "x\u2028y"


def test_mcqa_system_prompt_file_must_be_utf8_text(tmp_path):
    from lightning_ctx.errors import DataError
    from lightning_ctx.tasks.mcqa.convert import read_system_prompt

    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"You are a doctor.\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"prompt.txt, line 2, field 'system_prompt_file': not valid UTF-8"):
        read_system_prompt(system_prompt_file=bad)
    with pytest.raises(DataError, match="is a folder"):
        read_system_prompt(system_prompt_file=tmp_path)


def test_bad_config_files(tmp_path, mlflow_uri, capsys):
    missing = tmp_path / "nope.yaml"
    _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", str(missing)]),
                       str(missing), "config file does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  lr: [1e-4\n")
    _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", str(broken)]),
                       str(broken), "not valid YAML")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# caf\xe9\nmodel:\n  lr: 1.0e-4\n".encode("latin-1"))
    _expect_user_error(capsys, mlflow_uri, lambda: main(["fit", "--config", str(latin1)]),
                       str(latin1), "line 1", "not valid UTF-8")
