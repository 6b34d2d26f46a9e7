"""``lightning-ctx export`` and the end-of-fit export: a save_pretrained folder that computes what the student computes.

Every check compares the reloaded folder with an independent computation: the module's own student (logits), peft's
``merge_and_unload`` on a copy (merged weights), Lightning's ``load_from_checkpoint`` (export from a checkpoint), and
the first run's final evaluation (a second fit that starts from the folder).
"""

import copy
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main
from lightning_ctx.errors import ModelError
from lightning_ctx.export import EXPORT_INFO, MODEL_ARTIFACT, merged_lora_state_dict, save_student
from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.module import OnPolicyDistillation
from tests.helpers import make_records, perturb

IDS = torch.tensor([[5, 9, 12, 3, 7, 21, 4], [8, 2, 2, 17, 30, 6, 11]])
MESSAGES = [{"role": "system", "content": "ADD2"}, {"role": "user", "content": "1 2 3"}]


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits.double()


def _reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(str(folder))


def _train_adapter(student, seed):
    """What a LoRA fit changes: the adapter only (B = 0 at the start; here random, so the adapter matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _chat(tokenizer):
    return tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_full_student_reloads_with_same_logits_and_chat_template(tiny_dirs, tmp_path):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"])
    perturb(module.student, seed=3)  # a trained student differs from the folder it started from
    out = save_student(module.student, module.tokenizer, tmp_path / "out", info={"step": 7})
    model, tokenizer = _reload(out)
    assert torch.equal(_logits(model), _logits(module.student))  # the same weights, bit for bit
    assert _chat(tokenizer) == _chat(module.tokenizer)
    assert tokenizer.get_vocab() == module.tokenizer.get_vocab()
    assert json.loads((out / EXPORT_INFO).read_text()) == {"format": "full", "step": 7}
    with pytest.raises(ModelError, match="needs a LoRA student"):
        save_student(module.student, module.tokenizer, tmp_path / "adapter", adapter_only=True)
    save_student(module.student, module.tokenizer, out)  # an earlier export may be replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ModelError, match="is not an earlier export"):  # any other folder is left alone
        save_student(module.student, module.tokenizer, tmp_path / "notes")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_lora_student_is_merged_out_of_place(tiny_dirs, tmp_path):
    module = OnPolicyDistillation(student=tiny_dirs["llama"], lora={"r": 4, "alpha": 8})
    _train_adapter(module.student, seed=5)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    reference = copy.deepcopy(module.student).merge_and_unload().state_dict()  # peft's own merge
    merged = merged_lora_state_dict(module.student)
    assert merged.keys() == reference.keys()
    for key in reference:
        assert torch.equal(merged[key], reference[key]), key
    out = save_student(module.student, module.tokenizer, tmp_path / "merged")
    model, _ = _reload(out)
    expected = _logits(module.student)
    # merged (W + BA) x vs the adapter's W x + B (A x): equal up to float32 rounding
    assert torch.allclose(_logits(model), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(_reload(tiny_dirs["llama"])[0]), expected, atol=1e-2)  # the adapter mattered
    after = module.student.state_dict()  # the training model keeps its adapter and its exact weights
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert json.loads((out / EXPORT_INFO).read_text())["format"] == "merged"


def test_lora_adapter_only_loads_with_peft(tiny_dirs, tmp_path):
    from peft import PeftModel

    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], lora={"r": 4})
    _train_adapter(module.student, seed=2)
    out = save_student(module.student, module.tokenizer, tmp_path / "adapter", adapter_only=True)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    base, _ = _reload(tiny_dirs["qwen2"])
    assert torch.equal(_logits(PeftModel.from_pretrained(base, out)), _logits(module.student))


def _fit_args(student, train, root, *extra):
    return ["fit", "--model.student", student, "--data.task.train_file", train, "--data.batch_size", "4",
            "--model.max_new_tokens", "5", "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--checkpoint.every_n_train_steps", "3", *extra]


@pytest.mark.slow
def test_export_from_checkpoint_and_run_id(tiny_dirs, jsonl_file, mlflow_uri, tmp_path, capsys):
    train = jsonl_file(make_records(12))
    main(_fit_args(tiny_dirs["qwen2"], train, tmp_path / "root"))
    run = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name(
        "lightning-ctx").experiment_id])[0]
    last = tmp_path / "root" / "checkpoints" / "last.ckpt"
    assert run.data.tags["checkpoint.last"] == str(last.resolve())  # the run knows its checkpoint
    # checkpointing on: no second copy of the model in MLflow unless asked
    assert MODEL_ARTIFACT not in {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)}

    with pytest.raises(SystemExit) as info:
        main(["export", "--ckpt", str(last), "--out", str(tmp_path / "from_ckpt")])
    assert info.value.code == 0
    reference = OnPolicyDistillation.load_from_checkpoint(last, weights_only=True)  # Lightning's own restore
    model, _ = _reload(tmp_path / "from_ckpt")
    assert torch.equal(_logits(model), _logits(reference.student))
    exported = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id, MODEL_ARTIFACT)}
    assert f"{MODEL_ARTIFACT}/model.safetensors" in exported  # logged to the checkpoint's run

    with pytest.raises(SystemExit) as info:
        main(["export", "--run-id", run.info.run_id, "--out", str(tmp_path / "from_run")])
    assert info.value.code == 0
    assert torch.equal(_logits(_reload(tmp_path / "from_run")[0]), _logits(reference.student))

    last.unlink()  # --adapter-only cannot use the logged (merged) model, and the checkpoint is gone: one clear error
    with pytest.raises(SystemExit) as info:
        main(["export", "--run-id", run.info.run_id, "--adapter-only"])
    assert info.value.code == 2 and "no longer exists" in capsys.readouterr().err


EVAL_KEYS = ("acc_no_ctx", "acc_ctx", "harm", "help", "both_correct", "len_no_ctx", "len_ctx", "len_inflation",
             "trunc_no_ctx", "trunc_ctx", "ctx_kl", "hidden_cos/mean", "other_ctx_acc")


def _world_fit(root, *extra):
    main(["fit", "--config", "experiments/world_opd.yaml", "--trainer.max_steps", "4", "--trainer.default_root_dir",
          str(root), "--data.batch_size", "8", "--data.task.n_val", "20",
          "--data.task.eval_other_contexts", "2", "--data.task.eval_other_items", "5",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])


@pytest.mark.slow
def test_exported_world_student_starts_a_second_fit_where_the_first_ended(mlflow_uri, tmp_path, monkeypatch):
    """The issue's "Done when": fit (world config, checkpointing off), export that run, fit from the folder: the second
    run's step-0 evaluation is the first run's final one. ``retention`` is not compared: it divides by the initial
    model's accuracy, which is the exported student itself in the second run."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)  # the config paths of the README
    client = MlflowClient(mlflow_uri)
    _world_fit(tmp_path / "first")
    exp = client.get_experiment_by_name("world").experiment_id
    first = client.search_runs([exp])[0]
    assert MODEL_ARTIFACT in {a.path for a in client.list_artifacts(first.info.run_id)}  # exported at fit end

    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as info:
        main(["export", "--run-id", first.info.run_id, "--out", str(out)])
    assert info.value.code == 0
    _world_fit(tmp_path / "second", "--model.student", str(out), "--trainer.max_steps", "1")
    second = next(r for r in client.search_runs([exp]) if r.info.run_id != first.info.run_id)
    for key in EVAL_KEYS:
        start = [m for m in client.get_metric_history(second.info.run_id, f"eval/{key}") if m.step == 0]
        assert len(start) == 1, key
        assert start[0].value == pytest.approx(first.data.metrics[f"eval/{key}"], abs=1e-6, nan_ok=True), key
    assert second.data.params["cfg/model.student"] == str(out)
