"""Scripted players for the text-game tests: a FrozenLake solver that reads the board from the last user
message, and helpers to turn a player into a sampler the episode loop can call."""

from __future__ import annotations

import re
from collections import deque

import torch

from lightning_ctx.rollout import Rollout, response_mask_from_ids

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def frozenlake_grid(text: str) -> list[list[str]] | None:
    """The last FrozenLake board in ``text`` as rows of ' ', 'P', 'H', 'G' cells."""
    boards = text.split("Current Board:")
    if len(boards) < 2:
        return None
    rows = [line for line in boards[-1].splitlines() if line.startswith("|")]
    return [[cell.strip() or " " for cell in row.strip("|").split("|")] for row in rows]


def frozenlake_plan(text: str) -> list[str]:
    """Shortest safe path from P to G on the last board in ``text`` (BFS)."""
    grid = frozenlake_grid(text)
    start = next((r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if v == "P")
    queue, seen = deque([(start, [])]), {start}
    while queue:
        (r, c), path = queue.popleft()
        if grid[r][c] == "G":
            return path
        for name, (dr, dc) in MOVES.items():
            nr, nc = r + dr, c + dc
            if 0 <= nr < len(grid) and 0 <= nc < len(grid[0]) and (nr, nc) not in seen and grid[nr][nc] != "H":
                seen.add((nr, nc))
                queue.append(((nr, nc), path + [name]))
    return []


def frozenlake_hole_move(text: str) -> str:
    """A move from P straight into a neighbouring hole ('' if none)."""
    grid = frozenlake_grid(text)
    r, c = next((r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if v == "P")
    for name, (dr, dc) in MOVES.items():
        nr, nc = r + dr, c + dc
        if 0 <= nr < len(grid) and 0 <= nc < len(grid[0]) and grid[nr][nc] == "H":
            return name
    return ""


class LiveGames:
    """Every ``TextGame`` reset while installed, so a scripted player can read the true board (a word-level tiny
    tokenizer turns most of the observation into [UNK]). The episode loop samples for the games still running, in
    the order they were reset: the rows of a sampler call are ``running()``."""

    def __init__(self, monkeypatch):
        from lightning_ctx.tasks.games.env import TextGame

        self.games = []
        real_reset = TextGame.reset

        def reset(game):
            self.games.append(game)
            return real_reset(game)
        monkeypatch.setattr(TextGame, "reset", reset)

    def running(self):
        return [g for g in self.games if not g.done]


def state_plan(game) -> list[str]:
    """Shortest safe FrozenLake path from the player's position, from the game's own state."""
    st = game.env.state.game_state
    grid = [list(row) for row in st["grid"]]
    (pr, pc) = st["player_pos"]
    grid = [["P" if (r, c) == (pr, pc) else (v if v in "HG" else " ") for c, v in enumerate(row)]
            for r, row in enumerate(grid)]
    board = "Current Board:\n" + "\n".join("|" + "|".join(f"  {v}  " for v in row) + "|" for row in grid)
    return frozenlake_plan(board)


def scripted_sampler(tokenizer, eos_id: int, pad_id: int, respond, calls: list | None = None, live=None):
    """A turn sampler (``(prompt_ids, prompt_mask) -> Rollout``) whose responses are ``respond(prompt text)`` (or
    ``respond(game, prompt text)`` with ``live``): a string (+ EOS) or ``(string, finished)``; the prompt text is
    what the model would have seen."""

    def sample(prompt_ids, prompt_mask, settings=None):
        rows = []
        games = live.running() if live is not None else None
        for k, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
            text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
            out = respond(games[k], text) if live is not None else respond(text)
            reply, finished = out if isinstance(out, tuple) else (out, True)
            rows.append(tokenizer(reply, add_special_tokens=False).input_ids + ([eos_id] if finished else []))
            if calls is not None:
                calls.append(text)
        width = max(max(len(r) for r in rows), 1)
        resp = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
        mask, lengths, finished = response_mask_from_ids(resp, [eos_id])
        return Rollout(prompt_ids, prompt_mask, resp.masked_fill(~mask, pad_id), mask, lengths, finished)

    return sample


def last_user_message(text: str) -> str:
    """The content of the last user turn of a ChatML-rendered text."""
    return re.split(r"<\|im_start\|>user", text)[-1]
