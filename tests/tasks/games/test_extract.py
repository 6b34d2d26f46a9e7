"""``lightning-ctx extract``: the extraction loop with a scripted model, and the command on a tiny Qwen3."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import ChatFormat, build_format
from lightning_ctx.tasks.games.env import GameFactory
from lightning_ctx.tasks.games.extract import clean_reply, run_extraction
from tests.tasks.games.players import LiveGames, scripted_sampler, state_plan


def _plan_player(tok, monkeypatch, seen):
    """A scripted player that wins exactly when the experience (anywhere in its prompt) says PLAN."""
    live = LiveGames(monkeypatch)

    def respond(game, text):
        seen.append("PLAN" in text or "Experience:" in text)
        return f"I go [{state_plan(game)[0]}]" if "PLAN" in text else "no move at all"

    return live, scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, respond, live=live)


def test_accumulate_plays_without_the_experience_appends_notes_and_keeps_the_best_candidate(tiny_qwen3, monkeypatch):
    """OPCD's procedure: every update plays fresh training games without the experience, the written notes are
    appended to the experience so far, every 2nd update (and the last) is a candidate scored on the same held-out
    games, the best candidate is kept."""
    tok = load_tokenizer(tiny_qwen3)
    seen = []
    live, player = _plan_player(tok, monkeypatch, seen)
    replies = iter(["<think> hmm </think> - move fast", "- PLAN the path", "- guess", "<think> out of tokens"])
    prompts = []

    def write(prompt):
        prompts.append(prompt)
        return next(replies)

    logged = []
    fmt = build_format("per_turn", ChatFormat(tok, [tok.eos_token_id]))
    result = run_extraction(player, player, write, fmt, GameFactory("FrozenLake-v0-raw", 6), updates=4, games=2,
                            val_games=3, initial="", mode="accumulate", eval_every=2, batch_size=2,
                            log=lambda k, metrics, texts: logged.append((k, metrics, texts)))
    assert [u["experience"] for u in result.updates] == [
        "", "- move fast", "- move fast\n- PLAN the path", "- move fast\n- PLAN the path\n- guess",
        "- move fast\n- PLAN the path\n- guess"]  # the reasoning block is no note; a failed update adds nothing
    assert [u.get("val_pass") for u in result.updates] == [0.0, None, 1.0, None, 1.0]
    assert result.best_update == 2 and result.best_experience == "- move fast\n- PLAN the path"
    assert [u.get("train_pass") for u in result.updates] == [None, 0.0, 0.0, 0.0, 0.0]  # never with the experience
    assert "(none yet)" in prompts[0] and "- move fast" in prompts[1] and "Round 1 input:" in prompts[0]
    assert "Round 1 output: move" in prompts[0] and "Game 1: lost after 2 moves" in prompts[0]
    # held-out games: the same seeds for every candidate; training games: fresh seeds each update
    val_seeds = [g.seed for g in live.games if g.seed >= 1_000_000]
    assert val_seeds == [1_000_000, 1_000_001, 1_000_002] * 3
    assert [g.seed for g in live.games if g.seed < 1_000_000] == list(range(8))
    assert [k for k, _, _ in logged] == [0, 1, 2, 3, 4]
    assert "val_pass" in logged[2][1] and "val_pass" not in logged[1][1]
    assert set(logged[2][2]) == {"experience.txt", "prompt.txt", "games.json"}
    assert len(json.loads(logged[1][2]["games.json"])) == 2


def test_revise_plays_with_the_best_experience_and_does_not_build_on_a_failed_revision(tiny_qwen3, monkeypatch):
    tok = load_tokenizer(tiny_qwen3)
    seen = []
    live, player = _plan_player(tok, monkeypatch, seen)
    replies = iter(["Experience: move fast", "Experience: PLAN the path", "Experience: guess"])
    prompts = []

    def write(prompt):
        prompts.append(prompt)
        return next(replies)

    fmt = build_format("single_sequence", ChatFormat(tok, [tok.eos_token_id]))
    result = run_extraction(player, player, write, fmt, GameFactory("FrozenLake-v0-raw", 6), updates=3, games=3,
                            val_games=4, initial="Experience: be careful", mode="revise", batch_size=2)
    assert result.best_update == 2 and result.best_experience == "Experience: PLAN the path"
    assert [u["val_pass"] for u in result.updates] == [0.0, 0.0, 1.0, 0.0]
    assert [u.get("train_pass") for u in result.updates] == [None, 0.0, 0.0, 1.0]  # update 3 played with update 2's
    assert "Experience: be careful" in prompts[0] and "Experience: be careful" in prompts[1]
    assert "Experience: PLAN the path" in prompts[2]


def test_clean_reply():
    assert clean_reply("<think> a </think>\n notes \n") == "notes" and clean_reply(" notes") == "notes"
    assert clean_reply("<think> ran out of tokens while reasoning") == ""  # a failed revision


@pytest.mark.slow  # loads and decodes a model (no Trainer.fit)
def test_extract_command_writes_the_experience_and_logs_every_round(tiny_qwen3, mlflow_uri, tmp_path):
    from lightning_ctx.cli import main

    out = tmp_path / "exp" / "frozenlake.txt"
    start = tmp_path / "start.txt"
    start.write_text("Experience: PLAN\n")
    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", tiny_qwen3, "--out", str(out), "--experience", str(start), "--updates", "2",
              "--eval-every", "1", "--val-games", "2", "--max-new-tokens", "4", "--write-max-new-tokens", "6",
              "--dtype", "float32", "--device", "cpu"])
    assert info.value.code == 0
    (run,) = mlflow.search_runs(experiment_names=["extract"], output_format="list")
    client = MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "extract/val_pass")] == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"update_000", "update_001", "update_002",
                                                                       "best_experience.txt"}
    best = int(run.data.metrics["extract/best_update"])
    expected = "Experience: PLAN" if best == 0 else Path(client.download_artifacts(
        run.info.run_id, f"update_{best:03d}/experience.txt")).read_text()
    assert out.read_text().strip() == expected.strip()


@pytest.mark.slow  # loads and decodes a model (no Trainer.fit)
def test_extract_command_without_any_experience_writes_nothing_and_fails(tiny_qwen3, mlflow_uri, tmp_path, capsys):
    """A random tiny model writes nothing usable in one update (its reply is cut inside a reasoning block or empty
    after cleaning) and there is no starting experience: one error line, no empty file."""
    from lightning_ctx.cli import main

    out = tmp_path / "exp.txt"
    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", tiny_qwen3, "--out", str(out), "--updates", "1", "--val-games", "1",
              "--max-new-tokens", "2", "--write-max-new-tokens", "1", "--dtype", "float32", "--device", "cpu"])
    err = capsys.readouterr().err
    if info.value.code == 0:  # the model happened to write a token of prose: then it must be what was written
        assert out.read_text().strip()
    else:
        assert info.value.code == 2 and "no update wrote any experience" in err and not out.exists()


def test_extract_command_rejects_bad_arguments(capsys, tmp_path):
    from lightning_ctx.cli import main

    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", "x", "--out", "y", "--games", "0"])
    assert info.value.code == 2 and "--games" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", "x", "--out", str(tmp_path), "--updates", "1"])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # the game's settings are checked like data.env_kwargs
        main(["extract", "--model", "x", "--out", "y", "--env-kwargs", '{"size": "big"}'])
    assert info.value.code == 2 and "--env-kwargs.size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", "x", "--out", "y", "--env-kwargs", "{size: 3"])
    assert info.value.code == 2 and "is not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", "x", "--out", "y", "--env-id", "Sokoban-v0"])
    assert info.value.code == 2 and "-raw" in capsys.readouterr().err
