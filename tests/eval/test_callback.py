"""ContextRemovabilityCallback: references kept in its checkpoint state, the step-0 evaluation logged at
step 0, and an in-process CLI fit whose MLflow run is read back."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml
from lightning.pytorch.loggers import Logger

from lightning_ctx.eval import ContextRemovabilityCallback
from tests.helpers import MAX_NEW, make_dm, make_records, scripted_decode, scripted_task


@pytest.fixture(scope="module")
def module(tiny_dirs):
    from lightning_ctx.module import OnPolicyDistillation

    return OnPolicyDistillation(student=tiny_dirs["qwen2"], max_new_tokens=MAX_NEW)


class Scripted(ContextRemovabilityCallback):
    """The callback with its evaluators' decoding replaced by a script (see test_evaluator)."""

    def __init__(self, script, **kwargs):
        super().__init__(progress=False, **kwargs)
        self.script = script
        self.calls = []

    def make_evaluator(self, pl_module, dm, trainer=None):
        ev = super().make_evaluator(pl_module, dm, trainer)
        ev.decode = scripted_decode(ev, self.script, pl_module.teacher, self.calls)
        return ev


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_references_are_kept_and_restored_from_the_state(module, jsonl_file):
    records, retention, script, _, _ = scripted_task()
    dm = make_dm(module, jsonl_file, records)
    cb = Scripted(script, batch_size=4, retention_file=jsonl_file(retention, "other.jsonl"))
    refs = cb.compute_references(module, dm, "val", initial_model=module.teacher)
    assert refs["teacher_acc_ctx"] == pytest.approx(1.0)
    assert refs["initial_acc_no_ctx"] == pytest.approx(0.5)
    assert refs["initial_other_ctx_acc"] == pytest.approx(0.75)
    assert cb.references["val"] == refs and cb.reference_items["val"]["retention"] == {0: True, 1: True, 2: True,
                                                                                      3: False}
    assert all(s.greedy and s.max_new_tokens == MAX_NEW for _, s in cb.calls)
    restored = ContextRemovabilityCallback()
    restored.load_state_dict(torch.load(_roundtrip(cb.state_dict()), weights_only=False))
    assert restored.references == cb.references and restored.reference_items == cb.reference_items


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def steps_of(self, key):
        return [step for step, metrics in self.calls if key in metrics]


def _fit(tiny_dirs, jsonl_file, callback, max_steps):
    import lightning.pytorch as pl

    from lightning_ctx.data.datamodule import TaskDataModule
    from lightning_ctx.data.task import JSONLTask
    from lightning_ctx.module import OnPolicyDistillation

    model = OnPolicyDistillation(student=tiny_dirs["qwen2"], max_new_tokens=3)
    dm = TaskDataModule(JSONLTask(train_file=jsonl_file(make_records(4, "ADD2", seed=1), "train.jsonl"),
                                  val_file=jsonl_file(make_records(3, "ADD2", seed=2, prefix="v"), "val.jsonl")),
                        batch_size=2)
    dm.connect(model.tokenizer)
    logger = RecordingLogger()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    return logger


@pytest.mark.slow
def test_step_zero_evaluation_is_logged_at_step_zero_by_default(tiny_dirs, jsonl_file):
    cb = ContextRemovabilityCallback(every_n_steps=2, log_artifacts=False, progress=False)
    assert cb.eval_at_start  # the default: curves start at the initial model
    logger = _fit(tiny_dirs, jsonl_file, cb, max_steps=2)
    assert logger.steps_of("eval/acc_ctx") == [0, 2]
    assert logger.steps_of("eval/harm") == [0, 2] and logger.steps_of("ref/teacher_acc_ctx") == [0]
    assert [h["step"] for h in cb.history] == [0, 2]

    cb = ContextRemovabilityCallback(every_n_steps=0, eval_at_start=False, log_artifacts=False, progress=False)
    logger = _fit(tiny_dirs, jsonl_file, cb, max_steps=1)
    assert logger.steps_of("eval/acc_ctx") == [1]  # only the end of fit
    assert logger.steps_of("ref/teacher_acc_ctx") == [0]


