"""``GamesDataModule``: seeded TextArena games per split, the experience as the context, episode batches.

A record is one game: ``id = "<env_id>:<seed>"``, ``context`` = the experience, ``meta["seed"]``. The training
loader yields :class:`~lightning_ctx.rollout_episodes.EpisodeBatch` objects: ``OnPolicyDistillation`` plays them
with the student (without the experience) and scores them with the teacher (with it).
"""

from __future__ import annotations

from typing import Optional

from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import TaskRecord
from lightning_ctx.errors import DataError
from lightning_ctx.knobs import at_least, check_class_args, existing_file, one_of
from lightning_ctx.rollout_episodes import (
    EPISODE_FORMATS,
    HISTORIES,
    ChatFormat,
    EpisodeBatch,
    EpisodeFormat,
    PerTurnFormat,
    build_format,
)
from lightning_ctx.tasks.games.env import GameFactory, check_env_id
from lightning_ctx.textfiles import read_text

#: Seed ranges of the splits: split k draws seeds ``data_seed * 10**7 + k * 10**6 + i``, so splits never share a
#: seed (FrozenLake 4x4 has only a few hundred distinct boards: boards do repeat across splits there).
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
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


class GamesDataModule(ContextPairDataModule):
    """Multi-turn text games (TextArena) with experiential knowledge as the context.

    Args:
        env_id: a single-player ``-raw`` TextArena environment (``FrozenLake-v0-raw``, ``Sokoban-v0-raw``).
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
        batch_size: games per training step; eval_batch_size: games per evaluation batch.
        max_prompt_length: the longest allowed first prompt with the experience, in tokens.
        Other arguments as in ``ContextPairDataModule``.
    """

    KNOB_CHECKS = (at_least("max_turns", 1), at_least("turn_tokens", 1), at_least("n_train", 1), at_least("n_val", 0),
                   at_least("n_test", 0), at_least("data_seed", 0), existing_file("experience_file"),
                   one_of("episode_format", EPISODE_FORMATS), one_of("history", HISTORIES))

    def __init__(self, env_id: str = "FrozenLake-v0-raw", max_turns: int = 5, n_train: int = 1000, n_val: int = 128,
                 n_test: int = 0, data_seed: int = 0, experience: str = "", experience_file: Optional[str] = None,
                 episode_format: str = "per_turn", history: str = "actions", turn_tokens: int = 256,
                 enable_thinking: Optional[bool] = None, keep_reasoning: bool = True,
                 tokenizer: Optional[str] = None, batch_size: int = 8, eval_batch_size: Optional[int] = None,
                 max_prompt_length: int = 8192, template: str = "chat", max_eval_items: Optional[int] = None,
                 num_workers: int = 0, shuffle: bool = True, seed: int = 0):
        check_class_args(GamesDataModule, locals(), "data.")
        check_env_id(env_id)
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         max_prompt_length=max_prompt_length, template=template, max_eval_items=max_eval_items,
                         num_workers=num_workers, shuffle=shuffle, seed=seed)
        self.env_id, self.max_turns, self.data_seed, self.turn_tokens = env_id, max_turns, data_seed, turn_tokens
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.experience_file = experience_file
        self.experience = read_text(experience_file, field="data.experience_file").strip() if experience_file \
            else experience.strip()
        if not self.experience:
            raise DataError("no experience text: set data.experience_file (lightning-ctx extract writes one) or "
                            "data.experience", field="data.experience_file")
        self.enable_thinking, self.keep_reasoning = enable_thinking, keep_reasoning
        self.episode_format, self.history = episode_format, history
        self.factory = GameFactory(env_id, max_turns)
        self.episodes: EpisodeFormat | None = None  # built with the tokenizer (validate)
        self._longest: int | None = None
        self._feedback: int | None = None

    def seeds(self, split: str) -> list[int]:
        base = self.data_seed * 10_000_000 + SPLIT_OFFSETS[split]
        n = self.sizes[split]
        if split != "train" and self.max_eval_items is not None:
            n = min(n, self.max_eval_items)
        return [base + i for i in range(n)]

    def load_split_records(self, split: str) -> list[TaskRecord] | None:
        if self.sizes[split] <= 0:
            return None
        return [TaskRecord(f"{self.env_id}:{s}", self.experience, "", "", meta={"seed": s}) for s in self.seeds(split)]

    def split_source(self, split: str) -> str:
        return f"{self.env_id}:{split}"

    def validate(self) -> None:
        """Load the tokenizer if needed, derive the episode's chat pieces, size-check the first prompts."""
        if self._validated:
            return
        self._ensure_tokenizer()
        self._longest = self._feedback = None
        chat = ChatFormat(self.tokenizer, [self.tokenizer.eos_token_id], enable_thinking=self.enable_thinking,
                          keep_reasoning=self.keep_reasoning)
        self.episodes = build_format(self.episode_format, chat, self.history)
        self.splits = {split: recs for split in ("train", "val", "test")
                       if (recs := self.load_split_records(split)) is not None}
        self._validated = True
        longest = self.longest_first_prompt()
        if longest > self.max_prompt_length:
            raise DataError(f"the first prompt with the experience is {longest} tokens, longer than "
                            f"data.max_prompt_length={self.max_prompt_length}", field="data.experience_file")

    def longest_first_prompt(self) -> int:
        """Longest first prompt with the experience over the first games of each split."""
        self.validate()
        if self._longest is None:
            seeds = [r.meta["seed"] for records in self.splits.values() for r in records[:PROBE_GAMES]]
            self._longest = max((len(self._first_prompt_ids(g.reset())) for g in self.factory(seeds)), default=0)
        return self._longest

    def _first_prompt_ids(self, observation: str) -> list[int]:
        if isinstance(self.episodes, PerTurnFormat):
            return self.episodes.prompt_ids([observation], self.experience)
        return self.episodes.chat.first_prompt_ids(observation, self.experience)

    def feedback_tokens(self) -> int:
        """Tokens of one user turn after a move (the longest probed feedback, plus a margin)."""
        self.validate()
        if self._feedback is None:
            seeds = [r.meta["seed"] for records in self.splits.values() for r in records[:1]][:2]
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

    def longest_prompt(self) -> int:
        """The longest prefix an episode's last turn is sampled from: the first prompt with the experience, plus
        ``max_turns - 1`` earlier turns (``turn_tokens`` each, or one action line in a per_turn history of actions)
        and their feedback (used for the model's position check and to size the rollout warm-up, hence a static KV
        cache)."""
        self.validate()
        actions_only = isinstance(self.episodes, PerTurnFormat) and self.history == "actions"
        turn = ACTION_LINE_TOKENS if actions_only else self.turn_tokens
        return self.longest_first_prompt() + (self.max_turns - 1) * (turn + self.feedback_tokens())

    def _collator(self, retain: bool) -> EpisodeCollator:
        return EpisodeCollator(self.factory, self.episodes, self.experience, self.tokenizer.pad_token_id)
