
import pytest

from lightning_ctx.data.records import DataError, load_jsonl, write_jsonl
from lightning_ctx.data.verifiers import ChoiceVerifier, RegexVerifier, build_verifier, exact_match


def test_load_roundtrip_keeps_extra_fields(tmp_path):
    recs = [{"id": "a", "context": "c", "prompt": "p", "answer": "x", "source": "s1"},
            {"id": 7, "context": "", "prompt": "q", "answer": "y"}]
    path = write_jsonl(recs, tmp_path / "d.jsonl")
    loaded = load_jsonl(path)
    assert [r.id for r in loaded] == ["a", "7"]
    assert loaded[0].meta == {"source": "s1"}
    assert loaded[0].to_dict() == recs[0]


@pytest.mark.parametrize("lines, line, field, words", [
    (['{"id": "a", "context": "c", "prompt": "p", "answer": "x"}', '{"id": "b", "context": "c", "prompt"'],
     2, None, "invalid JSON"),
    (['{"id": "a", "context": "c", "answer": "x"}'], 1, "prompt", "missing"),
    (['{"id": "a", "context": 3, "prompt": "p", "answer": "x"}'], 1, "context", "must be a string"),
    (['{"id": "a", "context": "c", "prompt": "p", "answer": "x"}',
      '{"id": "a", "context": "c", "prompt": "q", "answer": "y"}'], 2, "id", "duplicate id"),
    (['[1, 2]'], 1, None, "JSON object"),
    (['{"id": "a", "context": "c", "prompt": "  ", "answer": "x"}'], 1, "prompt", "empty"),
])
def test_bad_lines_name_file_line_field(tmp_path, lines, line, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}" in msg and words in msg
    if field:
        assert f"field '{field}'" in msg
    assert info.value.line == line


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_verifiers():
    assert exact_match(" 1  2 3 ", "1 2 3") and not exact_match("1 2 4", "1 2 3")
    rv = RegexVerifier(r"answer is\s*(\d+)")
    assert rv("so the answer is 42.", "42") and not rv("the answer is 41", "42") and not rv("no idea", "42")
    assert rv("answer is 1, no wait, answer is 42", "42")  # the last stated answer wins
    cv = ChoiceVerifier()
    assert cv("B) because ...", "B") and cv("The answer: (C)", "C") and not cv("A", "B")
    assert not cv("", "B") and cv.parse_answer("d") == "D" and cv.parse_answer("xyz") is None
    assert build_verifier("choice").parse_answer("Q") is None
    with pytest.raises(ValueError, match="unknown verifier"):
        build_verifier("fuzzy")
    # any verifier by import path: a class is built with the kwargs, a function is used as it is
    assert build_verifier("lightning_ctx.data.verifiers:ChoiceVerifier", letters="AB").letters == "AB"
    assert build_verifier("lightning_ctx.data.verifiers:exact_match") is exact_match
    with pytest.raises(ValueError, match="unknown verifier"):
        build_verifier("lightning_ctx.data.verifiers:no_such_verifier")


@pytest.mark.parametrize("text, letter", [
    ("B) because", "B"), ("The answer: (C)", "C"), ("I think the answer is B", "B"),
    ("A patient with fever needs fluids. Answer: D", "D"), ("C", "C"), ("(A) cough", "A"),
    ("answer is A, no wait, the answer is C.", "C"), ("A lot of things", None), ("I am unsure", None),
])
def test_choice_verifier_reads_committed_letter(text, letter):
    assert ChoiceVerifier().extract(text) == letter
