"""TextArena 0.7.4 through ``TextGame``: what the model sees, how episodes end, what is kept."""

import pytest

from lightning_ctx.errors import ConfigError
from lightning_ctx.tasks.games.env import TextGame, check_env_id
from tests.tasks.games.players import frozenlake_hole_move, frozenlake_plan


def test_first_message_is_rules_and_board_and_seeds_repeat():
    a, b, c = (TextGame("FrozenLake-v0-raw", s, 5) for s in (3, 3, 4))
    first = a.reset()
    assert first == b.reset() and first != c.reset()  # same seed, same board; another seed, another board
    assert first.startswith("Welcome to Frozen Lake!") and "Current Board:" in first and first.count("P") >= 1
    assert "\n\n+-----" in first  # rules and board blocks kept apart


def test_win_is_a_pass_with_reward_one():
    game = TextGame("FrozenLake-v0-raw", 3, max_turns=10)
    text = game.reset()
    for move in frozenlake_plan(text):
        done, feedback = game.step(f"I go [{move}]")
        if not done:
            assert "You moved" in feedback and "Current Board:" in feedback
            assert f"I go [{move}]" not in feedback  # the model's own move is not echoed back
    assert game.done and game.outcome.passed and game.outcome.reward == 1.0 and game.outcome.ended_by == "game"
    assert game.outcome.turns == len(frozenlake_plan(text)) and game.outcome.invalid_moves == 0


def test_hole_ends_with_partial_reward_and_reason():
    game = TextGame("FrozenLake-v0-raw", 3, max_turns=10)
    text = game.reset()
    move = frozenlake_hole_move(text)
    assert move  # seed 3: a hole right below the start
    done, feedback = game.step(f"[{move}]")
    assert done and feedback == ""
    o = game.outcome
    assert not o.passed and 0 < o.reward < 1 and "hole" in o.reason and o.turns == 1


def test_invalid_moves_warn_once_then_end_the_game():
    game = TextGame("Sokoban-v0-raw", 0, max_turns=5)
    game.reset()
    done, feedback = game.step("no action here")
    assert not done and "attempted an invalid move" in feedback and game.invalid_moves == 1
    done, _ = game.step("still nothing")
    o = game.outcome
    assert done and o.invalid_moves == 2 and not o.passed and o.reason.startswith("Invalid Move") and o.turns == 2


def test_our_turn_limit_ends_the_episode():
    game = TextGame("Sokoban-v0-raw", 0, max_turns=2)
    game.reset()
    assert game.step("[up]")[0] is False or game.done
    done, _ = game.step("[down]")
    o = game.outcome
    assert done and o.ended_by == "turn_limit" and o.turns == 2 and not o.passed and 0 <= o.reward < 1
    with pytest.raises(RuntimeError, match="after the game ended"):
        game.step("[up]")


def test_only_raw_environments():
    check_env_id("Sokoban-v0-raw")
    with pytest.raises(ConfigError, match="-raw"):
        check_env_id("Sokoban-v0")
    with pytest.raises(ConfigError, match="not a TextArena environment"):
        check_env_id("Nope-v0-raw")