EVAL_KEYS = ["acc_no_ctx", "acc_ctx", "harm", "help", "both_correct", "len_no_ctx", "len_ctx", "len_inflation",
             "trunc_no_ctx", "trunc_ctx", "ctx_kl", "hidden_cos/layer_1", "hidden_cos/layer_2", "hidden_cos/mean",
             "retention", "other_ctx_acc"]


@pytest.mark.slow
def test_fit_logs_metrics_and_artifacts_to_mlflow(tiny_dirs, jsonl_file, mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    from lightning_ctx.cli import main

    train = jsonl_file(make_records(4, "ADD2", seed=1), "train.jsonl")
    val = jsonl_file(make_records(3, "ADD2", seed=2, prefix="v"), "val.jsonl")
    other = jsonl_file([dict(r, context="REV") for r in make_records(2, "REV", seed=3, prefix="o")], "other.jsonl")
    cfg = tmp_path / "cb.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning_ctx.eval.ContextRemovabilityCallback",
        "init_args": {"every_n_steps": 2, "retention_file": other, "progress": False}}]}}))
    main(["fit", "--config", str(cfg), "--model.student", tiny_dirs["qwen2"], "--model.max_new_tokens", "4",
          "--data.task.train_file", train, "--data.task.val_file", val, "--data.batch_size", "2",
          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"])

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    missing = [f"eval/{k}" for k in EVAL_KEYS if f"eval/{k}" not in metrics]
    assert not missing, missing
    assert "ref/teacher_acc_ctx" in metrics and "ref/initial_acc_no_ctx" in metrics
    # step 0 (eval_at_start, the default), every 2 steps, plus the end of fit (step 3)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/acc_ctx")] == [0, 2, 3]
    for key in ("acc_no_ctx", "acc_ctx", "both_correct", "trunc_no_ctx", "trunc_ctx", "other_ctx_acc"):
        assert 0.0 <= metrics[f"eval/{key}"] <= 1.0, key
    assert 1 <= metrics["eval/len_no_ctx"] <= 4 and 1 <= metrics["eval/len_ctx"] <= 4  # max_new_tokens = 4
    assert metrics["eval/ctx_kl"] > 0 and -1 <= metrics["eval/hidden_cos/mean"] < 1

    listed = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/step_000000", "eval/step_000002", "eval/step_000003", "eval/curves.png",
            "eval/hidden_cos.png"} <= listed
    step_files = {f.path for f in client.list_artifacts(run.info.run_id, "eval/step_000003")}
    assert step_files == {"eval/step_000003/examples.json", "eval/step_000003/examples.html"}
    local = client.download_artifacts(run.info.run_id, "eval/step_000003/examples.json", str(tmp_path / "dl"))
    payload = json.loads(open(local).read())
    assert [e["id"] for e in payload["examples"]] == ["v0", "v1", "v2"]
    assert {"response_no_ctx", "response_ctx", "correct_no_ctx", "correct_ctx", "len_no_ctx", "len_ctx"} <= \
        set(payload["examples"][0])
    assert len(payload["retention_examples"]) == 2
    # the table agrees with the logged accuracy
    acc = sum(e["correct_ctx"] for e in payload["examples"]) / 3
    assert metrics["eval/acc_ctx"] == pytest.approx(acc)


def test_sampled_evaluation_settings_reach_the_evaluator(module, jsonl_file):
    """OPCD's protocol as callback knobs: n samples per item at temperature 1.0, top-p 0.95, top-k 20."""
    dm = make_dm(module, jsonl_file, make_records(2, "ADD2"))
    cb = ContextRemovabilityCallback(num_samples=3, temperature=1.0, top_p=0.95, top_k=20, progress=False)
    ev = cb.make_evaluator(module, dm)
    s = ev.settings
    assert (s.num_samples, s.temperature, s.top_p, s.top_k) == (3, 1.0, 0.95, 20)
    sampling = s.sampling(greedy=False)
    assert (sampling.greedy, sampling.temperature, sampling.top_p, sampling.top_k) == (False, 1.0, 0.95, 20)
    from lightning_ctx.errors import ConfigError

    with pytest.raises(ConfigError, match="top_k"):
        ContextRemovabilityCallback(top_k=-1)
