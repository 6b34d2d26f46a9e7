"""MedMCQA in OPCD's protocol: the tagged option read strictly and as OPCD reads it (every case worked out by hand), the
``sys_medmcqa`` export converter on a parquet written in the assumed layout, raw MedMCQA rows, the shipped sample,
either scoring, and OPCD's published system prompt."""

from pathlib import Path

import pytest

from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.errors import ConfigError, DataError
from lightning_ctx.tasks.mcqa import (
    OPCDChoiceVerifier,
    SysMCQATask,
    TaggedChoiceVerifier,
    normalize_choice,
    read_choice,
    read_choice_opcd,
)

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "experiments" / "data"
PROMPT_FILE = DATA / "sys_medmcqa_prompt.txt"
TAGGED = "Reason, then give the letter as <answer>X</answer>."  # a context that asks for the format

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
    verifier = TaggedChoiceVerifier()
    assert isinstance(verifier, TaggedChoiceVerifier)
    for gold in "ABCD":
        assert verifier(response, gold) is (expected == gold)


# OPCD's reading (data.scoring: opcd), worked out by hand from its scorer: the text of the last <answer>...</answer>
# pair (the tag in any case; each opening tag closed by the nearest closing tag after it); in it, the first "(X)" with
# X one of A-D / a-d, else the first character that is one of A-D / a-d, wherever it stands.
OPCD_CASES = [
    ("Insulin comes from the beta cells of the pancreas.\n<answer>B</answer>", "B"),
    ("<answer>A</answer> or maybe <answer>B</answer>", "B"),           # the last tag wins
    ("<answer>c</answer>", "C"),                                         # the letter in any case
    ("<ANSWER>B</ANSWER>", "B"),                                         # the tag in any case
    ("<Answer>d</answer>", "D"),
    ("<answer>(C)</answer>", "C"),                                       # parenthesised
    ("<answer>(c) Pancreas</answer>", "C"),
    ("<answer>C) Pancreas</answer>", "C"),                               # a bare letter first
    ("<answer>Pancreas (B)</answer>", "B"),                              # a parenthesised letter beats the bare 'a'
    ("<answer>B (C)</answer>", "C"),                                     # ... even one that comes after a bare letter
    ("<answer>(B) or (C)</answer>", "B"),                                # several parenthesised: the first
    ("<answer>A or B</answer>", "A"),                                    # several bare letters: the first
    ("<answer>Option B</answer>", "B"),                                  # no a-d in "Option"
    ("<answer>The answer is B</answer>", "A"),                           # the 'a' of "answer" comes first
    ("<answer>Pancreas</answer>", "A"),                                  # the option text: its first a-d letter
    ("<answer>() (B)</answer>", "B"),                                    # empty parentheses: the first bare letter
    ("<answer>() a (B)</answer>", "A"),
    ("<answer>E</answer>", None),                                        # not one of the four options
    ("<answer>(E)</answer>", None),
    ("<answer>K</answer>", None),
    ("<answer>()</answer>", None),
    ("<answer></answer>", None),
    ("The answer is B.", None),                                          # no tag
    ("B", None),
    ("<answer>B", None),                                                 # unclosed (truncated): no pair
    ("<answer>A</answer> then <answer>B", "A"),                          # an unclosed last tag is skipped
    ("<answer>B <answer>C</answer>", "B"),                               # nested: the pair holds "B <answer>C"
    ("<answer>x <answer>C</answer>", "A"),                               # ... whose inner tag spells a-n-s-w-e-r
    ("< answer >B</ answer >", None),                                    # spaces inside the tag: no tag
]


@pytest.mark.parametrize("response, expected", OPCD_CASES)
def test_read_choice_opcd_cases(response, expected):
    assert read_choice_opcd(response) == expected
    verifier = OPCDChoiceVerifier()
    assert isinstance(verifier, OPCDChoiceVerifier)
    for gold in ("A", "B", "C", "D", "b", "(C)"):
        assert verifier(response, gold) is (expected == normalize_choice(gold))


