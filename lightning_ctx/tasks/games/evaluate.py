"""Episode-level evaluation on games: the same seeds played without and with the experience.

Every metric but the references and the mechanistic ones is per game (:mod:`lightning_ctx.tasks.games.metrics`,
one definition with the other tasks' harm and help) and comes with its 95% bootstrap interval over games
(``{name}_lo``, ``{name}_hi``, ``n_items``).

| metric | definition |
| --- | --- |
| ``pass_no_ctx``, ``pass_ctx`` | fraction of games won (reward == 1.0) without / with the experience |
| ``harm`` | won without and lost with, over won without (NaN when none was won without) |
| ``help`` | lost without and won with, over lost without (NaN when all were won without) |
| ``both_pass`` | won both ways |
| ``reward_no_ctx``, ``reward_ctx`` | mean raw TextArena reward |
| ``turns_no_ctx``, ``turns_ctx`` | mean model turns per game |
| ``invalid_rate_no_ctx``, ``invalid_rate_ctx`` | invalid moves over model turns |
| ``len_no_ctx``, ``len_ctx``, ``len_inflation`` | mean student tokens per game; ``len_ctx / len_no_ctx - 1`` |
| ``pass_oracle`` | fraction of the same games an optimal player wins within the turn limit (the ceiling) |
| ``pass_random`` | the random legal-move player's exact win probability per game, averaged (the floor) |
| ``ctx_kl`` | mean per-token KL(student without || student with the experience), teacher-forced on the turns the
  student played without it, each under the prefix it was sampled with (and the same prefix with the experience) |
| ``hidden_cos/layer_k``, ``hidden_cos/mean`` | cosine of the two passes' hidden states at those tokens |

``pass_oracle`` / ``pass_random`` come from :mod:`lightning_ctx.tasks.games.oracle` (FrozenLake and Sokoban; NaN
for other games or without a ``GameFactory``); ``pass_random`` weighs every play by its chance, so it has no
sampling noise.

Sampled as OPCD evaluates (temperature 0.7, top-p 0.8, top-k 20; ``GameEvalCallback``) or greedy. ``transcripts``
holds one row per seed: both games' messages (as the student saw them), the action sent to TextArena for each reply,
reward, pass, reason, turns and invalid moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lightning_ctx.eval.evaluator import ContextMechanics
from lightning_ctx.eval.intervals import DEFAULT_RESAMPLES
from lightning_ctx.eval.item_metrics import values
from lightning_ctx.models.scoring import eval_mode, join_prompt_and_response
from lightning_ctx.rollout_episodes import Episode, EpisodeFormat, TurnSampler, play_episodes
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.metrics import REFERENCE_KEYS, game_items, measure_games


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass
class GameSummary:
    """Per-game results of one pass (without or with the experience)."""

    passed: list[bool] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    invalid: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, episodes: Sequence[Episode]) -> GameSummary:
        s = cls()
        for e in episodes:
            s.passed.append(bool(e.outcome.passed))
            s.rewards.append(float(e.outcome.reward))
            s.turns.append(int(e.outcome.turns))
            s.invalid.append(int(e.outcome.invalid_moves))
            s.tokens.append(int(e.student_tokens))
        return s

    def columns(self, tag: str) -> dict[str, list]:
        """The transcripts table's columns of this pass (``passed_{tag}``, ...), one entry per game."""
        return {f"passed_{tag}": self.passed, f"reward_{tag}": self.rewards, f"turns_{tag}": self.turns,
                f"invalid_moves_{tag}": self.invalid, f"tokens_{tag}": self.tokens}


def reference_rates(factory, seeds: Sequence[int]) -> dict[str, float]:
    """``pass_oracle`` and ``pass_random`` on ``seeds`` (see the module docstring); NaN where the oracle does not
    know the game (or ``factory`` is not a ``GameFactory``)."""
    env_id = getattr(factory, "env_id", None)
    if env_id is None or not seeds or not oracle.supported(env_id):
        return dict.fromkeys(REFERENCE_KEYS, math.nan)
    found = oracle.playability(env_id, factory.env_kwargs, seeds, factory.max_turns)
    return {"pass_oracle": found.fraction, "pass_random": found.random_pass}


