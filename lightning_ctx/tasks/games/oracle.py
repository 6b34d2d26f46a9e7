"""Playability oracle for the text games: an exact solver and a random legal-move player (pure Python).

A board is read from TextArena's own state right after ``reset`` (``read_board``); its moves follow TextArena
0.7.4's rules as written in ``FrozenLakeEnv`` / ``SokobanEnv``:

* FrozenLake: a move off the grid is refused (an invalid move, the player stays); a hole ends the game lost, the
  goal ends it won.
* Sokoban: a move into a wall, or pushing a box into a wall, another box or off the grid, is refused; a box is
  pushed one cell, never pulled. The game is won after a move that leaves every box *marked* on a target: a box is
  marked when a push lands it on one (TextArena marks no box at reset, even one generated on a target, so such a
  box must be moved off and back). No move loses a Sokoban game; only the turn limit ends it.

``solve`` is a breadth-first search over (player, boxes) states: the shortest winning move sequence within the
horizon, or None. ``random_win_probability`` is the exact chance that a player choosing uniformly among the moves
TextArena accepts wins within the horizon (the expectation over every play, no sampling noise); ``random_moves``
is one seeded play of that player. The horizon is our turn limit, capped by TextArena's own (100 for FrozenLake,
30 for Sokoban as registered), both far above the 5 model turns the paper uses. The solver's moves, replayed
through TextArena, win (tests/tasks/games/test_oracle.py checks it on many seeds of both games).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Union

#: Move words in a fixed order (the random player draws among the accepted ones in this order).
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
WON, LOST = "won", "lost"
CACHE_SIZE = 1 << 16  # seeds kept solved per process (a board is a few hundred bytes)

Cell = tuple[int, int]


def _add(cell: Cell, move: str) -> Cell:
    dr, dc = MOVES[move]
    return cell[0] + dr, cell[1] + dc


@dataclass(frozen=True)
class FrozenLakeBoard:
    """A FrozenLake grid: the state is the player's cell."""

    size: int
    holes: frozenset
    goal: Cell
    start: Cell
    turn_limit: int  # TextArena's own

    @property
    def initial(self) -> Cell:
        return self.start

    def step(self, state: Cell, move: str) -> Optional[tuple[Cell, Optional[str]]]:
        """``(next state, WON / LOST / None)``, or None when TextArena refuses the move."""
        r, c = _add(state, move)
        if not (0 <= r < self.size and 0 <= c < self.size):
            return None
        return (r, c), (LOST if (r, c) in self.holes else WON if (r, c) == self.goal else None)


SokobanState = tuple[Cell, frozenset, frozenset]  # player, boxes, boxes marked on a target


@dataclass(frozen=True)
class SokobanBoard:
    """A Sokoban room: the state is ``(player, boxes, marked boxes)``."""

    shape: tuple[int, int]
    walls: frozenset
    targets: frozenset
    start: SokobanState
    num_boxes: int  # TextArena's count for a win (the env's ``num_boxes``)
    turn_limit: int

    @property
    def initial(self) -> SokobanState:
        return self.start

    def _open(self, cell: Cell) -> bool:
        return 0 <= cell[0] < self.shape[0] and 0 <= cell[1] < self.shape[1] and cell not in self.walls

    def step(self, state: SokobanState, move: str) -> Optional[tuple[SokobanState, Optional[str]]]:
        player, boxes, marked = state
        nxt = _add(player, move)
        if not self._open(nxt):
            return None
        if nxt in boxes:
            beyond = _add(nxt, move)
            if not self._open(beyond) or beyond in boxes:
                return None
            boxes = (boxes - {nxt}) | {beyond}
            marked = (marked - {nxt}) | ({beyond} if beyond in self.targets else set())
        state = (nxt, frozenset(boxes), frozenset(marked))
        return state, (WON if len(marked) == self.num_boxes else None)


Board = Union[FrozenLakeBoard, SokobanBoard]


def read_board(env) -> Board:
    """The board of a TextArena FrozenLake / Sokoban environment right after ``reset``, from its own state."""
    while type(env).__name__ not in ("FrozenLakeEnv", "SokobanEnv") and hasattr(env, "env"):
        env = env.env  # a TextArena wrapper keeps the game as .env
    kind = type(env).__name__
    if kind == "FrozenLakeEnv":
        st = env.state.game_state
        grid = st["grid"]
        holes = frozenset((r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if v == "H")
        return FrozenLakeBoard(int(env.size), holes, tuple(st["goal_pos"]), tuple(st["player_pos"]),
                               int(env.state.max_turns))
    if kind == "SokobanEnv":
        fixed, room = env.room_fixed, env.room_state
        cells = [(r, c) for r in range(fixed.shape[0]) for c in range(fixed.shape[1])]
        start = (tuple(int(x) for x in env.player_position),
                 frozenset(x for x in cells if room[x] in (3, 4)), frozenset(x for x in cells if room[x] == 3))
        return SokobanBoard(tuple(int(n) for n in fixed.shape), frozenset(x for x in cells if fixed[x] == 0),
                            frozenset(x for x in cells if fixed[x] == 2), start, int(env.num_boxes),
                            int(env.max_turns))
    raise ValueError(f"the playability oracle knows FrozenLake and Sokoban, not {kind}")


def horizon(board: Board, max_turns: int) -> int:
    return min(int(max_turns), board.turn_limit)


def solve(board: Board, max_turns: Optional[int]) -> Optional[list[str]]:
    """The shortest move sequence that wins within ``max_turns`` moves (None: no limit but TextArena's own), or
    None when no sequence does."""
    limit = board.turn_limit if max_turns is None else horizon(board, max_turns)
    queue, seen = deque([(board.initial, [])]), {board.initial}
    while queue:
        state, path = queue.popleft()
        if len(path) >= limit:
            continue
        for move in MOVES:
            result = board.step(state, move)
            if result is None:
                continue
            nxt, end = result
            if end == WON:
                return path + [move]
            if end is None and nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, path + [move]))
    return None


