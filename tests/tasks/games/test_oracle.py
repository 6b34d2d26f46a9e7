"""The playability oracle against TextArena 0.7.4 itself: the solver's moves win when replayed, its shortest win and
the random player's exact win probability equal an exhaustive search through TextArena's own ``step``."""

import ast
import copy
import random
from pathlib import Path

import pytest

from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import INVALID_MARK, TextGame

OPCD_FROZENLAKE = {"size": 3, "num_holes": 2, "randomize_start_goal": False}
OPCD_SOKOBAN = {"num_boxes": 1, "dim_room": [6, 6]}
GAMES = {"frozenlake_3x3": ("FrozenLake-v0-raw", OPCD_FROZENLAKE), "frozenlake_4x4": ("FrozenLake-v0-raw", {}),
         "sokoban_1_box": ("Sokoban-v0-raw", OPCD_SOKOBAN)}
VAL = 1_000_000  # the val split's first seed (datamodule.SPLIT_OFFSETS)


def textarena_search(env, depth: int):
    """Every move sequence of up to ``depth`` moves through TextArena's own ``step`` (a deep copy per move): the
    shortest win (None: none) and the win probability of a player choosing uniformly among the moves TextArena
    accepts (a refused move does not count as a turn there)."""
    if depth == 0:
        return None, 0.0
    accepted = []
    for move in oracle.MOVES:
        env2 = copy.deepcopy(env)
        turn = env2.state.turn
        done, _ = env2.step(f"[{move}]")
        if env2.state.turn > turn:
            accepted.append((env2, done))
    shortest, prob = None, 0.0
    for env2, done in accepted:
        if done:
            won = env2.state.rewards[0] == 1
            length, p = (1 if won else None), float(won)
        else:
            rest, p = textarena_search(env2, depth - 1)
            length = None if rest is None else rest + 1
        prob += p / len(accepted)
        if length is not None and (shortest is None or length < shortest):
            shortest = length
    return shortest, prob


def _env(env_id, env_kwargs, seed):
    import textarena as ta

    env = ta.make(env_id, **oracle.make_kwargs(env_kwargs))
    env.reset(num_players=1, seed=seed)
    return env


@pytest.mark.parametrize("game, depth, seeds", [("frozenlake_3x3", 5, 6), ("frozenlake_4x4", 6, 4),
                                                ("sokoban_1_box", 5, 14)])
def test_shortest_win_and_random_player_equal_an_exhaustive_textarena_search(game, depth, seeds):
    env_id, kwargs = GAMES[game]
    outcomes = set()
    for seed in range(VAL, VAL + seeds):
        shortest, prob = textarena_search(_env(env_id, kwargs, seed), depth)
        board = oracle.board(env_id, kwargs, seed)
        solution = oracle.solve(board, depth)
        assert (None if solution is None else len(solution)) == shortest, seed
        assert oracle.random_win_probability(board, depth) == pytest.approx(prob, rel=1e-12, abs=1e-15), seed
        outcomes.add(shortest is not None)
    if game == "sokoban_1_box":
        assert outcomes == {True, False}  # the seeds cover winnable and unwinnable boards


@pytest.mark.parametrize("game, max_turns, seeds", [("frozenlake_3x3", 5, 40), ("frozenlake_4x4", 12, 30),
                                                    ("sokoban_1_box", 5, 60), ("sokoban_1_box", 30, 30)])
def test_solutions_replayed_through_textarena_win(game, max_turns, seeds):
    env_id, kwargs = GAMES[game]
    solved = 0
    for seed in range(VAL + 100, VAL + 100 + seeds):
        solution = oracle.solve(oracle.board(env_id, kwargs, seed), max_turns)
        if solution is None:
            continue
        solved += 1
        game_ = TextGame(env_id, seed, max_turns=len(solution), env_kwargs=kwargs)
        game_.reset()
        for i, move in enumerate(solution):
            done, feedback = game_.step(f"Next I move [{move}].")
            assert done == (i == len(solution) - 1) and INVALID_MARK not in feedback
        o = game_.outcome
        assert o.passed and o.reward == 1.0 and o.ended_by == "game" and o.turns == len(solution), seed
    assert solved >= seeds // 2


