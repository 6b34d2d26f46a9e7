"""The rule world's rules, records, splits and verifier (pure; no model)."""

from __future__ import annotations

import json
import math
import random

import pytest

from lightning_ctx.data.records import write_jsonl
from lightning_ctx.tasks.world import rules as W

# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_all_contexts_shape():
    assert len(W.ALL_CONTEXTS) == len(set(W.ALL_CONTEXTS)) == 61  # 5 + 25 op sequences, +/- SHOW, + SHOW
    assert "SHOW" in W.ALL_CONTEXTS and "ADD2 ADD2" in W.ALL_CONTEXTS and "ADD1 REV SHOW" in W.ALL_CONTEXTS
    assert all(1 <= len(c.split()) <= 3 for c in W.ALL_CONTEXTS)
    assert not any("SHOW" in c.split()[:-1] for c in W.ALL_CONTEXTS)
    others = W.other_contexts("SHOW")
    assert "SHOW" not in others and len(others) == 60
    # equivalent contexts (REV REV SHOW computes SHOW) can be excluded
    assert "REV REV SHOW" in others and "REV REV SHOW" not in W.other_contexts("SHOW", exclude_equivalent=True)


def test_apply_context_hand_checked():
    assert W.apply_context("ADD2 ADD2", "3 1 9") == "7 5 3"  # +4 mod 10
    assert W.apply_context("ADD4", [6, 0, 9]) == "0 4 3"
    assert W.apply_context("REV", "3 1 4") == "4 1 3"
    assert W.apply_context("REV REV", "3 1 4") == "3 1 4"
    assert W.apply_context("ADD1 REV", "3 1 9") == "0 2 4"  # left to right: +1 -> 4 2 0, reverse
    assert W.apply_context("REV ADD3", "3 1 9") == "2 4 6"
    assert W.apply_context("ADD1 REV SHOW", "3 1 4") == "3 1 4 = 5 2 4"
    assert W.apply_context("SHOW", "0 0 7") == "0 0 7 = 0 0 7"
    assert W.apply_context("  ADD3   SHOW ", "9 9 9") == "9 9 9 = 2 2 2"
    for bad in ["", "SHOW ADD1", "ADD5", "add1"]:
        with pytest.raises(ValueError):
            W.apply_context(bad, "1 2 3")
    with pytest.raises(ValueError):
        W.apply_context("ADD1", "1 2")
    assert W.context_signature("ADD1 ADD1") == W.context_signature("ADD2")
    assert W.context_signature("ADD3 REV ") == (3, True, False)


def test_records_deterministic_and_seeded():
    a = W.make_records("ADD2 ADD2", 50, seed=0, split="train")
    assert a == W.make_records("ADD2 ADD2", 50, seed=0, split="train")
    assert a != W.make_records("ADD2 ADD2", 50, seed=1, split="train")
    assert a[0]["id"] == "world-ADD2_ADD2-train-0" and set(a[0]) == {"id", "context", "prompt", "answer"}
    assert len({r["id"] for r in a}) == 50
    assert len({r["prompt"] for r in a}) == 50  # n <= pool size: no repeats
    for r in a:
        assert r["context"] == "ADD2 ADD2" and r["answer"] == W.apply_context(r["context"], r["prompt"])
    # same seed/split -> same inputs for every context (paired), answers differ
    b = W.make_records("SHOW", 50, seed=0, split="train")
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    # larger n than the pool: still deterministic, inputs repeat
    big = W.make_records("REV", 250, seed=3, split="val")
    assert len(big) == 250 and len({r["prompt"] for r in big}) == 100


def test_splits_disjoint(tmp_path):
    pools = {s: set(W.split_inputs(s)) for s in W.SPLITS}
    assert sum(len(p) for p in pools.values()) == 1000
    assert not (pools["train"] & pools["val"]) and not (pools["train"] & pools["test"])
    assert not (pools["val"] & pools["test"])
    split = W.make_world_split("SHOW", 100, 30, 30, seed=5)
    got = {s: {tuple(map(int, r["prompt"].split())) for r in recs} for s, recs in split.items()}
    for s in W.SPLITS:
        assert got[s] <= pools[s]
    path = write_jsonl(split["train"], tmp_path / "sub" / "train.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and json.loads(lines[7]) == split["train"][7]


def test_verifier():
    assert W.world_verifier("3 1 4 = 5 2 4", "3 1 4 = 5 2 4")
    assert W.world_verifier("  3 1  4=5 2\t4 \n", "3 1 4 = 5 2 4")
    assert W.world_verifier("314 = 524", "3 1 4 = 5 2 4")
    assert W.world_verifier("7 5 3", " 7 5 3 ")
    assert not W.world_verifier("5 2 4", "3 1 4 = 5 2 4")  # right value, missing SHOW format
    assert not W.world_verifier("3 1 4 = 5 2 4", "5 2 4")  # SHOW format where none was asked
    assert not W.world_verifier("3 1 4 = 5 2 5", "3 1 4 = 5 2 4")
    assert not W.world_verifier("", "3 1 4")
    assert not W.world_verifier("3 1 4 4", "3 1 4")
    assert W.parse_world_answer(" 3 1 4= 5 2 4") == "3 1 4 = 5 2 4"
    assert W.parse_world_answer("3 1") is None


def test_no_context_mixture():
    rng = random.Random(0)
    n = 24000
    counts: dict[str, int] = {}
    for _ in range(n):
        x = [rng.randrange(10) for _ in range(3)]
        answer, op = W.sample_no_context_answer(x, rng)
        counts[op] = counts.get(op, 0) + 1
        if op == W.IDENTITY:
            assert answer == W.format_digits(x)
        else:
            assert answer == W.apply_context(op, x)
    assert abs(counts[W.IDENTITY] / n - 0.5) < 0.015
    for op in W.HIDDEN_OPS:  # includes SHOW: the base must sometimes write the SHOW format
        assert abs(counts[op] / n - 1 / 12) < 0.01
    dist = W.no_context_answer_distribution("1 2 1")  # REV of a palindrome merges with identity
    assert math.isclose(sum(dist.values()), 1.0)
    assert math.isclose(dist["1 2 1"], 0.5 + 1 / 12) and math.isclose(dist["1 2 1 = 1 2 1"], 1 / 12)
    assert set(W.classify_no_context_answer("1 2 1", "1 2 1")) == {W.IDENTITY, "REV"}