def legal_moves(board: Board, state) -> list[str]:
    """The moves TextArena accepts in ``state`` (FrozenLake: into a hole too)."""
    return [m for m in MOVES if board.step(state, m) is not None]


def random_moves(board: Board, max_turns: int, rng: random.Random) -> tuple[list[str], bool]:
    """One play of the random legal-move player: ``(moves, won)``."""
    state, moves = board.initial, []
    for _ in range(horizon(board, max_turns)):
        options = legal_moves(board, state)
        if not options:
            break
        move = rng.choice(options)
        moves.append(move)
        state, end = board.step(state, move)
        if end is not None:
            return moves, end == WON
    return moves, False


def random_win_probability(board: Board, max_turns: int) -> float:
    """Exact probability that the random legal-move player wins within ``max_turns`` moves."""
    memo: dict = {}

    def win(state, left: int) -> float:
        if left == 0:
            return 0.0
        key = (state, left)
        if key not in memo:
            options = [board.step(state, m) for m in legal_moves(board, state)]
            memo[key] = sum(1.0 if end == WON else 0.0 if end == LOST else win(nxt, left - 1)
                            for nxt, end in options) / len(options) if options else 0.0
        return memo[key]

    return win(board.initial, horizon(board, max_turns))


# -- seeded boards, cached ------------------------------------------------------------------------

def freeze(value: Any) -> Any:
    """A hashable copy of env_kwargs (mappings -> sorted item tuples, lists -> tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def make_kwargs(env_kwargs: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``env_kwargs`` as TextArena's constructors expect them: YAML lists become tuples (OPCD passes
    ``dim_room=(6, 6)``)."""
    return {str(k): tuple(v) if isinstance(v, list) else v for k, v in (env_kwargs or {}).items()}


def supported(env_id: str) -> bool:
    return env_id.startswith(("FrozenLake-", "Sokoban-"))


@lru_cache(maxsize=CACHE_SIZE)
def _board(env_id: str, frozen_kwargs: tuple, seed: int) -> Board:
    import textarena as ta

    saved = random.getstate()  # TextArena seeds Python's global random at reset; leave it as it was
    try:
        env = ta.make(env_id, **make_kwargs(dict(frozen_kwargs)))
        env.reset(num_players=1, seed=int(seed))
        return read_board(env)
    finally:
        random.setstate(saved)


def board(env_id: str, env_kwargs: Optional[Mapping[str, Any]], seed: int) -> Board:
    """The board TextArena builds for ``seed`` (cached per ``(env_id, env_kwargs, seed)``)."""
    return _board(env_id, freeze(env_kwargs or {}), int(seed))


@dataclass(frozen=True)
class SeedAnalysis:
    solution: Optional[tuple[str, ...]]  # the shortest win within the turn limit, None if none
    random_pass: float  # the random legal-move player's exact win probability

    @property
    def winnable(self) -> bool:
        return self.solution is not None


@lru_cache(maxsize=CACHE_SIZE)
def _analyse(env_id: str, frozen_kwargs: tuple, seed: int, max_turns: int) -> SeedAnalysis:
    b = _board(env_id, frozen_kwargs, seed)
    solution = solve(b, max_turns)
    return SeedAnalysis(None if solution is None else tuple(solution), random_win_probability(b, max_turns))


def analyse(env_id: str, env_kwargs: Optional[Mapping[str, Any]], seed: int, max_turns: int) -> SeedAnalysis:
    """Solver and random player on one seed (cached per ``(env_id, env_kwargs, seed, max_turns)``)."""
    return _analyse(env_id, freeze(env_kwargs or {}), int(seed), int(max_turns))


@dataclass(frozen=True)
class Playability:
    """The oracle over a list of seeds: ``winnable`` of ``checked`` games can be won within the turn limit."""

    winnable: int
    checked: int
    random_pass: float  # mean exact win probability of the random legal-move player
    shortest: tuple[int, ...]  # shortest-win lengths of the winnable games

    @property
    def fraction(self) -> float:
        return self.winnable / self.checked if self.checked else float("nan")


def playability(env_id: str, env_kwargs: Optional[Mapping[str, Any]], seeds: Iterable[int],
                max_turns: int) -> Playability:
    results = [analyse(env_id, env_kwargs, s, max_turns) for s in seeds]
    won = [r for r in results if r.winnable]
    return Playability(len(won), len(results),
                       sum(r.random_pass for r in results) / len(results) if results else float("nan"),
                       tuple(len(r.solution) for r in won))


def shortest_wins(env_id: str, env_kwargs: Optional[Mapping[str, Any]], seeds: Sequence[int]) -> list[int]:
    """Shortest win of each seed without our turn limit (TextArena's own only); unwinnable seeds left out."""
    out = []
    for s in seeds:
        solution = solve(board(env_id, env_kwargs, s), None)
        if solution is not None:
            out.append(len(solution))
    return out
