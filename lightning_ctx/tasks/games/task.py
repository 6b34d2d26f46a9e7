"""``GamesTask``: seeded TextArena games per split, the experience as the context, episode batches.

A record is one game: ``id = "<env_id>:<seed>"``, ``context`` = the experience, ``meta["seed"]``. The training
loader yields :class:`~lightning_ctx.rollout_episodes.EpisodeBatch` objects: ``OnPolicyDistillation`` plays them
with the student (without the experience) and scores them with the teacher (with it).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_info

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import TASK_PREFIX, DataView, Task
from lightning_ctx.errors import ConfigError, DataError
from lightning_ctx.knobs import ArgsCheck, at_least, check_class_args, existing_file, one_of
from lightning_ctx.rollout_episodes import (
    EPISODE_FORMATS,
    HISTORIES,
    ChatFormat,
    EpisodeBatch,
    EpisodeFormat,
    PerTurnFormat,
    build_format,
)
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import GameFactory, check_env_id, check_env_kwargs
from lightning_ctx.textfiles import read_text

#: Seed ranges of the splits: split k draws seeds ``data_seed * 10**7 + k * 10**6 + i``, so splits never share a
#: seed, but boards do repeat across splits where there are few: OPCD's FrozenLake (3x3, 2 holes, start top-left,
#: goal bottom-right) has 19 distinct boards, the registry's 4x4 with 3 holes a few hundred.
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
#: OPCD's environment settings (microsoft/LMOps opcd/verl/verl/trainer/ppo/ray_trainer.py), used when
#: ``env_kwargs`` is not set; ``env_kwargs: {}`` gives TextArena's registered ones (4x4 with 3 holes, 3 boxes:
#: no game can be won in 5 moves).
PAPER_ENV_KWARGS = {"FrozenLake-v0-raw": {"size": 3, "num_holes": 2, "randomize_start_goal": False},
                    "Sokoban-v0-raw": {"num_boxes": 1, "dim_room": [6, 6]}}
#: A split where fewer games than this can be won within max_turns cannot measure anything: a config error.
MIN_PLAYABLE = 0.10
#: The train split is checked on this many of its games (evenly spread) when larger; val/test on every game.
TRAIN_CHECK_GAMES = 512
PROBE_GAMES = 8  # first games of each split rendered to size the longest first prompt
PROBE_MOVES = ("[right]", "[down]", "no move")  # moves whose feedback sizes a user turn (a move and a warning)
FEEDBACK_MARGIN = 16  # tokens on top of the longest probed feedback turn
ACTION_LINE_TOKENS = 16  # per_turn with history: actions: an earlier move's line ("Your move: [down]") at most


class EpisodeCollator:
    """``[(draw, record)] -> EpisodeBatch`` (picklable)."""

    def __init__(self, factory: GameFactory, fmt: EpisodeFormat, context: str, pad_token_id: int):
        self.factory, self.fmt, self.context, self.pad_token_id = factory, fmt, context, pad_token_id

    def __call__(self, items: list) -> EpisodeBatch:
        records = [it[1] if isinstance(it, tuple) else it for it in items]
        return EpisodeBatch([r.id for r in records], [int(r.meta["seed"]) for r in records], self.context,
                            self.factory, self.fmt, self.pad_token_id)


def env_kwargs_for(env_id: str, env_kwargs: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``env_kwargs`` as used: as given, or ``PAPER_ENV_KWARGS`` when unset."""
    return dict(PAPER_ENV_KWARGS.get(env_id, {}) if env_kwargs is None else env_kwargs)


def split_seeds(data_seed: int, split: str, n: int) -> list[int]:
    base = data_seed * 10_000_000 + SPLIT_OFFSETS[split]
    return [base + i for i in range(n)]


