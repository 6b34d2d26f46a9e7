"""TextArena 0.7.4 through ``TextGame``: what the model sees, how episodes end, what is kept."""

import pickle

import pytest

from lightning_ctx.errors import ConfigError
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import (
    INVALID_MARK,
    NO_ACTION,
    GameFactory,
    TextGame,
    action_text,
    check_env_id,
    check_env_kwargs,
    last_action,
)
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


# -- the last action wins (OPCD's reading of a reply) ------------------------------------------------------------
OPCD_KWARGS = {"FrozenLake-v0-raw": {"size": 3, "num_holes": 2, "randomize_start_goal": False},
               "Sokoban-v0-raw": {"num_boxes": 1, "dim_room": [6, 6]}}


def _seed_where_right_and_down_differ(env_id):
    """A seed whose first move right and first move down are both accepted, keep the game going, and lead to
    different positions (so the test can tell which one was played)."""
    for seed in range(1_000_000, 1_000_200):
        board = oracle.board(env_id, OPCD_KWARGS[env_id], seed)
        right, down = (board.step(board.initial, m) for m in ("right", "down"))
        if right and down and right[1] is None and down[1] is None and right[0] != down[0]:
            return seed, board, down[0]
    raise AssertionError("no such seed")


@pytest.mark.parametrize("env_id", ["FrozenLake-v0-raw", "Sokoban-v0-raw"])
def test_the_last_action_in_a_reply_is_played(env_id):
    seed, board, after_down = _seed_where_right_and_down_differ(env_id)
    game = TextGame(env_id, seed, max_turns=5, env_kwargs=OPCD_KWARGS[env_id])
    game.reset()
    reply = "Moving [right] would be risky, so my final answer is [down]"
    done, feedback = game.step(reply)
    assert not done and INVALID_MARK not in feedback
    assert oracle.read_board(game.env).initial == after_down  # TextArena's own state: moved down, not right
    assert game.moves == [reply] and game.actions == ["[down]"] and game.invalid_moves == 0


def test_last_action_reads_every_keyword_by_position():
    assert last_action("Moving [right] would be risky, so my final answer is [down]") == "down"
    assert last_action("[w] first? No: [down]") == "down" and last_action("[down]... no, [w]") == "up"
    assert last_action("[s][a]") == "left" and last_action("go [d]") == "right"
    assert last_action("[Down] or [ up ] or down") is None  # exact keywords only, as OPCD matches them
    assert action_text("nothing here") == NO_ACTION and action_text("[a] then [right]") == "[right]"


def test_a_reply_without_an_action_is_an_invalid_move():
    game = TextGame("FrozenLake-v0-raw", 1_000_000, max_turns=5, env_kwargs=OPCD_KWARGS["FrozenLake-v0-raw"])
    game.reset()
    done, feedback = game.step("I am not sure where to go.")
    assert not done and INVALID_MARK in feedback and game.invalid_moves == 1 and game.actions == [NO_ACTION]
    done, _ = game.step("[down] it is")  # a valid move after one invalid one: the game goes on, as before
    assert not done and game.invalid_moves == 1 and game.actions == [NO_ACTION, "[down]"]
    done, feedback = game.step("hmm")
    assert not done and INVALID_MARK in feedback  # TextArena forgives one invalid move in a row
    done, _ = game.step("still no idea")
    o = game.outcome
    assert done and o.invalid_moves == 3 and o.turns == 4 and not o.passed and o.reason.startswith("Invalid Move")


# -- env_kwargs ---------------------------------------------------------------------------------------------------
def test_env_kwargs_reach_the_constructor_and_lists_become_tuples():
    game = TextGame("Sokoban-v0-raw", 0, env_kwargs={"num_boxes": 1, "dim_room": [6, 6]})
    game.reset()
    assert game.env.num_boxes == 1 and game.env.dim_room == (6, 6) and isinstance(game.env.dim_room, tuple)
    lake = TextGame("FrozenLake-v0-raw", 0, env_kwargs=OPCD_KWARGS["FrozenLake-v0-raw"])
    rows = [line for line in lake.reset().splitlines() if line.startswith("|")]
    assert len(rows) == 3 and all(row.count("|") == 4 for row in rows)  # a 3x3 board


@pytest.mark.parametrize("env_id, kwargs, field, message", [
    ("FrozenLake-v0-raw", {"sizee": 3}, "data.task.env_kwargs.sizee", "not an argument of FrozenLakeEnv"),
    ("FrozenLake-v0-raw", {"size": "3"}, "data.task.env_kwargs.size", "like its default 4"),
    ("FrozenLake-v0-raw", {"randomize_start_goal": 1}, "data.task.env_kwargs.randomize_start_goal", "default False"),
    ("FrozenLake-v0-raw", {"size": 0, "num_holes": 1}, "data.task.env_kwargs.size", "cannot build a board"),
    ("Sokoban-v0-raw", {"dim_room": [6]}, "data.task.env_kwargs.dim_room", r"like its default \(6, 6\)"),
    ("Sokoban-v0-raw", {"num_boxes": 1.5}, "data.task.env_kwargs.num_boxes", "default 3"),
    ("Sokoban-v0-raw", [1], "data.task.env_kwargs", "must be a mapping"),
])
def test_env_kwargs_errors_name_the_key(env_id, kwargs, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_env_kwargs(env_id, kwargs)
    assert err.value.field == field


def test_game_factory_carries_env_kwargs_and_pickles():
    factory = GameFactory("FrozenLake-v0-raw", 5, {"size": 3, "num_holes": 2})
    clone = pickle.loads(pickle.dumps(factory))
    (a,), (b,) = factory([1_000_003]), clone([1_000_003])
    assert clone == factory and a.reset() == b.reset() and b.env.size == 3 and b.env.num_holes == 2
