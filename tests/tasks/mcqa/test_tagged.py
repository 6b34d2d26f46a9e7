"""MedMCQA in OPCD's protocol: the tagged option read strictly, the ``sys_medmcqa`` export converter on a
parquet written in the assumed layout, raw MedMCQA rows, and the shipped sample."""

from pathlib import Path

import pytest

from lightning_ctx.data.verifiers import build_verifier
from lightning_ctx.errors import DataError
from lightning_ctx.tasks.mcqa import SysMCQADataModule, TaggedChoiceVerifier, normalize_choice, read_choice

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "experiments" / "data"
PROMPT_FILE = DATA / "sys_medmcqa_prompt.txt"

CASES = [
    ("Insulin comes from the beta cells of the pancreas, so B.\n<answer>B</answer>", "B"),
    ("<answer> c </answer>", "C"),                                     # whitespace and case inside the tag
    ("Reasoning... <answer>D</answer>\nLet me know if you need more.", "D"),  # trailing text after the tag
    ("The answer is B.", None),                                         # tag missing
    ("B", None),                                                        # a bare letter: no tag
    ("Option B fits best because ... so I choose B", None),            # the choice only inside the reasoning
    ("<answer>A</answer> or maybe <answer>B</answer>", None),          # two tags
    ("<Answer>B</Answer>", None),                                       # wrong case of the tag
    ("<ANSWER>B</ANSWER>", None),
    ("<answer>B) Pancreas</answer>", None),                            # trailing text inside the tag
    ("<answer>(B)</answer>", None),
    ("<answer>Pancreas</answer>", None),                                # the option text, not its letter
    ("<answer>B", None),                                                # truncated before the closing tag
    ("<answer>K</answer>", None),                                       # not an option letter
]


@pytest.mark.parametrize("response, expected", CASES)
def test_read_choice_cases(response, expected):
    assert read_choice(response) == expected
    verifier = build_verifier("mcqa_tagged")
    assert isinstance(verifier, TaggedChoiceVerifier)
    for gold in "ABCD":
        assert verifier(response, gold) is (expected == gold)


@pytest.mark.parametrize("value, expected", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("D)", "D"), ("A.", "A"), ("<answer>C</answer>", "C"), (0, "A"),
    (3, "D"), (-1, None), (True, None), ("Pancreas", None), ("", None), (None, None),
])
def test_gold_choices(value, expected):
    assert normalize_choice(value) == expected


def test_converter_reads_a_parquet_in_the_assumed_export_layout(tmp_path, tiny_dirs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    content = "Question: Which organ produces insulin?\nOptions:\nA) Liver\nB) Pancreas\nC) Spleen\nD) Kidney"
    rows = [{"content": content, "answer": "B", "data_source": "sys_medmcqa"},
            {"content": content.replace("insulin", "glucagon"), "answer": "b", "data_source": "sys_medmcqa"}]
    path = tmp_path / "sys_medmcqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    dm = SysMCQADataModule(train_file=str(path), system_prompt_file=str(PROMPT_FILE), tokenizer=tiny_dirs["llama"])
    recs = dm.records("train")
    assert [(r.id, r.answer) for r in recs] == [("medmcqa-1", "B"), ("medmcqa-2", "B")]
    assert recs[0].prompt == content and recs[0].context == PROMPT_FILE.read_text().strip()
    assert dm.verifier_name == "mcqa_tagged"
    # verl's reward_model.ground_truth holding a 0-based index works through the default field map too
    pq.write_table(pa.Table.from_pylist([{"content": content, "reward_model": {"ground_truth": 1}}]), path)
    again = SysMCQADataModule(train_file=str(path), system_prompt="S", tokenizer=tiny_dirs["llama"])
    assert again.records("train")[0].answer == "B"


def test_raw_medmcqa_rows_and_errors(jsonl_file, tiny_dirs):
    raw = {"id": "m1", "question": "Which organ produces insulin?", "opa": "Liver", "opb": "Pancreas",
           "opc": "Spleen", "opd": "Kidney", "cop": 1}
    dm = SysMCQADataModule(train_file=jsonl_file([raw, dict(raw, id="m2", cop=-1)]), system_prompt="S",
                           skip_unlabeled=True, tokenizer=tiny_dirs["qwen2"])
    (rec,) = dm.records("train")
    assert (rec.id, rec.answer) == ("m1", "B") and rec.prompt.endswith("D) Kidney")  # no extra instruction line
    with pytest.raises(DataError, match="cop"):
        SysMCQADataModule(train_file=jsonl_file([dict(raw, cop=-1)]), system_prompt="S",
                          tokenizer=tiny_dirs["qwen2"]).validate()
    with pytest.raises(DataError, match="cannot read gold answer 'Pancreas'"):
        SysMCQADataModule(train_file=jsonl_file([{"content": "Q?", "answer": "Pancreas"}]), system_prompt="S",
                          tokenizer=tiny_dirs["qwen2"]).validate()


def test_shipped_samples_convert():
    dm = SysMCQADataModule(train_file=str(DATA / "sys_medmcqa_train_sample.jsonl"),
                           val_file=str(DATA / "sys_medmcqa_test_sample.jsonl"), system_prompt_file=str(PROMPT_FILE))
    train, val = dm.load_split_records("train"), dm.load_split_records("val")
    assert len(train) == 16 and len(val) == 8
    assert all(r.answer in "ABCD" and "Options:" in r.prompt for r in train + val)
    assert "<answer>" in PROMPT_FILE.read_text()
