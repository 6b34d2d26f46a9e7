"""The scripted FrozenLake players the game base (``builtin:games``) is pretrained on, and the experience notes that
switch between them (pure Python: no torch, no TextArena).

* **the experienced player** (a hole note in the experience): plays like the exact solver
  (:func:`lightning_ctx.tasks.games.oracle.solve`): the first move of the shortest path to G that avoids every hole,
  from wherever it stands (the solver's own tie-break between equally short paths);
* **the naive player** (no experience, or notes that never mention holes): walks toward G and ignores the holes: it
  draws uniformly among the moves that bring it closer to G. On OPCD's boards (3x3, 2 holes) it wins about a third
  of the games (``naive_win_probability``), the solver all of them, so the experience matters.

A reply is ``<think> REASONING </think> [move]`` (Qwen3's thinking format), or ``REASONING [move]`` after the empty
reasoning block the chat template writes with ``enable_thinking: false``. The reasoning reads the last board: where
the player stands and, for the experienced player, where the holes are (``at (1, 0) , holes (1, 1) (2, 0)``); the
naive one names the goal instead (``at (1, 0) , goal (2, 2)``). Writing what it reads before it moves is what lets a
model this small learn to play from the board in a few minutes of pretraining: without it, the move had to come out
of one lookup over a 300-token prompt, and 300 steps did not find it.

The experience is a list of notes (``- note`` lines; other lines are ignored). ``HOLE_NOTES`` teach
the holes; ``OTHER_NOTES`` are true but say nothing about them, so an experience made only of those leaves the base
naive (``lightning-ctx extract --writer template`` has to see a game lost in a hole before it writes a hole note).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from lightning_ctx.tasks.games.oracle import MOVES, FrozenLakeBoard, solve

Cell = tuple[int, int]

HOLE_NOTES = (
    "Holes (H) end the game at once: never step onto an H.",
    "Before each move, find the shortest path to G that avoids every H.",
    "When an H blocks the way, step sideways around it and go on toward G.",
)
OTHER_NOTES = (
    "A move off the grid is invalid, and two invalid moves in a row end the game.",
    "The start is the top-left cell and the goal G is the bottom-right cell.",
    "Reach G within 5 moves to win.",
    "Answer with one bracketed move such as [down].",
)
#: The experience the game world's configs ship (lightning_ctx/configs/games_world.yaml holds the same text).
BUILTIN_EXPERIENCE = "\n".join(f"- {note}" for note in (
    HOLE_NOTES[0], OTHER_NOTES[1], HOLE_NOTES[1], HOLE_NOTES[2], OTHER_NOTES[0], OTHER_NOTES[2]))

EXPERIENCED, NAIVE = "experienced", "naive"
PLAYERS = (EXPERIENCED, NAIVE)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def note_lines(experience: Optional[str]) -> list[str]:
    """The notes of an experience text (``- note`` lines, the dash dropped)."""
    return [line.strip()[2:].strip() for line in (experience or "").splitlines() if line.strip().startswith("- ")]


def knows_holes(experience: Optional[str]) -> bool:
    """Whether the base plays like the solver under ``experience``: one of its notes is a hole note."""
    return any(note in HOLE_NOTES for note in note_lines(experience))


def player_for(experience: Optional[str]) -> str:
    return EXPERIENCED if knows_holes(experience) else NAIVE


def solver_move(board: FrozenLakeBoard, cell: Cell) -> str:
    """The exact solver's first move from ``cell`` (shortest path to G around the holes, TextArena's own turn limit;
    every cell the player can stand on is connected to G on a TextArena board)."""
    path = solve(dataclasses.replace(board, start=cell), None)
    if not path:
        raise ValueError(f"no path to the goal from {cell} on a board with holes {sorted(board.holes)}")
    return path[0]


def naive_moves(board: FrozenLakeBoard, cell: Cell) -> dict[str, float]:
    """The naive player's move probabilities: uniform over the moves that bring it closer to G (holes ignored)."""
    (r, c), (gr, gc) = cell, board.goal
    closer = [m for m, (dr, dc) in MOVES.items()
              if abs(gr - r - dr) + abs(gc - c - dc) < abs(gr - r) + abs(gc - c)]
    return {m: 1.0 / len(closer) for m in closer}


def move_probabilities(player: str, board: FrozenLakeBoard, cell: Cell) -> dict[str, float]:
    if player == EXPERIENCED:
        return {solver_move(board, cell): 1.0}
    if player == NAIVE:
        return naive_moves(board, cell)
    raise ValueError(f"player must be {EXPERIENCED!r} or {NAIVE!r}, got {player!r}")


def cell_text(cell: Cell) -> str:
    return f"({cell[0]}, {cell[1]})"


def reasoning(player: str, board: FrozenLakeBoard, cell: Cell) -> str:
    """What the player writes before its move (see the module docstring)."""
    if player == EXPERIENCED:
        return f"at {cell_text(cell)} , holes " + " ".join(cell_text(h) for h in sorted(board.holes))
    return f"at {cell_text(cell)} , goal {cell_text(board.goal)}"


def reply_text(player: str, board: FrozenLakeBoard, cell: Cell, move: str, thinking: bool = True) -> str:
    """The reply ``player`` writes in ``cell`` for ``move``: its reasoning in a ``<think>`` block when the model
    thinks, before the move otherwise."""
    text = reasoning(player, board, cell)
    return f"{THINK_OPEN} {text} {THINK_CLOSE} [{move}]" if thinking else f"{text} [{move}]"


def win_probability(player: str, board: FrozenLakeBoard, max_turns: int, cell: Optional[Cell] = None) -> float:
    """Exact chance that ``player`` wins from ``cell`` (default: the start) within ``max_turns`` moves."""
    cell = board.start if cell is None else cell
    if max_turns <= 0:
        return 0.0
    total = 0.0
    for move, p in move_probabilities(player, board, cell).items():
        result = board.step(cell, move)
        if result is None:  # refused: the player stays (neither player makes such a move)
            total += p * win_probability(player, board, max_turns - 1, cell)
            continue
        nxt, end = result
        total += p * (1.0 if end == "won" else 0.0 if end == "lost" else
                      win_probability(player, board, max_turns - 1, nxt))
    return total


def mean_win_probability(player: str, boards: Sequence[FrozenLakeBoard], max_turns: int) -> float:
    return sum(win_probability(player, b, max_turns) for b in boards) / len(boards) if boards else float("nan")
