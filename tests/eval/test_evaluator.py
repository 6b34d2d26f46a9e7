"""Evaluator without a Trainer: hand-counted metrics on scripted responses, hidden-state/KL identities,
references, and the notebook entry point on a plain Hugging Face model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.eval import EvalSettings, Evaluator
from lightning_ctx.eval.artifacts import write_examples_html
from tests.helpers import (
    MAX_NEW,
    PLAN,
    WRONG,
    make_dm,
    make_records,
    scripted_evaluator,
    scripted_response,
    scripted_task,
)


@pytest.fixture(scope="module")
def module(tiny_dirs):
    from lightning_ctx.module import OnPolicyDistillation

    return OnPolicyDistillation(student=tiny_dirs["qwen2"], max_new_tokens=MAX_NEW)


def test_metrics_match_hand_counts_on_scripted_responses(module, jsonl_file):
    records, retention, script, len0, len1 = scripted_task()
    dm = make_dm(module, jsonl_file, records)
    ret = [TaskRecord.from_dict(r) for r in retention]
    ev = scripted_evaluator(module, dm, script, batch_size=4)  # 6 items -> batches of 4 and 2
    module.student.train()
    refs = ev.references(module.teacher, dm.records("val"), ret, initial_model=module.teacher)
    assert refs.metrics["teacher_acc_ctx"] == pytest.approx(1.0)
    assert refs.metrics["initial_acc_no_ctx"] == pytest.approx(0.5)
    assert refs.metrics["initial_other_ctx_acc"] == pytest.approx(0.75)
    res = ev.evaluate(module.student, dm.records("val"), ret, references=refs)
    m = res.metrics
    assert module.student.training and not module.teacher.training  # modes restored
    assert all(s.greedy and s.max_new_tokens == MAX_NEW for _, s in ev.calls)

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
            text, finished, _ = scripted_response(ok0, tr0, rec["answer"])
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

    # a scalar reference accuracy instead of per-item references: retention = other_ctx_acc / reference
    m_scalar = ev.evaluate(module.student, records, retention, reference_accuracy=0.8).metrics
    assert m_scalar["retention"] == pytest.approx(0.5 / 0.8)
    assert m_scalar["harm"] == pytest.approx(2 / 4)  # dict records work as well as TaskRecords

    # sampled decoding: same script -> same numbers under sampled/*, sampling settings passed through
    ev2 = scripted_evaluator(module, dm, script, batch_size=4, num_samples=2, temperature=0.7, top_p=0.95, top_k=20)
    m2 = ev2.evaluate(module.student, dm.records("val")).metrics
    assert m2["sampled/harm"] == pytest.approx(2 / 4) and m2["sampled/acc_ctx"] == pytest.approx(0.5)
    sampled_settings = [s for _, s in ev2.calls if not s.greedy]
    assert sampled_settings and all((s.temperature, s.top_p, s.top_k) == (0.7, 0.95, 20) for s in sampled_settings)
    assert all(s.top_k == 0 for _, s in ev2.calls if s.greedy)
    assert "retention" not in m2


def test_hidden_cos_is_one_and_ctx_kl_zero_without_context(module, jsonl_file):
    empty = make_records(3, context="", seed=5)
    dm = make_dm(module, jsonl_file, empty)
    ev = Evaluator.from_datamodule(dm, settings=EvalSettings(max_new_tokens=MAX_NEW, hidden_layers=[0, 1, -1]),
                                   eos_token_ids=module.eos_token_ids, pad_token_id=module.pad_token_id)
    m = ev.evaluate(module.student, dm.records("val")).metrics
    assert {k: m[k] for k in m if k.startswith("hidden_cos/")} == {
        "hidden_cos/layer_0": 1.0, "hidden_cos/layer_1": 1.0, "hidden_cos/layer_2": 1.0, "hidden_cos/mean": 1.0}
    assert m["ctx_kl"] == 0.0
    assert m["acc_no_ctx"] == m["acc_ctx"] and m["len_inflation"] == pytest.approx(0.0)

    # with a context the blocks differ (not vacuous), the embedding output at response tokens does not
    dm2 = make_dm(module, jsonl_file, make_records(3, context="ADD2 REV", seed=5), "val2.jsonl")
    m2 = ev.evaluate(module.student, dm2.records("val")).metrics
    assert m2["hidden_cos/layer_0"] == 1.0
    assert m2["hidden_cos/layer_2"] < 0.9999 and m2["ctx_kl"] > 0


def test_plain_hf_model_as_in_a_notebook(tiny_dirs):
    """No Lightning module, no data module: a tokenizer, a verifier name, a model and dict records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    records = make_records(5, "ADD2", seed=7)
    ev = Evaluator(tok, "exact", settings=EvalSettings(max_new_tokens=4, batch_size=2))
    model.train()
    res = ev.evaluate(model, records, retention_records=make_records(2, "REV", seed=8, prefix="o"))
    m, rows = res.metrics, res.examples
    assert model.training  # decoded and scored in eval mode, the caller's mode restored
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    # the metrics agree with the per-example rows
    assert m["acc_no_ctx"] == pytest.approx(sum(r["correct_no_ctx"] for r in rows) / 5)
    assert m["acc_ctx"] == pytest.approx(sum(r["correct_ctx"] for r in rows) / 5)
    assert m["len_no_ctx"] == pytest.approx(sum(r["len_no_ctx"] for r in rows) / 5)
    assert m["len_ctx"] == pytest.approx(sum(r["len_ctx"] for r in rows) / 5)
    assert m["trunc_ctx"] == pytest.approx(sum(r["truncated_ctx"] for r in rows) / 5)
    assert all(1 <= r["len_no_ctx"] <= 4 for r in rows)
    assert m["other_ctx_acc"] == pytest.approx(sum(r["correct"] for r in res.retention_examples) / 2)
    assert m["retention"] != m["retention"]  # NaN: no reference given
    n_blocks = model.config.num_hidden_layers
    assert {f"hidden_cos/layer_{k}" for k in range(1, n_blocks + 1)} < set(m)


