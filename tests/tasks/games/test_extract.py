"""``lightning-ctx extract``: the extraction loop with a scripted model, and the command on a tiny Qwen3."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import ChatFormat
from lightning_ctx.tasks.games.env import GameFactory
from lightning_ctx.tasks.games.extract import clean_reply, run_extraction
from tests.tasks.games.players import LiveGames, scripted_sampler, state_plan


def test_the_loop_keeps_the_best_experience_by_validation_pass_rate(tiny_qwen3, monkeypatch):
    """The scripted player wins exactly when its system message says PLAN; the scripted reflection writes a useless
    revision, then the useful one, then a worse one: round 2's is kept, and each round revises the best so far."""
    tok = load_tokenizer(tiny_qwen3)
    live = LiveGames(monkeypatch)
    seen_systems = []

    def respond(game, text):
        system = text.split("<|im_end|>")[0] if "system" in text.split("<|im_end|>")[0] else None
        seen_systems.append(system)
        return f"I go [{state_plan(game)[0]}]" if system and "PLAN" in system else "no move at all"

    player = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, respond, live=live)
    replies = iter(["<think> hmm </think> Experience: move fast", "Experience: PLAN the path", "Experience: guess"])
    prompts = []

    def reflect(prompt):
        prompts.append(prompt)
        return next(replies)

    logged = []
    result = run_extraction(player, player, reflect, ChatFormat(tok, [tok.eos_token_id]),
                            GameFactory("FrozenLake-v0-raw", 6), rounds=3, games=3, val_games=4,
                            initial="Experience: be careful", batch_size=2,
                            log=lambda k, metrics, texts: logged.append((k, metrics, texts)))
    assert result.best_round == 2 and result.best_experience == "Experience: PLAN the path"
    assert [r["val_pass"] for r in result.rounds] == [0.0, 0.0, 1.0, 0.0]
    assert [r.get("train_pass") for r in result.rounds] == [None, 0.0, 0.0, 1.0]  # round 3 played with round 2's
    assert result.rounds[1]["experience"] == "Experience: move fast"  # the reasoning block is not the experience
    # round 1 and 2 revise the initial notes (round 1's revision did not beat it), round 3 revises round 2's
    assert "Experience: be careful" in prompts[0] and "Experience: be careful" in prompts[1]
    assert "Experience: PLAN the path" in prompts[2]
    assert "Game 1: lost after 2 moves" in prompts[0] and "Player: move" in prompts[0]
    assert [k for k, _, _ in logged] == [0, 1, 2, 3]
    assert set(logged[2][2]) == {"experience.txt", "reflection_prompt.txt", "games.json"}
    assert logged[3][1]["train_pass"] == 1.0 and len(json.loads(logged[1][2]["games.json"])) == 3
    # validation games: the same seeds every round; training games: fresh seeds each round
    val_seeds = [g.seed for g in live.games if g.seed >= 1_000_000]
    assert val_seeds == [1_000_000, 1_000_001, 1_000_002, 1_000_003] * 4
    train_seeds = [g.seed for g in live.games if g.seed < 1_000_000]
    assert train_seeds == list(range(9))


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
        main(["extract", "--model", tiny_qwen3, "--out", str(out), "--experience", str(start), "--rounds", "2",
              "--games", "2", "--val-games", "2", "--max-new-tokens", "4", "--reflect-max-new-tokens", "6",
              "--dtype", "float32", "--device", "cpu"])
    assert info.value.code == 0
    (run,) = mlflow.search_runs(experiment_names=["extract"], output_format="list")
    client = MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "extract/val_pass")] == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"round_00", "round_01", "round_02",
                                                                       "best_experience.txt"}
    best_round = int(run.data.metrics["extract/best_round"])
    expected = "Experience: PLAN" if best_round == 0 else Path(client.download_artifacts(
        run.info.run_id, f"round_{best_round:02d}/experience.txt")).read_text()
    assert out.read_text().strip() == expected.strip()


def test_extract_command_rejects_bad_arguments(capsys):
    from lightning_ctx.cli import main

    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", "x", "--out", "y", "--games", "0"])
    assert info.value.code == 2 and "--games" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["extract", "--model", "x", "--out", "y", "--env-id", "Sokoban-v0"])
    assert info.value.code == 2 and "-raw" in capsys.readouterr().err
