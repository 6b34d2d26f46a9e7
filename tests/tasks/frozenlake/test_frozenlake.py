"""FrozenLake text game: map parsing, the move verifier on hand-built cases, the seeded generator."""

import json

import pytest

from lightning_ctx.data.records import DataError, load_jsonl
from lightning_ctx.data.verifiers import answer_parser, build_verifier
from lightning_ctx.tasks.frozenlake.rules import (
    FrozenLakeVerifier,
    format_map,
    frozenlake_verifier,
    make_frozenlake_records,
    parse_map,
    parse_moves,
    shortest_path,
    simulate,
)
from lightning_ctx.tasks.frozenlake.rules import main as frozenlake_main

# S F F F
# F H F H
# F F F H
# H F F G
MAP = "S F F F / F H F H / F F F H / H F F G"


@pytest.mark.parametrize("response, expected", [
    ("DOWN DOWN RIGHT RIGHT DOWN RIGHT", True),       # around both holes to G
    ("RIGHT RIGHT DOWN DOWN DOWN RIGHT", True),       # another safe path
    ("down, down, right, right, down, right.", True),  # commas, case and a final period are tolerated
    ("DOWN RIGHT", False),                            # (1,1) is a hole
    ("RIGHT RIGHT RIGHT DOWN", False),                # (1,3) is a hole
    ("UP", False),                                    # off the grid at the first move
    ("LEFT DOWN DOWN RIGHT RIGHT DOWN RIGHT", False),  # off the grid, even though the rest would reach G
    ("DOWN DOWN RIGHT RIGHT", False),                 # stops on F before G
    ("", False),                                      # empty
    ("DOWN DOWN JUMP RIGHT DOWN RIGHT", False),       # unknown word
    ("D D R R D R", False),                           # abbreviations are malformed
    ("The path is DOWN DOWN RIGHT RIGHT DOWN RIGHT", False),  # prose around the moves is malformed
])
def test_verifier_hand_built_cases(response, expected):
    assert frozenlake_verifier(response, MAP) is expected


def test_outcome_names_the_failure():
    v = FrozenLakeVerifier()
    assert v.outcome("DOWN DOWN RIGHT RIGHT DOWN RIGHT", MAP).status == "goal"
    hole = v.outcome("DOWN RIGHT LEFT", MAP)
    assert hole.status == "hole" and hole.steps == 2 and hole.position == (1, 1)  # the episode ends in the hole
    off = v.outcome("RIGHT UP", MAP)
    assert off.status == "off_grid" and off.steps == 2 and off.position == (0, 1)
    assert v.outcome("DOWN DOWN", MAP).status == "stopped"
    assert v.outcome("DOWN ?", MAP).status == "malformed"


def test_moves_after_goal_ignored_by_default_failed_when_strict():
    path = "DOWN DOWN RIGHT RIGHT DOWN RIGHT"
    assert frozenlake_verifier(path + " UP LEFT", MAP)  # the episode ends at G, as in Gym
    strict = FrozenLakeVerifier(strict=True)
    assert strict(path, MAP) and not strict(path + " UP", MAP)
    assert strict.outcome(path + " UP", MAP).status == "after_goal"
    # moves after G are still parsed: a malformed tail fails in both modes
    assert not frozenlake_verifier(path + " banana", MAP)
    by_path = "lightning_ctx.tasks.frozenlake.rules:FrozenLakeVerifier"  # the JSONL task's way to name it
    assert isinstance(build_verifier(by_path, strict=True), FrozenLakeVerifier)
    assert build_verifier(by_path, strict=True).strict and not build_verifier(by_path).strict


def test_map_formats_and_parse_answer():
    grid = parse_map(MAP)
    assert grid[0] == ("S", "F", "F", "F") and grid[3][3] == "G"
    assert parse_map("S F F F\nF H F H\nF F F H\nH F F G") == grid  # one row per line (the prompt's layout)
    assert parse_map(json.dumps({"map": MAP})) == grid
    assert parse_map(json.dumps({"map": [list(r) for r in grid]})) == grid
    assert format_map(grid) == MAP
    parse = answer_parser(frozenlake_verifier)  # what the data module's pre-training check uses
    assert parse(MAP) == grid
    for bad in ("S F / F", "S F / F X", "F F / F G", "S S / F G", "S F / G G", "", "{not json"):
        assert parse(bad) is None, bad
    assert parse("S H / H G") is None  # well formed but unsolvable: no right answer exists
    assert not frozenlake_verifier("RIGHT", "not a map")


def test_simulate_and_shortest_path():
    grid = parse_map(MAP)
    path = shortest_path(grid)
    assert len(path) == 6 and simulate(grid, path).success
    assert parse_moves("up Down") == ["UP", "DOWN"] and parse_moves("UP-DOWN") is None
    assert shortest_path(parse_map("S H / H G")) is None


def test_generator_is_seeded_solvable_and_splits_are_disjoint():
    train = make_frozenlake_records(60, size=4, hole_prob=0.3, seed=3, split="train")
    assert train == make_frozenlake_records(60, size=4, hole_prob=0.3, seed=3, split="train")
    assert train != make_frozenlake_records(60, size=4, hole_prob=0.3, seed=4, split="train")
    val = make_frozenlake_records(20, size=4, hole_prob=0.3, seed=3, split="val")
    test = make_frozenlake_records(20, size=4, hole_prob=0.3, seed=3, split="test")
    maps = [{r["answer"] for r in recs} for recs in (train, val, test)]
    assert [len(m) for m in maps] == [60, 20, 20]  # distinct within a split
    assert not (maps[0] & maps[1]) and not (maps[0] & maps[2]) and not (maps[1] & maps[2])
    for rec in train + val + test:
        assert set(rec) >= {"id", "context", "prompt", "answer"}
        assert frozenlake_verifier(rec["solution"], rec["answer"])  # every map is solvable
        rows = rec["answer"].split(" / ")
        assert all(row in rec["prompt"] for row in rows)  # the prompt shows the map the verifier plays
        assert "H" in rec["context"]
    assert any("H" in r["answer"] for r in train)
    big = make_frozenlake_records(3, size=6, hole_prob=0.2, seed=0)
    assert all(len(parse_map(r["answer"])) == 6 for r in big)


def test_cli_writes_loadable_splits(tmp_path):
    assert frozenlake_main(["--out", str(tmp_path), "--n-train", "12", "--n-val", "4", "--n-test", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "val.jsonl"]
    recs = load_jsonl(tmp_path / "train.jsonl")
    assert len(recs) == 12 and all(frozenlake_verifier(r.meta["solution"], r.answer) for r in recs)


def test_datamodule_checks_maps_before_training(tmp_path, tiny_dirs):
    from lightning_ctx.data.datamodule import TaskDataModule
    from lightning_ctx.data.records import write_jsonl
    from lightning_ctx.data.task import JSONLTask

    recs = make_frozenlake_records(4, seed=0)
    recs[2] = dict(recs[2], answer="S H / H G")  # unsolvable
    path = write_jsonl(recs, tmp_path / "train.jsonl")
    task = JSONLTask(train_file=str(path), verifier="lightning_ctx.tasks.frozenlake.rules:FrozenLakeVerifier")
    dm = TaskDataModule(task, tokenizer=tiny_dirs["qwen2"])
    with pytest.raises(DataError, match=r"train.jsonl, line 3, field 'answer'"):
        dm.validate()