def test_sokoban_with_three_boxes_replays_too():
    """TextArena's registered Sokoban (3 boxes): longer pushes, boxes blocking boxes."""
    for seed in (0, 1, 2):
        solution = oracle.solve(oracle.board("Sokoban-v0-raw", {}, seed), 30)
        assert solution is not None and len(solution) > 5
        game = TextGame("Sokoban-v0-raw", seed, max_turns=len(solution))
        game.reset()
        for move in solution:
            game.step(f"[{move}]")
        assert game.outcome.passed and game.outcome.turns == len(solution)


@pytest.mark.parametrize("game", ["frozenlake_3x3", "sokoban_1_box"])
def test_random_player_moves_are_legal_in_textarena(game):
    env_id, kwargs = GAMES[game]
    won = 0
    for seed in range(VAL, VAL + 40):
        board = oracle.board(env_id, kwargs, seed)
        for play in range(5):
            moves, wins = oracle.random_moves(board, 5, random.Random(seed * 10 + play))
            game_ = TextGame(env_id, seed, max_turns=5, env_kwargs=kwargs)
            game_.reset()
            for move in moves:
                _, feedback = game_.step(f"[{move}]")
                assert INVALID_MARK not in feedback, (seed, moves)
            assert game_.done and game_.invalid_moves == 0 and game_.outcome.passed == wins, (seed, moves)
            won += wins
    assert 0 < won < 200  # the check saw both outcomes


def test_random_player_plays_each_legal_move_uniformly():
    board = oracle.board("Sokoban-v0-raw", OPCD_SOKOBAN, VAL)
    rng = random.Random(0)
    n = 4000
    wins = sum(oracle.random_moves(board, 5, rng)[1] for _ in range(n))
    p = oracle.random_win_probability(board, 5)
    assert 0 < p < 1 and abs(wins / n - p) < 4 * (p * (1 - p) / n) ** 0.5


def test_opcd_frozenlake_boards_are_19_with_fixed_start_and_goal():
    """3x3 with 2 holes, start top-left, goal bottom-right: 21 ways to place the holes, minus the 2 that wall in the
    start or the goal; every board is won in 4 moves."""
    boards = {oracle.board("FrozenLake-v0-raw", OPCD_FROZENLAKE, s) for s in list(range(0, 3200, 7)) + [VAL]}
    assert {(b.start, b.goal) for b in boards} == {((0, 0), (2, 2))}
    assert len({b.holes for b in boards}) == 19
    assert {len(oracle.solve(b, 5)) for b in boards} == {4}


def test_a_box_generated_on_a_target_must_be_pushed_there():
    """TextArena marks no box at reset (room_state 3 is rewritten to 4), so a box that starts on a target counts
    only after a push lands it on one: the model follows that rule."""
    b = oracle.SokobanBoard((1, 4), frozenset(), frozenset({(0, 1), (0, 2)}),
                            ((0, 0), frozenset({(0, 1)}), frozenset()), 1, 30)
    (state, end) = b.step(b.initial, "right")
    assert end == oracle.WON and state[2] == {(0, 2)}
    assert b.step(b.initial, "left") is None  # off the grid
    stuck = oracle.SokobanBoard((1, 3), frozenset(), frozenset({(0, 1)}), ((0, 0), frozenset({(0, 1)}), frozenset()),
                                1, 30)
    assert oracle.solve(stuck, 10) is None and oracle.random_win_probability(stuck, 10) == 0.0


def test_analysis_is_cached_per_seed_and_turn_limit():
    oracle.analyse("FrozenLake-v0-raw", OPCD_FROZENLAKE, VAL + 7, 5)
    before = oracle._analyse.cache_info()
    again = oracle.analyse("FrozenLake-v0-raw", dict(OPCD_FROZENLAKE), VAL + 7, 5)
    after = oracle._analyse.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses and again.winnable
    assert not oracle.analyse("FrozenLake-v0-raw", OPCD_FROZENLAKE, VAL + 7, 3).winnable  # another limit, solved anew


def test_the_oracle_is_pure_python():
    path = Path(oracle.__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] in ("torch", "lightning", "transformers", "lightning_ctx")]
