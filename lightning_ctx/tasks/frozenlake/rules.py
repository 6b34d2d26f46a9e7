"""FrozenLake as a text game (the OPCD paper's experiential-knowledge task); game, generator and verifier are
pure Python.

The prompt shows a grid map; the model answers with a sequence of moves; a verifier plays them.

Conventions (also in the README):

* **Map**: square (or rectangular) grid of the tiles ``S`` (start, exactly one), ``F`` (frozen, safe),
  ``H`` (hole) and ``G`` (goal, exactly one). Row 0 is the top row, column 0 the left column.
* **Answer field** (what the verifier receives as ``answer``): the map itself, rows joined by `` / ``,
  tiles separated by spaces, e.g. ``"S F F F / F H F H / F F F H / H F F G"``. A JSON object
  ``{"map": "S F / F G"}`` (or ``{"map": [["S", "F"], ["F", "G"]]}``) is accepted too. A gold answer
  is readable (``parse_answer``) only if the map is well formed *and* solvable, so a broken or
  unsolvable map in a JSONL file stops the run before training, naming its line.
* **Response**: move words ``UP``, ``DOWN``, ``LEFT``, ``RIGHT`` separated by spaces (commas and a
  final period are tolerated, case is ignored). ``UP`` = row - 1, ``DOWN`` = row + 1, ``LEFT`` =
  column - 1, ``RIGHT`` = column + 1. Moves are deterministic (no slippery ice).
* **Outcome**: reaching ``G`` = success, and the episode ends there as in Gym's FrozenLake: moves
  after ``G`` are not played (``FrozenLakeVerifier(strict=True)`` instead fails a response with
  moves after the goal). Stepping onto ``H`` = fail. Walking off the grid = fail (an invalid move,
  not a no-op as in Gym). An empty response, or any token that is not a move word = fail
  (malformed). Ending the moves anywhere but ``G`` = fail.

Records follow the usual schema ``{id, context, prompt, answer}``; ``context`` is a hint /
experience text (the privileged context to internalize), ``prompt`` the rendered map and
instruction, ``answer`` the map string; extra fields ``solution`` (one shortest path) and ``size``
are kept in the JSONL for inspection.

``python -m lightning_ctx.tasks.frozenlake.rules --out DIR`` writes ``train/val/test.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lightning_ctx.data.records import TaskRecord, write_jsonl

__all__ = ["TILES", "MOVES", "DEFAULT_HINT", "FrozenLakeVerifier", "frozenlake_verifier", "parse_map", "format_map",
           "parse_moves", "simulate", "shortest_path", "random_map", "render_prompt", "make_frozenlake_records",
           "write_splits", "main"]

TILES = ("S", "F", "H", "G")
MOVES = {"UP": (-1, 0), "DOWN": (1, 0), "LEFT": (0, -1), "RIGHT": (0, 1)}
ROW_SEPARATOR = " / "

DEFAULT_HINT = ("Holes are deadly. Plan a path around every H to reach G. "
                "UP moves one row up, DOWN one row down, LEFT and RIGHT one column. "
                "Never step off the map. Stop as soon as you reach G.")

PROMPT_TEMPLATE = ("Frozen lake map (S start, F frozen, H hole, G goal):\n{grid}\n"
                   "Answer with the moves from S to G, using the words UP DOWN LEFT RIGHT.")

Grid = tuple[tuple[str, ...], ...]

# Fraction of generated maps assigned to each split by a hash of the map (so splits never share a map).
SPLIT_BUCKETS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}


# -------------------------------------------------------------------------------------------------
# maps
# -------------------------------------------------------------------------------------------------

def format_map(grid: Sequence[Sequence[str]], row_separator: str = ROW_SEPARATOR) -> str:
    """``[["S", "F"], ["F", "G"]]`` -> ``"S F / F G"`` (the answer-field convention)."""
    return row_separator.join(" ".join(row) for row in grid)


def _find(grid: Grid, tile: str) -> list[tuple[int, int]]:
    return [(r, c) for r, row in enumerate(grid) for c, t in enumerate(row) if t == tile]


def parse_map(text: object) -> Optional[Grid]:
    """The map of an answer field (string ``"S F / F G"``, newline-separated rows, or JSON with ``map``).

    Returns None unless the grid is rectangular, uses only ``S F H G`` and has exactly one ``S`` and one ``G``.
    """
    rows: list[list[str]]
    if isinstance(text, str):
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError:
                return None
            return parse_map(obj.get("map")) if isinstance(obj, dict) else None
        lines = [ln for ln in re.split(r"\s*/\s*|\n", stripped) if ln.strip()]
        rows = [ln.split() for ln in lines]
    elif isinstance(text, (list, tuple)):
        rows = [list(r.split()) if isinstance(r, str) else list(r) for r in text]
    else:
        return None
    if not rows or not rows[0]:
        return None
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        return None
    grid = tuple(tuple(str(t).upper() for t in r) for r in rows)
    if any(t not in TILES for row in grid for t in row):
        return None
    if len(_find(grid, "S")) != 1 or len(_find(grid, "G")) != 1:
        return None
    return grid


def _step(grid: Grid, pos: tuple[int, int], move: str) -> Optional[tuple[int, int]]:
    dr, dc = MOVES[move]
    r, c = pos[0] + dr, pos[1] + dc
    if 0 <= r < len(grid) and 0 <= c < len(grid[0]):
        return r, c
    return None


def shortest_path(grid: Grid) -> Optional[list[str]]:
    """One shortest safe path from S to G as move words (BFS; fixed move order), or None if unsolvable."""
    start, goal = _find(grid, "S")[0], _find(grid, "G")[0]
    prev: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        pos = queue.popleft()
        if pos == goal:
            path = []
            while prev[pos] is not None:
                pos, move = prev[pos][0], prev[pos][1]
                path.append(move)
            return path[::-1]
        for move in MOVES:
            nxt = _step(grid, pos, move)
            if nxt is None or nxt in prev or grid[nxt[0]][nxt[1]] == "H":
                continue
            prev[nxt] = (pos, move)
            queue.append(nxt)
    return None


def random_map(size: int = 4, hole_prob: float = 0.2, rng: Optional[random.Random] = None,
               max_tries: int = 10_000) -> Grid:
    """A solvable ``size x size`` map: S top-left, G bottom-right, each other tile a hole with ``hole_prob``."""
    if size < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    if not 0.0 <= hole_prob < 1.0:
        raise ValueError(f"hole_prob must be in [0, 1), got {hole_prob}")
    rng = rng or random.Random()
    for _ in range(max_tries):
        rows = [["H" if rng.random() < hole_prob else "F" for _ in range(size)] for _ in range(size)]
        rows[0][0], rows[-1][-1] = "S", "G"
        grid = tuple(tuple(r) for r in rows)
        if shortest_path(grid) is not None:
            return grid
    raise RuntimeError(f"no solvable {size}x{size} map in {max_tries} tries with hole_prob={hole_prob}")


# -------------------------------------------------------------------------------------------------
# responses and the verifier
# -------------------------------------------------------------------------------------------------

def parse_moves(response: str) -> Optional[list[str]]:
    """Move words of a response (``UP DOWN LEFT RIGHT``; case-insensitive; commas / final period ok).

    None if the response is empty or contains any other token (malformed).
    """
    text = response.strip().rstrip(".").strip()
    tokens = [t for t in re.split(r"[\s,]+", text) if t]
    if not tokens:
        return None
    moves = [t.upper() for t in tokens]
    if any(m not in MOVES for m in moves):
        return None
    return moves


@dataclass(frozen=True)
class Outcome:
    """Result of playing a response on a map. ``status``: ``goal`` | ``hole`` | ``off_grid`` |
    ``malformed`` | ``stopped`` (moves ran out before G) | ``after_goal`` (strict mode: moves after G)."""

    status: str
    steps: int  # moves played (including the one that ended the episode)
    position: Optional[tuple[int, int]] = None

    @property
    def success(self) -> bool:
        return self.status == "goal"


def simulate(grid: Grid, moves: Optional[Sequence[str]], strict: bool = False) -> Outcome:
    """Play ``moves`` from S. The episode ends on G (success), H (fail) or off the grid (fail)."""
    if moves is None:
        return Outcome("malformed", 0)
    pos = _find(grid, "S")[0]
    for i, move in enumerate(moves, start=1):
        nxt = _step(grid, pos, move)
        if nxt is None:
            return Outcome("off_grid", i, pos)
        pos = nxt
        tile = grid[pos[0]][pos[1]]
        if tile == "H":
            return Outcome("hole", i, pos)
        if tile == "G":
            if strict and i < len(moves):
                return Outcome("after_goal", i, pos)
            return Outcome("goal", i, pos)
    return Outcome("stopped", len(moves), pos)


class FrozenLakeVerifier:
    """``(response, answer) -> bool``: play the response's moves on the map stored in ``answer``.

    ``strict``: fail responses that keep moving after reaching G (default: the episode ends at G
    and later moves are ignored, as in Gym).
    """

    def __init__(self, strict: bool = False):
        self.strict = strict

    @staticmethod
    def parse_answer(answer: str) -> Optional[Grid]:
        """The map in a gold answer, or None when it is malformed or has no safe path from S to G."""
        grid = parse_map(answer)
        if grid is None or shortest_path(grid) is None:
            return None
        return grid

    def outcome(self, response: str, answer: str) -> Outcome:
        grid = parse_map(answer)
        if grid is None:
            raise ValueError(f"not a FrozenLake map: {answer!r}")
        return simulate(grid, parse_moves(response), strict=self.strict)

    def __call__(self, response: str, answer: str) -> bool:
        grid = parse_map(answer)
        if grid is None:
            return False
        return simulate(grid, parse_moves(response), strict=self.strict).success

    def __repr__(self) -> str:
        return f"FrozenLakeVerifier(strict={self.strict})"


#: The verifier ``build_verifier("frozenlake")`` returns.
frozenlake_verifier = FrozenLakeVerifier()


# -------------------------------------------------------------------------------------------------
# records
# -------------------------------------------------------------------------------------------------

def render_prompt(grid: Grid, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt: the map one row per line, then the instruction."""
    return template.format(grid="\n".join(" ".join(row) for row in grid))


