"""Helpers shared by the tests (fixtures live in conftest.py): records, tiny batches and fixed rollouts,
and the scripted decoding the evaluation tests count metrics on by hand."""

from __future__ import annotations

import random
import re

import torch

from lightning_ctx.data.batches import PairCollator
from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.render import PromptRenderer
from lightning_ctx.data.task import JSONLTask
from lightning_ctx.eval import EvalSettings, Evaluator
from lightning_ctx.rollout import Rollout, response_mask_from_ids


def make_records(n, context="ADD2", seed=0, prefix="r"):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        digits = " ".join(rng.choice("0123456789") for _ in range(3))
        out.append({"id": f"{prefix}{i}", "context": context, "prompt": digits, "answer": digits})
    return out


# ---------------------------------------------------------------- the documentation a user reads


def documentation_text() -> str:
    """The README and every written page of docs/ (the README links them; not the generated config reference), as one
    text."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    pages = [repo / "README.md", *sorted(p for p in (repo / "docs").glob("*.md") if p.name != "config_reference.md")]
    return "\n\n".join(p.read_text(encoding="utf-8") for p in pages)


# ---------------------------------------------------------------- a tiny batch and a fixed rollout


def tiny_batch(module):
    recs = [TaskRecord("a", "ADD2 REV", "1 2 3", "x"), TaskRecord("b", "SHOW", "4 5", "x"),
            TaskRecord("c", "ADD1", "7 8 9", "x")]
    return PairCollator(PromptRenderer(module.tokenizer), module.pad_token_id)(recs)


def fixed_rollout(module, batch):
    eos, pad = module.tokenizer.eos_token_id, module.pad_token_id
    resp = torch.tensor([[10, 11, eos, pad], [12, eos, pad, pad], [13, 14, 15, 16]])
    mask, lengths, finished = response_mask_from_ids(resp, [eos])
    return Rollout(batch.prompt_ids, batch.prompt_mask, resp, mask, lengths, finished)


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- scripted decoding for the evaluation tests

MAX_NEW = 6


def make_dm(module, jsonl_file, records, name="val.jsonl"):
    dm = TaskDataModule(JSONLTask(val_file=jsonl_file(records, name), verifier="exact"))
    dm.connect(module.tokenizer)
    dm.validate()
    return dm


def scripted_decode(evaluator, script, teacher, calls):
    """Decoding replaced by a table: (model role, prompt digits, with context?) -> (response text, EOS?)."""
    tok = evaluator.tokenizer
    eos, pad = evaluator.eos_token_ids[0], evaluator.pad_token_id

    def decode(model, prompt_ids, prompt_mask, settings):
        assert not model.training  # decoding in eval mode
        role = "teacher" if model is teacher else "student"
        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            text = tok.decode([t for t, m in zip(ids, mask) if m])
            digits = re.search(r"user (\d \d \d)", text).group(1)
            context = re.search(r"system (.*?)<\|im_end\|>", text)
            response, finished = script[(role, digits, context.group(1).strip() if context else None)]
            row = tok(response, add_special_tokens=False).input_ids + ([eos] if finished else [])
            rows.append(row[: settings.max_new_tokens])
        calls.append((role, settings))
        width = max(len(r) for r in rows)
        resp = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask, lengths, finished = response_mask_from_ids(resp, [eos])
        return Rollout(prompt_ids, prompt_mask, resp.masked_fill(~mask, pad), mask, lengths, finished)
    return decode


def scripted_evaluator(module, dm, script, **settings):
    ev = Evaluator.for_module(module, dm.renderer, dm.verifier, EvalSettings(max_new_tokens=MAX_NEW, **settings))
    ev.calls = []
    ev.decode = scripted_decode(ev, script, module.teacher, ev.calls)
    return ev


def add2_answer(digits):
    return " ".join(str((int(d) + 2) % 10) for d in digits.split())


# Six items with context ADD2: (no-ctx right?, ctx right?, no-ctx truncated?, ctx truncated?)
PLAN = [(True, True, False, False), (True, True, False, False), (True, False, False, False),
        (True, False, False, True), (False, True, False, False), (False, False, True, False)]
WRONG = "0 0 0 0 0"  # 5 tokens (+ EOS = 6)
TRUNC = "9 9 9 9 9 9"  # 6 tokens = max_new_tokens, no EOS


def scripted_response(right, truncated, answer):
    if truncated:
        return TRUNC, False, MAX_NEW
    return (answer, True, 4) if right else (WRONG, True, 6)


def scripted_task():
    """Six ADD2 items and four REV retention items, with the script of every model's responses."""
    records = [dict(r, answer=add2_answer(r["prompt"])) for r in make_records(6, "ADD2", seed=3)]
    assert len({r["prompt"] for r in records}) == 6
    retention = [dict(r, context="REV", answer=" ".join(reversed(r["prompt"].split())))
                 for r in make_records(4, "REV", seed=4, prefix="o")]
    script, len0, len1 = {}, [], []
    for rec, (ok0, ok1, tr0, tr1) in zip(records, PLAN):
        text0, eos0, n0 = scripted_response(ok0, tr0, rec["answer"])
        text1, eos1, n1 = scripted_response(ok1, tr1, rec["answer"])
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
    return records, retention, script, len0, len1