def checked_seeds(seeds: list[int], split: str) -> list[int]:
    """The seeds the playability check solves: all of val/test, an evenly spread sample of a large train split."""
    if split != "train" or len(seeds) <= TRAIN_CHECK_GAMES:
        return seeds
    return [seeds[i * len(seeds) // TRAIN_CHECK_GAMES] for i in range(TRAIN_CHECK_GAMES)]


def playability_report(args: Mapping[str, Any]) -> dict[str, oracle.Playability]:
    """``env_kwargs`` checked against the environment, then the oracle on each split (see ``GamesTask``; ``args``
    are the task's, with the DataModule's ``max_eval_items`` when known): one ConfigError for a bad key or value, or
    for a split below ``MIN_PLAYABLE``."""
    env_id, env_kwargs, max_turns = args["env_id"], args.get("env_kwargs"), int(args["max_turns"])
    check_env_id(env_id)
    check_env_kwargs(env_id, env_kwargs)
    env_kwargs = env_kwargs_for(env_id, env_kwargs)
    if not oracle.supported(env_id):
        return {}
    report = {}
    for split in ("val", "test", "train"):  # the evaluated splits first: a refusal comes sooner
        n = int(args[f"n_{split}"])
        if split != "train" and args.get("max_eval_items") is not None:
            n = min(n, int(args["max_eval_items"]))
        if n <= 0:
            continue
        seeds = checked_seeds(split_seeds(int(args["data_seed"]), split, n), split)
        try:
            found = report[split] = oracle.playability(env_id, env_kwargs, seeds, max_turns)
        except (RuntimeError, ValueError) as err:  # TextArena could not build one of the boards
            raise ConfigError(f"{env_id} cannot build every {split} board with {env_kwargs}: {err}",
                              field=f"{TASK_PREFIX}env_kwargs") from None
        if found.fraction < MIN_PLAYABLE:
            raise _unplayable(env_id, env_kwargs, max_turns, split, n, found, seeds)
    return report


def _unplayable(env_id, env_kwargs, max_turns, split, n, found, seeds) -> ConfigError:
    sample = f" (a sample of {found.checked} of its {n} games)" if found.checked < n else ""
    shortest = oracle.shortest_wins(env_id, env_kwargs, seeds[:32])
    need = int(statistics.median(shortest)) if shortest else None
    how = (f"the median shortest win is {need} moves: raise {TASK_PREFIX}max_turns to {need} or more, or give smaller "
           "boards" if need else "no win at all: give smaller boards")
    return ConfigError(
        f"{found.fraction:.1%} of the {split} games{sample} can be won within {max_turns} moves ({found.winnable} "
        f"of {found.checked}; {env_id}, env_kwargs {dict(env_kwargs or {})}), below the {MIN_PLAYABLE:.0%} a run "
        f"needs to measure anything; {how} through {TASK_PREFIX}env_kwargs (OPCD: FrozenLake size 3, num_holes 2, "
        "randomize_start_goal false; Sokoban num_boxes 1, dim_room [6, 6])",
        field=f"{TASK_PREFIX}max_turns" if need else f"{TASK_PREFIX}env_kwargs")


class GamesTask(Task):
    """Multi-turn text games (TextArena) with experiential knowledge as the context.

    Args:
        env_id: a single-player ``-raw`` TextArena environment (``FrozenLake-v0-raw``, ``Sokoban-v0-raw``).
        env_kwargs: the environment's constructor arguments, ``textarena.make(env_id, **env_kwargs)`` (a YAML list
            becomes a tuple), checked against the constructor before anything runs. None (default): OPCD's values
            for the two paper games (``PAPER_ENV_KWARGS``: FrozenLake ``size: 3, num_holes: 2,
            randomize_start_goal: false``; Sokoban ``num_boxes: 1, dim_room: [6, 6]``); ``{}``: TextArena's
            registered ones.
        max_turns: model turns per episode (OPCD: 5); the game may end earlier (win, loss, invalid moves).
        n_train / n_val / n_test: games (seeds) per split; 0 = no such split.
        data_seed: shifts every split's seed range (see ``SPLIT_OFFSETS``).
        experience / experience_file: the context c, inline or from a file (``lightning-ctx extract`` writes
            one); the file wins when both are set.
        episode_format: ``per_turn`` (OPCD: every model turn is one sample, its prompt one user message holding the
            game so far as text) or ``single_sequence`` (the episode as one chat); see
            :mod:`lightning_ctx.rollout_episodes`. Either way every scored token is scored under exactly the prefix
            it was sampled with.
        history: ``per_turn`` only: how earlier moves appear in later prompts: ``actions`` (the action the game
            received, as in OPCD) or ``replies`` (the reply as written, its reasoning dropped unless
            ``keep_reasoning``).
        turn_tokens: tokens budgeted per model turn when sizing an episode (keep it at ``model.max_new_tokens``):
            ``longest_prompt()`` is the longest prefix the last turn is sampled from, so the position check and a
            static KV cache (sized once, at the rollout warm-up) cover whole episodes.
        enable_thinking: passed to chat templates that read it (Qwen3); None = the template's default.
        keep_reasoning: later turns see earlier replies with their ``<think>`` blocks (false: without them, as Qwen3's
            template does to earlier turns). Never changes what is scored: a reply is scored whole.

    The DataModule's ``batch_size`` / ``eval_batch_size`` count games; its ``max_prompt_length`` bounds the first
    prompt with the experience.

    Playability, before anything runs (the CLI checks it with the other knobs, before any model loads; a Python
    user's DataModule on ``connect``): the oracle (:mod:`lightning_ctx.tasks.games.oracle`) solves every evaluated
    val/test game (``data.max_eval_items`` caps them) and up to ``TRAIN_CHECK_GAMES`` train games (evenly spread); a
    split where fewer than ``MIN_PLAYABLE`` of them can be won within ``max_turns`` is a ConfigError. The fractions
    are printed, one line per split, and kept in ``playability``.
    """

    KNOB_CHECKS = (at_least("max_turns", 1), at_least("turn_tokens", 1), at_least("n_train", 1), at_least("n_val", 0),
                   at_least("n_test", 0), at_least("data_seed", 0), existing_file("experience_file"),
                   one_of("episode_format", EPISODE_FORMATS), one_of("history", HISTORIES),
                   # env_kwargs and playability need several arguments (and data.max_eval_items) and report measured
                   # numbers (cached, so the CLI's and connect's runs cost one)
                   ArgsCheck(lambda args: playability_report(args)))

    def __init__(self, env_id: str = "FrozenLake-v0-raw", max_turns: int = 5, n_train: int = 1000, n_val: int = 128,
                 n_test: int = 0, data_seed: int = 0, experience: str = "", experience_file: Optional[str] = None,
                 episode_format: str = "per_turn", history: str = "actions", turn_tokens: int = 256,
                 enable_thinking: Optional[bool] = None, keep_reasoning: bool = True,
                 env_kwargs: Optional[dict[str, Any]] = None):
        check_class_args(GamesTask, locals(), TASK_PREFIX, whole=False)  # playability: on connect (max_eval_items)
        self.env_id, self.max_turns, self.data_seed, self.turn_tokens = env_id, max_turns, data_seed, turn_tokens
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.experience_file = experience_file
        self.experience = read_text(experience_file, field=f"{TASK_PREFIX}experience_file").strip() \
            if experience_file else experience.strip()
        if not self.experience:
            raise DataError("no experience text: set experience_file (lightning-ctx extract writes one) or "
                            "experience", field=f"{TASK_PREFIX}experience_file")
        self.enable_thinking, self.keep_reasoning = enable_thinking, keep_reasoning
        self.episode_format, self.history = episode_format, history
        check_env_id(env_id)
        check_env_kwargs(env_id, env_kwargs)
        self.env_kwargs = env_kwargs_for(env_id, env_kwargs)
        self.factory = GameFactory(env_id, max_turns, self.env_kwargs)
        self.playability: dict[str, oracle.Playability] | None = None  # measured on connect
        self.episodes: EpisodeFormat | None = None  # built with the tokenizer (connect)
        self._split_seeds: dict[str, list[int]] = {}  # the loaded splits' seeds (connect)
        self._longest: int | None = None
        self._feedback: int | None = None

    def seeds(self, split: str, max_eval_items: Optional[int] = None) -> list[int]:
        n = self.sizes[split]
        if split != "train" and max_eval_items is not None:
            n = min(n, max_eval_items)
        return split_seeds(self.data_seed, split, n)

    # -- playability (the oracle) ------------------------------------------------------------------
    def measure_playability(self, max_eval_items: Optional[int] = None) -> dict[str, oracle.Playability]:
        """The oracle on each split (cached per seed; raises for an unplayable split) and one line per split."""
        args = {"env_id": self.env_id, "env_kwargs": self.env_kwargs, "max_turns": self.max_turns,
                "data_seed": self.data_seed, "max_eval_items": max_eval_items,
                **{f"n_{split}": n for split, n in self.sizes.items()}}
        report = playability_report(args)
        for split, found in sorted(report.items(), key=lambda item: list(SPLIT_OFFSETS).index(item[0])):
            n = len(self.seeds(split, max_eval_items))
            sample = f" (a sample of {found.checked} of {n})" if found.checked < n else ""
            rank_zero_info(f"{self.env_id} {self.env_kwargs}: {found.fraction:.1%} of the {split} games"
                           f"{sample} can be won within {self.max_turns} moves; the random legal-move player wins "
                           f"{found.random_pass:.1%}")
        if not report:
            rank_zero_info(f"{self.env_id}: no playability oracle for this game (FrozenLake and Sokoban only)")
        return report

    def load(self, split: str) -> list[TaskRecord] | None:
        if self.sizes[split] <= 0:
            return None
        return [TaskRecord(f"{self.env_id}:{s}", self.experience, "", "", meta={"seed": s}) for s in self.seeds(split)]

    def source(self, split: str) -> str:
        return f"{self.env_id}:{split}"

    def connect(self, data: DataView) -> None:
        """Playability on the evaluated games (once), the episode's chat pieces from ``data``'s tokenizer, and the
        first prompts' length against ``data.max_prompt_length``."""
        if self.playability is None:
            self.playability = self.measure_playability(data.max_eval_items)
        self._split_seeds = {split: [r.meta["seed"] for r in recs] for split, recs in data.splits.items()}
        self._longest = self._feedback = None
        tokenizer = data.tokenizer
        chat = ChatFormat(tokenizer, [tokenizer.eos_token_id], enable_thinking=self.enable_thinking,
                          keep_reasoning=self.keep_reasoning)
        self.episodes = build_format(self.episode_format, chat, self.history)
        longest = self.longest_first_prompt()
        if longest > data.max_prompt_length:
            raise DataError(f"the first prompt with the experience is {longest} tokens, longer than "
                            f"data.max_prompt_length={data.max_prompt_length}", field=f"{TASK_PREFIX}experience_file")

    def longest_first_prompt(self) -> int:
        """Longest first prompt with the experience over the first games of each split."""
        if self._longest is None:
            seeds = [s for seeds in self._split_seeds.values() for s in seeds[:PROBE_GAMES]]
            self._longest = max((len(self._first_prompt_ids(g.reset())) for g in self.factory(seeds)), default=0)
        return self._longest

    def _first_prompt_ids(self, observation: str) -> list[int]:
        if isinstance(self.episodes, PerTurnFormat):
            return self.episodes.prompt_ids([observation], self.experience)
        return self.episodes.chat.first_prompt_ids(observation, self.experience)

    def feedback_tokens(self) -> int:
        """Tokens of one user turn after a move (the longest probed feedback, plus a margin)."""
        if self._feedback is None:
            seeds = [s for seeds in self._split_seeds.values() for s in seeds[:1]][:2]
            longest = 0
            for seed in seeds:
                for move in PROBE_MOVES:
                    (game,) = self.factory([seed])
                    game.reset()
                    done, feedback = game.step(move)
                    if not done:
                        longest = max(longest, len(self.episodes.chat.feedback_ids(feedback)))
            self._feedback = longest + FEEDBACK_MARGIN
        return self._feedback

    def longest_prompt(self, data: DataView) -> int:
        """The longest prefix an episode's last turn is sampled from: the first prompt with the experience, plus
        ``max_turns - 1`` earlier turns (``turn_tokens`` each, or one action line in a per_turn history of actions)
        and their feedback (used for the model's position check and to size the rollout warm-up, hence a static KV
        cache)."""
        actions_only = isinstance(self.episodes, PerTurnFormat) and self.history == "actions"
        turn = ACTION_LINE_TOKENS if actions_only else self.turn_tokens
        return self.longest_first_prompt() + (self.max_turns - 1) * (turn + self.feedback_tokens())

    def collator(self, data: DataView, retain: bool) -> EpisodeCollator:
        return EpisodeCollator(self.factory, self.episodes, self.experience, data.tokenizer.pad_token_id)
