"""TextArena as the game engine: one single-player game, seeded, with our own turn limit (docs/design.md,
"Multi-turn episodes"; facts measured on textarena 0.7.4 in tests/tasks/games/test_env.py).

Only the ``-raw`` environments are used: they return the observations that are *new* since the last call
as ``(sender, text, ObservationType)`` tuples. What the model sees each turn:

* turn 1 (the first user message): the rules (``PROMPT``) and the board (``GAME_BOARD``), each block
  de-indented, separated by a blank line;
* after each move (the next user message): every new observation except the echo of the model's own move
  (``PLAYER_ACTION``, already in the assistant turn): what happened (``GAME_ACTION_DESCRIPTION`` /
  ``GAME_MESSAGE``), a warning after an invalid move (``GAME_ADMIN``) and the new board.

The model's reply is read as OPCD reads it (``last_action``): the *last* action keyword in it (``[up] [down] [left]
[right] [w] [a] [s] [d]``, exact and case-sensitive, every occurrence of each, last by position) is the move, and
only that, bracketed (``[down]``), is sent to TextArena, so "Moving [right] would be risky, so my final answer is
[down]" moves down (TextArena itself would take the first). A reply without one sends OPCD's placeholder
``[no valid action]``, which TextArena refuses as an invalid move. ``TextGame.moves`` keeps the raw replies and
``TextGame.actions`` what was sent.

An episode ends when the game ends (goal, hole, solved, or a second invalid move in a row: TextArena allows
one and warns) or after ``max_turns`` model turns (ours, usually far below the registry's limit). Pass =
reward == 1.0 (goal reached / every box on a target); the raw reward (TextArena's fraction of the journey or
of boxes placed; at our turn limit the same fraction of the unfinished game) and the reason are kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from lightning_ctx.errors import ConfigError
from lightning_ctx.tasks.games.oracle import make_kwargs

#: Environments used by the paper's text-game settings (any single-player ``-raw`` id of textarena works).
GAME_IDS = ("FrozenLake-v0-raw", "Sokoban-v0-raw")
TURN_LIMIT_REASON = "turn limit"
#: Move words for word-level tiny stand-ins (``save_tiny_checkpoint(..., extra_words=GAME_WORDS)``), so a random
#: model can emit valid moves.
GAME_WORDS = ["[up]", "[down]", "[left]", "[right]", "[w]", "[a]", "[s]", "[d]", "Current", "Board:", "P", "X", "O",
              "#", "_", "You", "moved", "move", "go", "invalid", "I", "experience", "Experience:", "plan", "PLAN"]
INVALID_MARK = "attempted an invalid move"  # TextArena's warning after the first invalid move
#: OPCD's action keywords (``_extract_action_from_response``) and the move each one sends.
ACTION_KEYS = {"[up]": "up", "[down]": "down", "[left]": "left", "[right]": "right",
               "[w]": "up", "[a]": "left", "[s]": "down", "[d]": "right"}
NO_ACTION = "[no valid action]"  # sent for a reply without an action: TextArena counts it as an invalid move


def last_action(reply: str) -> Optional[str]:
    """The move word of the last action keyword in ``reply`` (None without one), as OPCD reads a reply."""
    found = max(((reply.rfind(key), word) for key, word in ACTION_KEYS.items()), default=(-1, None))
    return found[1] if found[0] >= 0 else None


def action_text(reply: str) -> str:
    """What is sent to TextArena for ``reply``: its last action, bracketed, or ``NO_ACTION``."""
    word = last_action(reply)
    return f"[{word}]" if word else NO_ACTION


def import_textarena():
    try:
        import textarena
    except ImportError:
        raise ConfigError("the text games need TextArena: pip install 'lightning-ctx[games]' (or make install)",
                          field="data.task.env_id") from None
    return textarena


def check_env_id(env_id: str) -> None:
    """``env_id`` must be a registered ``-raw`` TextArena environment (see the module docstring)."""
    ta = import_textarena()
    from textarena.envs.registration import ENV_REGISTRY

    if env_id not in ENV_REGISTRY:
        raise ConfigError(f"is {env_id!r}, not a TextArena environment (e.g. {', '.join(GAME_IDS)})",
                          field="data.task.env_id")
    if not env_id.endswith("-raw"):
        raise ConfigError(f"is {env_id!r}: use the '-raw' variant ({env_id}-raw); the wrapped ones repeat the whole "
                          "game in every observation", field="data.task.env_id")
    del ta


def env_class(env_id: str) -> type:
    """The environment class registered for ``env_id``."""
    import importlib

    import_textarena()
    from textarena.envs.registration import ENV_REGISTRY

    entry = ENV_REGISTRY[env_id].entry_point
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def _kind(value: Any) -> str:
    return type(value).__name__


def check_env_kwargs(env_id: str, env_kwargs: Optional[Mapping[str, Any]], field: str = "data.task.env_kwargs") -> None:
    """``env_kwargs`` against the environment's constructor: every key one of its arguments, every value of its
    default's kind (a YAML list where the default is a tuple), then one environment made and reset with them.
    A failure is one ConfigError naming ``<field>.<key>`` (``data.task.env_kwargs.<key>``)."""
    if env_kwargs is None:
        return
    if not isinstance(env_kwargs, Mapping):
        raise ConfigError(f"must be a mapping of {env_id}'s constructor arguments, got {env_kwargs!r}",
                          field=field)
    cls = env_class(env_id)
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    for key, value in env_kwargs.items():
        field_name = f"{field}.{key}"
        if key not in params:
            raise ConfigError(f"is not an argument of {cls.__name__} ({env_id}); its arguments: "
                              f"{', '.join(params)}", field=field_name)
        default = params[key].default
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and (isinstance(value, int) or not isinstance(default, int))
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list)) and len(value) == len(default) \
                and all(_kind(v) == _kind(d) for v, d in zip(value, default))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"{cls.__name__} expects a value like its default {default!r}, got {value!r}",
                              field=field_name)
    try:
        _try_reset(env_id, env_kwargs)
    except Exception as err:  # noqa: BLE001 -- any failure of TextArena's constructor/reset is a bad value
        keys = list(env_kwargs)  # one key is the culprit; of several, the first that fails alone
        culprit = keys[0] if len(keys) == 1 else next((k for k in keys if _fails(env_id, {k: env_kwargs[k]})), None)
        where = f"{field}.{culprit}" if culprit else field
        raise ConfigError(f"{env_id} cannot build a board with {dict(env_kwargs)}: "
                          f"{type(err).__name__}: {err}".strip(), field=where) from None


def _try_reset(env_id: str, env_kwargs: Mapping[str, Any]) -> None:
    import random

    ta = import_textarena()
    saved = random.getstate()  # TextArena seeds Python's global random at reset
    try:
        ta.make(env_id, **make_kwargs(env_kwargs)).reset(num_players=1, seed=0)
    finally:
        random.setstate(saved)


def _fails(env_id: str, env_kwargs: Mapping[str, Any]) -> bool:
    try:
        _try_reset(env_id, env_kwargs)
    except Exception:  # noqa: BLE001
        return True
    return False


@dataclass
class GameOutcome:
    """How one episode ended."""

    reward: float
    passed: bool
    reason: str
    turns: int  # model turns played (invalid ones included)
    invalid_moves: int
    ended_by: str  # "game" (the environment ended it) or "turn_limit"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def observation_text(entries) -> str:
    """The user message for a list of raw observations (see the module docstring)."""
    parts = []
    for entry in entries:
        _, text, kind = entry
        if getattr(kind, "name", str(kind)) == "PLAYER_ACTION":
            continue
        text = inspect.cleandoc(str(text))
        if text:
            parts.append(text)
    return "\n\n".join(parts)


@dataclass
class TextGame:
    """One seeded TextArena game: ``reset() -> first user message``, ``step(move) -> (done, feedback)``.

    ``feedback`` is the next user message ("" once the game is over). ``outcome`` is set once done.
    """

    env_id: str
    seed: int
    max_turns: int = 5
    env_kwargs: dict = field(default_factory=dict)  # passed to ``textarena.make(env_id, **env_kwargs)``
    env: Any = field(default=None, repr=False)
    turns: int = 0
    invalid_moves: int = 0
    outcome: Optional[GameOutcome] = None
    moves: list[str] = field(default_factory=list)  # the player's raw replies
    actions: list[str] = field(default_factory=list)  # what was sent to TextArena for each (see last_action)

    def reset(self) -> str:
        ta = import_textarena()
        self.env = ta.make(self.env_id, **make_kwargs(self.env_kwargs))
        self.env.reset(num_players=1, seed=self.seed)
        self.turns, self.invalid_moves, self.outcome, self.moves, self.actions = 0, 0, None, [], []
        _, obs = self.env.get_observation()
        return observation_text(obs)

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def step(self, move: str) -> tuple[bool, str]:
        if self.env is None or self.done:
            raise RuntimeError(f"{self.env_id} seed {self.seed}: step() before reset() or after the game ended")
        self.turns += 1
        self.moves.append(move)
        self.actions.append(action_text(move))
        done, _ = self.env.step(self.actions[-1])
        _, obs = self.env.get_observation()
        feedback = observation_text(obs)
        if done:
            rewards, info = self.env.close()
            info = (info or {}).get(0, {})
            reward = float((rewards or {}).get(0, 0.0))
            self.invalid_moves += int(bool(info.get("invalid_move")))
            self._end(reward, str(info.get("reason", "")), "game")
            return True, ""
        self.invalid_moves += int(INVALID_MARK in feedback)
        if self.turns >= self.max_turns:
            self._end(self._partial_reward(), f"{TURN_LIMIT_REASON}: {self.max_turns} model turns", "turn_limit")
            return True, ""
        return False, feedback

    def _partial_reward(self) -> float:
        """TextArena's own progress fraction of an unfinished game (both games define it); 0 without one."""
        fraction = getattr(self.env, "_get_percentage_completion", None)
        reward = float(fraction()) if callable(fraction) else 0.0
        return min(reward, 0.999999)  # an unfinished game never passes

    def _end(self, reward: float, reason: str, ended_by: str) -> None:
        self.outcome = GameOutcome(reward=reward, passed=reward == 1.0, reason=reason, turns=self.turns,
                                   invalid_moves=self.invalid_moves, ended_by=ended_by)
        self.env = None  # free the board


def make_games(env_id: str, seeds: list[int], max_turns: int,
               env_kwargs: Optional[Mapping[str, Any]] = None) -> list[TextGame]:
    return [TextGame(env_id, int(s), max_turns, dict(env_kwargs or {})) for s in seeds]


@dataclass(frozen=True)
class GameFactory:
    """Picklable ``seeds -> [TextGame]`` for one environment, its constructor arguments and a turn limit
    (DataLoader workers can use it)."""

    env_id: str
    max_turns: int
    env_kwargs: dict = field(default_factory=dict, hash=False)

    def __call__(self, seeds) -> list[TextGame]:
        return make_games(self.env_id, list(seeds), self.max_turns, self.env_kwargs)