def game_metrics(no_ctx: GameSummary, ctx: GameSummary,
                 references: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Every metric of the module docstring from the two passes over the same seeds (same order), without intervals;
    ``references``: ``reference_rates`` on those seeds (NaN when not given)."""
    if len(no_ctx.passed) != len(ctx.passed):
        raise ValueError(f"the two passes played {len(no_ctx.passed)} and {len(ctx.passed)} games")
    cols = {**no_ctx.columns("no_ctx"), **ctx.columns("ctx")}
    rows = [dict(zip(cols, cells)) for cells in zip(*cols.values())]
    out = values(game_items(rows))
    out.update({k: float((references or {}).get(k, math.nan)) for k in REFERENCE_KEYS})
    return out


def _row(tag: str, e: Episode) -> dict[str, Any]:
    o = e.outcome
    return {f"passed_{tag}": o.passed, f"reward_{tag}": o.reward, f"reason_{tag}": o.reason,
            f"turns_{tag}": o.turns, f"invalid_moves_{tag}": o.invalid_moves, f"ended_by_{tag}": o.ended_by,
            f"tokens_{tag}": e.student_tokens, f"transcript_{tag}": e.transcript,
            f"actions_{tag}": list(getattr(e.game, "actions", []))}  # what TextArena was sent per turn


@dataclass
class GameEvalResult:
    metrics: dict[str, float]
    transcripts: list[dict[str, Any]]  # one row per seed, both passes
    episodes_no_ctx: list[Episode] = field(default_factory=list)


def play_in_batches(sample: TurnSampler, fmt: EpisodeFormat, factory, seeds: Sequence[int], context: Optional[str],
                    pad_token_id: int, device: Any, batch_size: int) -> list[Episode]:
    episodes: list[Episode] = []
    for start in range(0, len(seeds), batch_size):
        episodes += play_episodes(sample, fmt, factory(seeds[start:start + batch_size]), context, pad_token_id,
                                  device)
    return episodes


@torch.no_grad()
def context_mechanics(model, fmt: EpisodeFormat, episodes: Sequence[Episode], experience: str, pad_token_id: int,
                      layers: Sequence[int], vocab_size: int, batch_size: int = 16) -> ContextMechanics:
    """``ctx_kl`` and ``hidden_cos`` on the turns played without the experience: each turn's tokens scored under the
    prefix it was sampled with and under the same prefix with the experience (the rows the loss uses)."""
    out = ContextMechanics(list(layers))
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(episodes), batch_size):
            chunk = list(episodes[start:start + batch_size])
            batch, rollout = fmt.score_inputs(chunk, [str(i) for i in range(len(chunk))], experience, pad_token_id)
            rollout.to(device)
            attention = rollout.response_mask if rollout.response_attention is None else rollout.response_attention
            in0 = join_prompt_and_response(batch.prompt_ids.to(device), batch.prompt_mask.to(device),
                                           rollout.response_ids, attention)
            in1 = join_prompt_and_response(batch.ctx_prompt_ids.to(device), batch.ctx_prompt_mask.to(device),
                                           rollout.response_ids, attention)
            if rollout.response_mask.any():
                out.update(model, in0, in1, rollout.response_mask, vocab_size)
    return out


def play_both(sample: TurnSampler, fmt: EpisodeFormat, factory, seeds: Sequence[int], experience: str,
              pad_token_id: int, device: Any = "cpu", batch_size: int = 16) -> tuple[list[dict], list[Episode]]:
    """Play ``seeds`` twice with ``sample`` (the student): without the experience, then with it (as the format puts
    a context: in the turn prompt, or as the system message). Returns one transcript row per seed and the episodes
    played without the experience."""
    plain = play_in_batches(sample, fmt, factory, seeds, None, pad_token_id, device, batch_size)
    with_ctx = play_in_batches(sample, fmt, factory, seeds, experience, pad_token_id, device, batch_size)
    rows = [{"seed": int(s), **_row("no_ctx", a), **_row("ctx", b)} for s, a, b in zip(seeds, plain, with_ctx)]
    return rows, plain


def evaluate_games(sample: TurnSampler, fmt: EpisodeFormat, factory, seeds: Sequence[int], experience: str,
                   pad_token_id: int, device: Any = "cpu", batch_size: int = 16, *, seed: int = 0,
                   n_resamples: int = DEFAULT_RESAMPLES) -> GameEvalResult:
    """:func:`play_both`, then the metrics of the module docstring with their intervals over games (bootstrap
    ``seed``, ``n_resamples``; 0 = no intervals), but the mechanistic ones (see :func:`context_mechanics`)."""
    rows, plain = play_both(sample, fmt, factory, seeds, experience, pad_token_id, device, batch_size)
    metrics = measure_games(rows, reference_rates(factory, seeds), seed=seed, n_resamples=n_resamples)
    return GameEvalResult(metrics, rows, plain)


def pass_rate(sample: TurnSampler, fmt: EpisodeFormat, factory, seeds: Sequence[int], context: Optional[str],
              pad_token_id: int, device: Any = "cpu", batch_size: int = 16) -> tuple[float, list[Episode]]:
    """One pass (e.g. the teacher with the experience, or a candidate experience in ``extract``)."""
    episodes = play_in_batches(sample, fmt, factory, seeds, context, pad_token_id, device, batch_size)
    return _ratio(sum(e.outcome.passed for e in episodes), len(episodes)), episodes
