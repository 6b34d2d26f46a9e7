"""ContextRemovabilityCallback: hand-counted metrics on scripted responses, hidden-state/KL identities,
mode handling, and an in-process CLI fit whose MLflow run is read back."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import make_records
from lightning_ctx.callbacks import ContextRemovabilityCallback, write_examples_html
from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import TaskRecord
from lightning_ctx.rollout import Rollout, response_mask_from_ids

MAX_NEW = 6


@pytest.fixture(scope="module")
def module(tiny_dirs):
    from lightning_ctx.module import OnPolicyDistillation

    return OnPolicyDistillation(student=tiny_dirs["qwen2"], max_new_tokens=MAX_NEW)


def make_dm(module, jsonl_file, records, name="val.jsonl"):
    dm = ContextPairDataModule(val_file=jsonl_file(records, name), verifier="exact")
    dm.connect(module.tokenizer)
    dm.validate()
    return dm


class Scripted(ContextRemovabilityCallback):
    """Decoding replaced by a table: (model role, prompt digits, with context?) -> (response text, EOS?)."""

    def __init__(self, script, **kwargs):
        super().__init__(progress=False, **kwargs)
        self.script = script
        self.calls = []

    def decode(self, model, prompt_ids, prompt_mask, settings, pl_module):
        assert not pl_module.student.training and not model.training  # decoding in eval mode
        role = "teacher" if model is pl_module.teacher else "student"
        tok = pl_module.tokenizer
        eos, pad = pl_module.eos_token_ids[0], pl_module.pad_token_id
        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            text = tok.decode([t for t, m in zip(ids, mask) if m])
            digits = re.search(r"user (\d \d \d)", text).group(1)
            context = re.search(r"system (.*?)<\|im_end\|>", text)
            response, finished = self.script[(role, digits, context.group(1).strip() if context else None)]
            row = tok(response, add_special_tokens=False).input_ids + ([eos] if finished else [])
            rows.append(row[: settings.max_new_tokens])
        self.calls.append((role, settings))
        width = max(len(r) for r in rows)
        resp = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask, lengths, finished = response_mask_from_ids(resp, [eos])
        return Rollout(prompt_ids, prompt_mask, resp.masked_fill(~mask, pad), mask, lengths, finished)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _answer(digits):
    return " ".join(str((int(d) + 2) % 10) for d in digits.split())


# Six items with context ADD2: (no-ctx right?, ctx right?, no-ctx truncated?, ctx truncated?)
PLAN = [(True, True, False, False), (True, True, False, False), (True, False, False, False),
        (True, False, False, True), (False, True, False, False), (False, False, True, False)]
WRONG = "0 0 0 0 0"  # 5 tokens (+ EOS = 6)
TRUNC = "9 9 9 9 9 9"  # 6 tokens = max_new_tokens, no EOS


def _resp(right, truncated, answer):
    if truncated:
        return TRUNC, False, MAX_NEW
    return (answer, True, 4) if right else (WRONG, True, 6)


def test_metrics_match_hand_counts_on_scripted_responses(module, jsonl_file):
    records = [dict(r, answer=_answer(r["prompt"])) for r in make_records(6, "ADD2", seed=3)]
    assert len({r["prompt"] for r in records}) == 6
    retention = [dict(r, context="REV", answer=" ".join(reversed(r["prompt"].split())))
                 for r in make_records(4, "REV", seed=4, prefix="o")]
    script, len0, len1 = {}, [], []
    for rec, (ok0, ok1, tr0, tr1) in zip(records, PLAN):
        text0, eos0, n0 = _resp(ok0, tr0, rec["answer"])
        text1, eos1, n1 = _resp(ok1, tr1, rec["answer"])
        script[("student", rec["prompt"], None)] = (text0, eos0)
        script[("student", rec["prompt"], "ADD2")] = (text1, eos1)
        len0.append(n0)
        len1.append(n1)
    # references: the teacher (= initial student) is right with context on all 6, without on items 0-2
    for i, rec in enumerate(records):
        script[("teacher", rec["prompt"], "ADD2")] = (rec["answer"], True)
        script[("teacher", rec["prompt"], None)] = (rec["answer"] if i < 3 else WRONG, True)
    # retention items: the student is right on 0 and 3, the initial model on 0, 1, 2
    for i, rec in enumerate(retention):
        script[("student", rec["prompt"], "REV")] = (rec["answer"] if i in (0, 3) else WRONG, True)
        script[("teacher", rec["prompt"], "REV")] = (rec["answer"] if i in (0, 1, 2) else WRONG, True)

    dm = make_dm(module, jsonl_file, records)
    ret = [TaskRecord.from_dict(r) for r in retention]
    cb = Scripted(script, batch_size=4)  # 6 items -> batches of 4 and 2
    module.student.train()
    refs = cb.compute_references(module, dm.records("val"), dm.renderer, dm.verifier, ret,
                                 initial_model=module.teacher, batch_size=4)
    assert refs["teacher_acc_ctx"] == pytest.approx(1.0)
    assert refs["initial_acc_no_ctx"] == pytest.approx(0.5)
    assert refs["initial_other_ctx_acc"] == pytest.approx(0.75)
    res = cb.evaluate(module, dm.records("val"), dm.renderer, dm.verifier, ret, batch_size=4)
    m = res.metrics
    assert module.student.training and not module.teacher.training  # modes restored
    assert all(s.greedy and s.max_new_tokens == MAX_NEW for _, s in cb.calls)

    assert m["acc_no_ctx"] == pytest.approx(4 / 6)
    assert m["acc_ctx"] == pytest.approx(3 / 6)
    assert m["harm"] == pytest.approx(2 / 4)  # items 2, 3
    assert m["help"] == pytest.approx(1 / 2)  # item 4 of the wrong items 4, 5
    assert m["both_correct"] == pytest.approx(2 / 6)
    assert m["len_no_ctx"] == pytest.approx(sum(len0) / 6)
    assert m["len_ctx"] == pytest.approx(sum(len1) / 6)
    assert m["len_inflation"] == pytest.approx(sum(len1) / sum(len0) - 1)
    assert m["trunc_no_ctx"] == pytest.approx(1 / 6) and m["trunc_ctx"] == pytest.approx(1 / 6)
    assert m["retention"] == pytest.approx(2 / 3)  # 2 right of the initial model's 3
    assert m["other_ctx_acc"] == pytest.approx(2 / 4)
    assert set(k for k in m if k.startswith("hidden_cos/")) == {"hidden_cos/layer_1", "hidden_cos/layer_2",
                                                                "hidden_cos/mean"}

    # ctx_kl by hand: each item alone (no padding), KL(no-ctx || ctx) per response token incl. EOS
    tok, eos = module.tokenizer, module.eos_token_ids[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for rec, (ok0, _, tr0, _) in zip(records, PLAN):
            text, finished, _ = _resp(ok0, tr0, rec["answer"])
            resp = tok(text, add_special_tokens=False).input_ids + ([eos] if finished else [])
            lps = []
            for ctx in (None, "ADD2"):
                p = dm.renderer.ids(rec["prompt"], ctx)
                logits = module.student.eval()(torch.tensor([p + resp])).logits[0, len(p) - 1:len(p) - 1 + len(resp)]
                lps.append(torch.log_softmax(logits.double(), -1))
            total += float((lps[0].exp() * (lps[0] - lps[1])).sum())
            count += len(resp)
    module.student.train()
    assert m["ctx_kl"] == pytest.approx(total / count, rel=1e-4)
    assert m["ctx_kl"] > 0

    rows = {r["id"]: r for r in res.examples}
    r2 = rows[records[2]["id"]]
    assert (r2["correct_no_ctx"], r2["correct_ctx"], r2["response_ctx"]) == (True, False, WRONG)
    assert r2["initial_correct_no_ctx"] is True and r2["teacher_correct_ctx"] is True
    assert rows[records[3]["id"]]["truncated_ctx"] is True and rows[records[3]["id"]]["len_ctx"] == MAX_NEW
    assert [r["reference_correct"] for r in res.retention_examples] == [True, True, True, False]
    restored = ContextRemovabilityCallback()
    restored.load_state_dict(torch.load(_roundtrip(cb.state_dict()), weights_only=False))
    assert restored.references == cb.references and restored.reference_items == cb.reference_items

    # sampled decoding: same script -> same numbers under eval/sampled/*, sampling settings passed through
    cb2 = Scripted(script, batch_size=4, num_samples=2, temperature=0.7, retention=False)
    m2 = cb2.evaluate(module, dm.records("val"), dm.renderer, dm.verifier, batch_size=4).metrics
    assert m2["sampled/harm"] == pytest.approx(2 / 4) and m2["sampled/acc_ctx"] == pytest.approx(0.5)
    assert any(not s.greedy and s.temperature == 0.7 for _, s in cb2.calls)
    assert "retention" not in m2


def test_hidden_cos_is_one_and_ctx_kl_zero_without_context(module, jsonl_file):
    empty = make_records(3, context="", seed=5)
    cb = ContextRemovabilityCallback(progress=False, hidden_layers=[0, 1, -1])
    dm = make_dm(module, jsonl_file, empty)
    m = cb.evaluate(module, dm.records("val"), dm.renderer, dm.verifier, batch_size=3).metrics
    assert {k: m[k] for k in m if k.startswith("hidden_cos/")} == {
        "hidden_cos/layer_0": 1.0, "hidden_cos/layer_1": 1.0, "hidden_cos/layer_2": 1.0, "hidden_cos/mean": 1.0}
    assert m["ctx_kl"] == 0.0
    assert m["acc_no_ctx"] == m["acc_ctx"] and m["len_inflation"] == pytest.approx(0.0)

    # with a context the blocks differ (not vacuous), the embedding output at response tokens does not
    dm2 = make_dm(module, jsonl_file, make_records(3, context="ADD2 REV", seed=5), "val2.jsonl")
    m2 = cb.evaluate(module, dm2.records("val"), dm2.renderer, dm2.verifier, batch_size=3).metrics
    assert m2["hidden_cos/layer_0"] == 1.0
    assert m2["hidden_cos/layer_2"] < 0.9999 and m2["ctx_kl"] > 0


def test_bad_hidden_layer_and_html_escaping(module, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        ContextRemovabilityCallback(hidden_layers=[5]).resolve_layers(module.student)
    payload = {"title": "t", "metrics": {"harm": None},
               "examples": [{"id": "a", "prompt": "<b>x</b>", "response_no_ctx": "&", "correct_no_ctx": True,
                             "correct_ctx": False}]}
    text = write_examples_html(tmp_path / "e.html", payload).read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text and "class='harm'" in text


EVAL_KEYS = ["acc_no_ctx", "acc_ctx", "harm", "help", "both_correct", "len_no_ctx", "len_ctx", "len_inflation",
             "trunc_no_ctx", "trunc_ctx", "ctx_kl", "hidden_cos/layer_1", "hidden_cos/layer_2", "hidden_cos/mean",
             "retention", "other_ctx_acc"]


def test_fit_logs_metrics_and_artifacts_to_mlflow(tiny_dirs, jsonl_file, mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    from lightning_ctx.cli import main

    train = jsonl_file(make_records(4, "ADD2", seed=1), "train.jsonl")
    val = jsonl_file(make_records(3, "ADD2", seed=2, prefix="v"), "val.jsonl")
    other = jsonl_file([dict(r, context="REV") for r in make_records(2, "REV", seed=3, prefix="o")], "other.jsonl")
    cfg = tmp_path / "cb.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning_ctx.callbacks.ContextRemovabilityCallback",
        "init_args": {"every_n_steps": 2, "retention_file": other, "progress": False}}]}}))
    main(["fit", "--config", str(cfg), "--model.student", tiny_dirs["qwen2"], "--model.max_new_tokens", "4",
          "--data.train_file", train, "--data.val_file", val, "--data.batch_size", "2",
          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"])

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    missing = [f"eval/{k}" for k in EVAL_KEYS if f"eval/{k}" not in metrics]
    assert not missing, missing
    assert "ref/teacher_acc_ctx" in metrics and "ref/initial_acc_no_ctx" in metrics
    # every 2 steps, plus the end of fit (step 3)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/acc_ctx")] == [2, 3]
    for key in ("acc_no_ctx", "acc_ctx", "both_correct", "trunc_no_ctx", "trunc_ctx", "other_ctx_acc"):
        assert 0.0 <= metrics[f"eval/{key}"] <= 1.0, key
    assert 1 <= metrics["eval/len_no_ctx"] <= 4 and 1 <= metrics["eval/len_ctx"] <= 4  # max_new_tokens = 4
    assert metrics["eval/ctx_kl"] > 0 and -1 <= metrics["eval/hidden_cos/mean"] < 1

    listed = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/step_000002", "eval/step_000003", "eval/curves.png", "eval/hidden_cos.png"} <= listed
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