def test_bad_hidden_layer_and_html_escaping(module, tmp_path):
    from lightning_ctx.eval import ContextRemovabilityCallback

    with pytest.raises(ValueError, match="out of range"):
        ContextRemovabilityCallback(hidden_layers=[5]).resolve_layers(module.student)
    payload = {"title": "t", "metrics": {"harm": None},
               "examples": [{"id": "a", "prompt": "<b>x</b>", "response_no_ctx": "&", "correct_no_ctx": True,
                             "correct_ctx": False}]}
    text = write_examples_html(tmp_path / "e.html", payload).read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text and "class='harm'" in text


def test_intervals_and_sampled_columns_come_from_the_rows(module, jsonl_file):
    records, retention, script, _, _ = scripted_task()
    dm = make_dm(module, jsonl_file, records)
    ev = scripted_evaluator(module, dm, script, batch_size=4, num_samples=3)
    refs = ev.references(module.teacher, dm.records("val"), retention, initial_model=module.teacher)
    res = ev.evaluate(module.student, dm.records("val"), retention, references=refs)
    m = res.metrics
    assert m["n_items"] == 6 and m["n_retention_items"] == 4
    # harm 2 of the 4 right without c: its interval over the six items stays inside [0, 1] and around the value
    assert m["harm"] == 0.5 and 0 <= m["harm_lo"] < 0.5 < m["harm_hi"] <= 1
    assert m["retention_lo"] <= m["retention"] <= m["retention_hi"]
    row = res.examples[2]  # right without c, wrong with c: so are its three scripted samples
    assert row["sampled_correct_no_ctx"] == [True] * 3 and row["sampled_correct_ctx"] == [False] * 3
    assert row["sampled_acc_no_ctx"] == 1.0 and len(row["sampled_len_ctx"]) == 3
    # a deterministic model has no sampling noise: the floor is 0 and the rate version is the paired harm
    assert m["sampled/harm_floor"] == 0 and m["sampled/harm_rate"] == m["sampled/harm_excess"] == m["sampled/harm"]


def test_no_effect_context_floor_corrected_sampled_harm_covers_zero(module, jsonl_file):
    """A scripted model that answers item i right with probability p_i, with or without the context (the context has
    no effect): the paired sampled harm is the noise floor, far from 0; harm_excess = harm_rate - harm_floor has 0
    inside its interval, and the floor agrees with the rate."""
    import re

    from lightning_ctx.rollout import Rollout, response_mask_from_ids

    records = make_records(60, "ADD2", seed=11)
    for i, r in enumerate(records):
        r["prompt"] = " ".join(f"{i:03d}")  # unique digits per item: the script looks items up by them
    probs = {r["prompt"]: 0.2 + 0.6 * (i % 7) / 6 for i, r in enumerate(records)}  # p_i in 0.2 .. 0.8
    dm = make_dm(module, jsonl_file, records)
    ev = Evaluator.for_module(module, dm.renderer, dm.verifier,
                              EvalSettings(max_new_tokens=MAX_NEW, batch_size=20, num_samples=8, seed=3))
    tok, eos, pad = ev.tokenizer, ev.eos_token_ids[0], ev.pad_token_id
    answers = {r["prompt"]: r["answer"] for r in records}

    def decode(model, prompt_ids, prompt_mask, settings):
        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            digits = re.search(r"user (\d \d \d)", tok.decode([t for t, m in zip(ids, mask) if m])).group(1)
            right = settings.greedy or bool(torch.rand(()) < probs[digits])  # the context plays no part
            rows.append(tok(answers[digits] if right else WRONG, add_special_tokens=False).input_ids + [eos])
        width = max(len(r) for r in rows)
        resp = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask, lengths, finished = response_mask_from_ids(resp, [eos])
        return Rollout(prompt_ids, prompt_mask, resp, mask, lengths, finished)

    ev.decode = decode
    m = ev.evaluate(module.student, dm.records("val")).metrics
    assert m["sampled/harm_lo"] > 0.15  # the paired "harm" of a context with no effect: sampling noise
    assert m["sampled/harm_excess_lo"] < 0 < m["sampled/harm_excess_hi"]
    assert m["sampled/help_excess_lo"] < 0 < m["sampled/help_excess_hi"]
    assert m["sampled/harm_floor_lo"] < m["sampled/harm_rate"] < m["sampled/harm_floor_hi"]
    # the truth: sum p(1 - p) / sum p
    p = np.array([probs[r["prompt"]] for r in records])
    assert m["sampled/harm_floor_lo"] < float((p * (1 - p)).sum() / p.sum()) < m["sampled/harm_floor_hi"]
    assert m["harm"] == 0 and m["n_items"] == 60  # greedy: always right
