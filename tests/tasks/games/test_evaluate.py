"""Episode-level metrics counted by hand, and the two passes over the same seeds with a scripted player."""

import math

import pytest

from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import ChatFormat
from lightning_ctx.tasks.games.env import GameFactory
from lightning_ctx.tasks.games.evaluate import GameSummary, evaluate_games, game_metrics
from tests.tasks.games.players import LiveGames, scripted_sampler, state_plan


def test_metrics_by_hand():
    # four games: (won without, won with) = (T, T), (T, F), (F, T), (F, F)
    no_ctx = GameSummary([True, True, False, False], [1.0, 1.0, 0.5, 0.0], [2, 3, 5, 1], [0, 0, 1, 2], [8, 12, 20, 4])
    ctx = GameSummary([True, False, True, False], [1.0, 0.2, 1.0, 0.0], [2, 1, 4, 1], [0, 0, 0, 1], [8, 4, 16, 8])
    m = game_metrics(no_ctx, ctx)
    assert m["pass_no_ctx"] == 0.5 and m["pass_ctx"] == 0.5 and m["both_pass"] == 0.25
    assert m["harm"] == 0.5 and m["help"] == 0.5  # 1 of 2 won without is lost with; 1 of 2 lost without is won with
    assert m["turns_no_ctx"] == 11 / 4 and m["invalid_rate_no_ctx"] == 3 / 11 and m["invalid_rate_ctx"] == 1 / 8
    assert m["reward_ctx"] == pytest.approx(2.2 / 4) and m["len_inflation"] == pytest.approx(36 / 44 - 1)
    none_won = game_metrics(GameSummary([False], [0.0], [1], [0], [3]), GameSummary([True], [1.0], [1], [0], [3]))
    assert math.isnan(none_won["harm"]) and none_won["help"] == 1.0  # undefined ratios are NaN, never 0


def test_same_seeds_with_and_without_the_experience(tiny_qwen3, monkeypatch):
    """The player wins only when the experience is in its system message: pass_ctx 1, pass_no_ctx 0, help 1."""
    tok = load_tokenizer(tiny_qwen3)
    live = LiveGames(monkeypatch)

    def respond(game, text):
        return f"I go [{state_plan(game)[0]}]" if "PLAN" in text else "no move at all"

    sampler = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, respond, live=live)
    chat = ChatFormat(tok, [tok.eos_token_id])
    result = evaluate_games(sampler, chat, GameFactory("FrozenLake-v0-raw", 8), [3, 5, 7], "Experience: PLAN",
                            tok.pad_token_id, batch_size=2)
    m = result.metrics
    assert m["pass_no_ctx"] == 0 and m["pass_ctx"] == 1 and m["help"] == 1 and math.isnan(m["harm"])
    assert m["invalid_rate_no_ctx"] == 1.0 and m["turns_no_ctx"] == 2 and m["invalid_rate_ctx"] == 0
    seeds = [g.seed for g in live.games]
    assert seeds == [3, 5, 7, 3, 5, 7]  # the same seeds both ways
    row = result.transcripts[0]
    assert row["seed"] == 3 and row["passed_ctx"] and not row["passed_no_ctx"]
    assert row["transcript_ctx"][0] == {"role": "system", "content": "Experience: PLAN"}
    assert row["transcript_no_ctx"][0]["role"] == "user" and row["reason_no_ctx"].startswith("Invalid Move")
