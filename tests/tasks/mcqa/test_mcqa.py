"""MedMCQA-style multiple-choice rows -> {id, context, prompt, answer} records with a system prompt."""

import json
from pathlib import Path

import pytest

from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.data.records import DataError, load_jsonl
from lightning_ctx.data.verifiers import ChoiceVerifier, build_verifier
from lightning_ctx.tasks.mcqa import MCQATask
from lightning_ctx.tasks.mcqa.convert import (
    MEDICAL_SYSTEM_PROMPT,
    convert_rows,
    format_mcq_prompt,
    load_mcqa,
    row_to_record,
)
from lightning_ctx.tasks.mcqa.convert import main as mcqa_main

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "experiments" / "data" / "medmcqa_sample.jsonl"
SYSTEM_PROMPT_FILE = REPO / "experiments" / "data" / "medmcqa_system_prompt.txt"

MED_ROW = {"id": "x1", "question": "Which organ produces insulin?", "opa": "Liver", "opb": "Pancreas",
           "opc": "Spleen", "opd": "Kidney", "cop": 1, "subject_name": "Physiology", "exp": "long text"}


def test_medmcqa_row_with_cop_index():
    rec = row_to_record(MED_ROW, "SYS")
    assert rec["id"] == "x1" and rec["context"] == "SYS" and rec["answer"] == "B"
    assert rec["prompt"] == ("Question: Which organ produces insulin?\nOptions:\nA) Liver\nB) Pancreas\nC) Spleen\n"
                             "D) Kidney\nAnswer with the letter of the correct option.")
    assert rec["subject_name"] == "Physiology" and "exp" not in rec
    assert row_to_record(MED_ROW, "SYS", cop_base=1)["answer"] == "A"  # the original release counts from 1
    assert build_verifier("choice")("B) Pancreas", rec["answer"])


@pytest.mark.parametrize("answer_fields, letter", [
    ({"options": ["x", "y", "z"], "answer": "C"}, "C"),
    ({"options": ["x", "y", "z"], "answer": "b)"}, "B"),
    ({"options": ["x", "y", "z"], "answer": 0}, "A"),
    ({"options": ["x", "y", "z"], "answer": "y"}, "B"),  # the text of an option
    ({"options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer_idx": "D"}, "D"),  # MedQA-style
])
def test_generic_rows(answer_fields, letter):
    rec = row_to_record({"question": "q?", **answer_fields}, "SYS", index=7)
    assert rec["answer"] == letter and rec["id"] == "mcqa-7"


def test_bad_rows_name_line_and_field(tmp_path):
    rows = [(1, MED_ROW), (2, dict(MED_ROW, id="x2", cop=4))]
    with pytest.raises(DataError, match=r"raw.jsonl, line 2, field 'cop'.*cop_base"):
        convert_rows(rows, "SYS", path="raw.jsonl")
    with pytest.raises(DataError, match=r"line 1, field 'question'"):
        convert_rows([(1, {"opa": "a", "opb": "b", "cop": 0})], "SYS")
    with pytest.raises(DataError, match=r"line 1, field 'answer'"):
        convert_rows([(1, {"question": "q", "options": ["a", "b"], "answer": "maybe"})], "SYS")
    with pytest.raises(DataError, match=r"line 2, field 'id'.*duplicate"):
        convert_rows([(1, MED_ROW), (2, MED_ROW)], "SYS")
    unlabeled = [(1, MED_ROW), (2, dict(MED_ROW, id="x2", cop=-1))]  # MedMCQA's test split has no answers
    with pytest.raises(DataError, match=r"line 2, field 'cop'.*skip_unanswered"):
        convert_rows(unlabeled, "SYS")
    assert [r["id"] for r in convert_rows(unlabeled, "SYS", skip_unanswered=True)] == ["x1"]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(MED_ROW) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_mcqa(bad_json, "SYS")


def test_shipped_sample_and_system_prompt():
    assert SYSTEM_PROMPT_FILE.read_text().strip() == MEDICAL_SYSTEM_PROMPT
    recs = load_mcqa(SAMPLE, MEDICAL_SYSTEM_PROMPT)
    assert len(recs) == 24 and len({r.id for r in recs}) == 24
    assert {r.answer for r in recs} == set("ABCD")  # every letter is a gold answer somewhere
    assert all(r.context == MEDICAL_SYSTEM_PROMPT and r.prompt.startswith("Question: ") for r in recs)
    assert format_mcq_prompt("q", ["a", "b"], instruction="") == "Question: q\nOptions:\nA) a\nB) b"


def test_cli_converts_to_records(tmp_path):
    out = tmp_path / "records.jsonl"
    assert mcqa_main([str(SAMPLE), str(out), "--system-prompt", "Be a doctor."]) == 0
    recs = load_jsonl(out)  # the generic loader accepts the output
    assert len(recs) == 24 and recs[0].context == "Be a doctor." and recs[0].answer in "ABCD"
    assert mcqa_main([str(tmp_path / "missing.jsonl"), str(out)]) == 2


def test_datamodule_holds_out_val_rows(tiny_dirs):
    dm = TaskDataModule(MCQATask(train_file=str(SAMPLE), val_size=8, system_prompt_file=str(SYSTEM_PROMPT_FILE)),
                        tokenizer=tiny_dirs["qwen2"])
    dm.validate()
    train, val = dm.records("train"), dm.records("val")
    assert len(train) == 16 and len(val) == 8 and not {r.id for r in train} & {r.id for r in val}
    again = TaskDataModule(MCQATask(train_file=str(SAMPLE), val_size=8), tokenizer=tiny_dirs["qwen2"])
    again.validate()
    assert [r.id for r in again.records("val")] == [r.id for r in val]  # seeded
    other = TaskDataModule(MCQATask(train_file=str(SAMPLE), val_size=8, val_seed=1), tokenizer=tiny_dirs["qwen2"])
    assert [r.id for r in other.records("val")] != [r.id for r in val]  # by val_seed
    assert isinstance(dm.verifier, ChoiceVerifier) and dm.verifier("C", "C")
    with pytest.raises(DataError, match="data.task.val_size"):
        MCQATask(train_file=str(SAMPLE), val_file=str(SAMPLE), val_size=2)


@pytest.mark.parametrize("row, field", [
    ({"question": "q", "opa": "a", "opb": None, "opc": "c", "opd": "d", "cop": 2}, "opb"),  # C would now be "d"
    ({"question": "q", "opa": "a", "opb": "  ", "opc": "c", "cop": 0}, "opb"),
    ({"question": "q", "opa": "a", "opc": "c", "opd": "d", "cop": 0}, "opb"),  # a missing key shifts as well
    ({"question": "q", "opa": "a", "opb": "b", "cop": True}, "cop"),  # int(True) == 1: B, silently
    ({"question": "q", "opa": "a", "opb": "b", "opc": "c", "cop": 1.9}, "cop"),  # int(1.9) == 1: B, silently
])
def test_rows_that_would_shift_the_gold_letter_are_errors(row, field):
    """(issue #26.5) A null or missing option before a given one, or a cop that is not an integer, used to produce a
    record whose gold letter names another option; the converter and both data modules read rows through here."""
    with pytest.raises(DataError, match=rf"line 3, field '{field}'"):
        row_to_record(row, "SYS", path="raw.jsonl", line=3)


def test_trailing_null_options_and_integral_cops_are_fine():
    row = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": None, "ope": None, "cop": 2.0}
    rec = row_to_record(row, "SYS")
    assert rec["answer"] == "C" and "D)" not in rec["prompt"]
    assert row_to_record(dict(row, cop="1"), "SYS")["answer"] == "B"