def _bucket(grid: Grid) -> int:
    return int(hashlib.sha256(format_map(grid).encode()).hexdigest(), 16) % 100


def make_frozenlake_records(n: int, size: int = 4, hole_prob: float = 0.2, seed: int = 0, split: str = "train",
                            context: str = DEFAULT_HINT, prompt_template: str = PROMPT_TEMPLATE,
                            as_dicts: bool = True) -> list:
    """``n`` distinct solvable maps for ``split`` (``train`` | ``val`` | ``test``), deterministic in ``seed``.

    A map belongs to exactly one split (by a hash of the map: 80 / 10 / 10 %), so splits never share
    a map, whatever their sizes. Returns JSON-ready dicts (``as_dicts``) or ``TaskRecord`` objects.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_BUCKETS)}, got {split!r}")
    lo, hi = SPLIT_BUCKETS[split]
    rng = random.Random(f"frozenlake:{seed}:{size}:{hole_prob}:{split}")
    seen: set[Grid] = set()
    out = []
    budget = 200 * n + 10_000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"could not draw {n} distinct solvable {size}x{size} maps for split {split!r} "
                               f"(hole_prob={hole_prob}); ask for fewer or use a larger size")
        grid = random_map(size, hole_prob, rng)
        if grid in seen or not lo <= _bucket(grid) < hi:
            continue
        seen.add(grid)
        solution = shortest_path(grid)
        rec = {"id": f"frozenlake-{split}-{len(out)}", "context": context,
               "prompt": render_prompt(grid, prompt_template), "answer": format_map(grid),
               "solution": " ".join(solution), "size": size}
        out.append(rec)
    return out if as_dicts else [TaskRecord.from_dict(r) for r in out]


def write_splits(out_dir: str | Path, n_train: int = 1000, n_val: int = 100, n_test: int = 100, size: int = 4,
                 hole_prob: float = 0.2, seed: int = 0, context: str = DEFAULT_HINT) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` under ``out_dir`` (splits with n = 0 skipped)."""
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n > 0:
            recs = make_frozenlake_records(n, size=size, hole_prob=hole_prob, seed=seed, split=split, context=context)
            out[split] = write_jsonl(recs, Path(out_dir) / f"{split}.jsonl")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_ctx.tasks.frozenlake.rules",
                                description="Write FrozenLake train/val/test JSONL records (solvable maps only).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--hole-prob", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", default=DEFAULT_HINT, help="the privileged hint text (the context)")
    args = p.parse_args(argv)
    paths = write_splits(args.out, args.n_train, args.n_val, args.n_test, args.size, args.hole_prob, args.seed,
                         args.context)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