def test_the_two_scorings_differ_where_documented():
    strict, opcd = TaggedChoiceVerifier(), OPCDChoiceVerifier()
    for response, gold, by_strict, by_opcd in [
        ("<answer>A</answer> or maybe <answer>B</answer>", "B", False, True),
        ("<answer>(B)</answer>", "B", False, True),
        ("<answer>B) Pancreas</answer>", "B", False, True),
        ("<answer>The answer is B</answer>", "B", False, False),   # OPCD reads A here
        ("<answer>The answer is B</answer>", "A", False, True),
        ("<answer>B</answer>", "B", True, True),
        ("<answer>E</answer>", "E", True, False),                  # strict knows ten options, OPCD four
    ]:
        assert (strict(response, gold), opcd(response, gold)) == (by_strict, by_opcd), (response, gold)


def test_opcd_gold_letters():
    verifier = OPCDChoiceVerifier()
    assert [verifier.parse_answer(g) for g in ("A", "d", "(B)", "<answer>C</answer>", "E", "J", "Pancreas")] == [
        "A", "D", "B", "C", None, None, None]
    assert OPCDChoiceVerifier(letters="ABCDE").parse_answer("E") == "E"


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
    dm = TaskDataModule(SysMCQATask(train_file=str(path), system_prompt_file=str(PROMPT_FILE)),
                        tokenizer=tiny_dirs["llama"])
    recs = dm.records("train")
    assert [(r.id, r.answer) for r in recs] == [("medmcqa-1", "B"), ("medmcqa-2", "B")]
    assert recs[0].prompt == content and recs[0].context == PROMPT_FILE.read_text().strip()
    assert type(dm.verifier) is TaggedChoiceVerifier
    # verl's reward_model.ground_truth holding a 0-based index works through the default field map too
    pq.write_table(pa.Table.from_pylist([{"content": content, "reward_model": {"ground_truth": 1}}]), path)
    again = TaskDataModule(SysMCQATask(train_file=str(path), system_prompt=TAGGED), tokenizer=tiny_dirs["llama"])
    assert again.records("train")[0].answer == "B"


def test_raw_medmcqa_rows_and_errors(jsonl_file, tiny_dirs):
    raw = {"id": "m1", "question": "Which organ produces insulin?", "opa": "Liver", "opb": "Pancreas",
           "opc": "Spleen", "opd": "Kidney", "cop": 1}
    dm = TaskDataModule(SysMCQATask(train_file=jsonl_file([raw, dict(raw, id="m2", cop=-1)]), system_prompt=TAGGED,
                                    skip_unlabeled=True), tokenizer=tiny_dirs["qwen2"])
    (rec,) = dm.records("train")
    assert (rec.id, rec.answer) == ("m1", "B") and rec.prompt.endswith("D) Kidney")  # no extra instruction line
    with pytest.raises(DataError, match="cop"):
        TaskDataModule(SysMCQATask(train_file=jsonl_file([dict(raw, cop=-1)]), system_prompt=TAGGED),
                       tokenizer=tiny_dirs["qwen2"]).validate()
    with pytest.raises(DataError, match="cannot read gold answer 'Pancreas'"):
        TaskDataModule(SysMCQATask(train_file=jsonl_file([{"content": "Q?", "answer": "Pancreas"}]),
                                   system_prompt=TAGGED), tokenizer=tiny_dirs["qwen2"]).validate()


def test_shipped_samples_convert():
    task = SysMCQATask(train_file=str(DATA / "sys_medmcqa_train_sample.jsonl"),
                       val_file=str(DATA / "sys_medmcqa_test_sample.jsonl"), system_prompt_file=str(PROMPT_FILE))
    train, val = task.load("train"), task.load("val")
    assert len(train) == 16 and len(val) == 8
    assert all(r.answer in "ABCD" and "Options:" in r.prompt for r in train + val)
    assert "<answer>" in PROMPT_FILE.read_text()


# opcd/system_prompts/medmcqa.txt of microsoft/LMOps as published (one line, no trailing newline), for the test only:
# users download the file themselves; it is not shipped. It never mentions the <answer> tag.
OPCD_MEDMCQA_PROMPT = (
    "You are a knowledgeable and analytical assistant specializing in medical topics. Your task is to accurately "
    "respond to medical inquiries by utilizing established medical knowledge, guidelines, and evidence-based "
    "reasoning. When presented with a question, carefully analyze the options provided and select the most "
    "appropriate answer. Ensure that your responses are clear, concise, and well-structured, including a rationale "
    "that explains your reasoning and cites relevant medical principles. Prioritize accuracy and logical coherence in "
    "all your responses."
)


