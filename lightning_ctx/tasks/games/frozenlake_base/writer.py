"""A scripted, template-filling experience writer for the game base (``lightning-ctx extract --writer template``).

The game base cannot write prose, so this writer stands in for the model's writing step: it reads the same writing
prompt a model would get (:func:`lightning_ctx.tasks.games.extract.writing_prompt`: the notes so far and the games
with how each ended) and fills in the notes the base was pretrained to read (:mod:`.players`), one per kind of
event it finds in the games:

| event in a game | note |
| --- | --- |
| lost by falling into a hole | ``HOLE_NOTES[0]`` (with it in the experience the base plays like the solver) |
| an invalid move | ``OTHER_NOTES[0]`` |
| lost at the turn limit | ``OTHER_NOTES[2]`` |
| won | ``OTHER_NOTES[1]`` |

A note already in the notes so far is not written again. ``accumulate`` prompts get the new notes only (they are
appended); ``revise`` prompts get the notes so far followed by the new ones. No model, no sampling: the same prompt
always gives the same notes.
"""

from __future__ import annotations

import re

from lightning_ctx.tasks.games.env import INVALID_MARK
from lightning_ctx.tasks.games.frozenlake_base import players as P

#: How :func:`lightning_ctx.tasks.games.extract.format_trajectory` opens a game.
GAME_HEADER = re.compile(r"^Game \d+: (won|lost) after \d+ moves \(reward [-\d.]+; (.*)\)$", re.M)
REVISE_MARK = "Current notes:"  # only the revise prompt has it (extract.REVISE_PROMPT)
MAX_NOTES = 3  # new notes per update, as the accumulate prompt asks

#: (test on one game's header reason and its rounds, note), in order of importance.
EVENTS = (
    (lambda won, reason, rounds: not won and "hole" in reason.lower(), P.HOLE_NOTES[0]),
    (lambda won, reason, rounds: INVALID_MARK in rounds or reason.lower().startswith("invalid"), P.OTHER_NOTES[0]),
    (lambda won, reason, rounds: not won and "turn limit" in reason, P.OTHER_NOTES[2]),
    (lambda won, reason, rounds: won, P.OTHER_NOTES[1]),
)


def game_events(prompt: str) -> list[tuple[bool, str, str]]:
    """``(won, reason, rounds text)`` of every game in a writing prompt."""
    heads = list(GAME_HEADER.finditer(prompt))
    return [(h.group(1) == "won", h.group(2), prompt[h.end(): nxt.start() if nxt else len(prompt)])
            for h, nxt in zip(heads, heads[1:] + [None])]


def template_notes(prompt: str) -> list[str]:
    """The notes the games in ``prompt`` call for that its notes so far lack (at most ``MAX_NOTES``)."""
    heads = GAME_HEADER.search(prompt)
    known = P.note_lines(prompt[: heads.start()] if heads else prompt)
    games = game_events(prompt)
    notes = [note for test, note in EVENTS if note not in known and any(test(*g) for g in games)]
    return notes[:MAX_NOTES]


class TemplateWriter:
    """``write(prompt) -> notes`` for :func:`lightning_ctx.tasks.games.extract.run_extraction` (see the module
    docstring)."""

    name = "template"

    def __call__(self, prompt: str) -> str:
        new = [f"- {note}" for note in template_notes(prompt)]
        if REVISE_MARK in prompt:
            heads = GAME_HEADER.search(prompt)
            before = prompt[: heads.start()] if heads else prompt
            new = [f"- {note}" for note in P.note_lines(before.split(REVISE_MARK, 1)[1])] + new
        return "\n".join(new)