@pytest.mark.parametrize("scoring, verifier", [("strict", TaggedChoiceVerifier), ("opcd", OPCDChoiceVerifier)])
def test_opcds_prompt_file_is_taken_as_published(tmp_path, tiny_dirs, scoring, verifier):
    prompt_file = tmp_path / "medmcqa.txt"
    prompt_file.write_bytes(OPCD_MEDMCQA_PROMPT.encode())
    assert len(OPCD_MEDMCQA_PROMPT) == 556  # the published file's size
    samples = {"train_file": str(DATA / "sys_medmcqa_train_sample.jsonl"),
               "val_file": str(DATA / "sys_medmcqa_test_sample.jsonl")}
    # our samples' questions do not ask for the tag either (OPCD's exports must): refused, with the fix in the message
    with pytest.raises(DataError, match="sys_medmcqa_train_sample.jsonl.*data.task.instruction.*<answer>"):
        TaskDataModule(SysMCQATask(**samples, system_prompt_file=str(prompt_file), scoring=scoring),
                       tokenizer=tiny_dirs["qwen2"]).validate()
    instruction = "Give the letter of your final choice as <answer>X</answer>."
    task = SysMCQATask(**samples, system_prompt_file=str(prompt_file), scoring=scoring, instruction=instruction)
    dm = TaskDataModule(task, max_prompt_length=1024, tokenizer=tiny_dirs["qwen2"])
    dm.validate()
    assert type(dm.verifier) is verifier
    records = dm.records("train") + dm.records("val")
    assert len(records) == 24 and all(r.context == OPCD_MEDMCQA_PROMPT for r in records)
    assert all(r.prompt.endswith("\n" + instruction) for r in records)
    assert OPCD_MEDMCQA_PROMPT in dm.renderer.text(records[0].prompt, records[0].context)


def test_scoring_knob():
    train = str(DATA / "sys_medmcqa_train_sample.jsonl")
    assert type(SysMCQATask(train_file=train, system_prompt_file=str(PROMPT_FILE)).verifier) is TaggedChoiceVerifier
    task = SysMCQATask(train_file=train, system_prompt_file=str(PROMPT_FILE), scoring="opcd")
    assert type(task.verifier) is OPCDChoiceVerifier
    assert task.verifier("<answer>A</answer> no, <answer>(b)</answer>", "B")
    with pytest.raises(ConfigError, match="data.task.scoring.*must be one of strict, opcd, got 'OPCD'"):
        SysMCQATask(train_file=train, system_prompt_file=str(PROMPT_FILE), scoring="OPCD")


@pytest.mark.parametrize("scoring", ["strict", "opcd"])
def test_an_unreadable_gold_letter_stops_the_run_under_either_scoring(jsonl_file, tiny_dirs, scoring):
    def error(gold):
        path = jsonl_file([{"content": "Q?", "answer": "A"}, {"content": "R?", "answer": gold}])
        with pytest.raises(DataError, match="line 2") as info:
            TaskDataModule(SysMCQATask(train_file=path, system_prompt=TAGGED, scoring=scoring),
                           tokenizer=tiny_dirs["qwen2"]).validate()
        return str(info.value)

    for gold in ("Pancreas", "K", "AB"):  # no option letter: refused while converting, whatever the scoring
        assert f"cannot read gold answer {gold!r}" in error(gold)
    # E is an option letter, but OPCD's scorer knows A-D only: it could never score this item right
    if scoring == "strict":
        task = SysMCQATask(train_file=jsonl_file([{"content": "Q?", "answer": "E"}]), system_prompt=TAGGED)
        dm = TaskDataModule(task, tokenizer=tiny_dirs["qwen2"])
        assert [r.answer for r in dm.records("train")] == ["E"]
    else:
        assert "the 'OPCDChoiceVerifier' verifier cannot parse answer 'E'" in error("E")
