"""Measuring the game base as the games' evaluation does: pass rates on held-out FrozenLake games (OPCD's boards,
per-turn format, sampled at OPCD's evaluation settings or greedy) under each kind of experience, beside the scripted
players' exact win probabilities on the same games."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from lightning_ctx.eval.evaluator import seeded_rng
from lightning_ctx.rollout import SamplingSettings, build_engine, sample_responses
from lightning_ctx.rollout_episodes import ChatFormat, PerTurnFormat
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import GameFactory
from lightning_ctx.tasks.games.evaluate import pass_rate
from lightning_ctx.tasks.games.frozenlake_base import players as P
from lightning_ctx.tasks.games.frozenlake_base.model import MAX_NEW_TOKENS
from lightning_ctx.tasks.games.frozenlake_base.tokenizer import ENV_ID
from lightning_ctx.tasks.games.task import env_kwargs_for, split_seeds

MAX_TURNS = 5  # OPCD
#: The experiences the base is measured under: the built-in one, notes that never mention holes, none.
EXPERIENCES = {"builtin": P.BUILTIN_EXPERIENCE, "other_notes": "\n".join(f"- {n}" for n in P.OTHER_NOTES),
               "none": None}
OPCD_SAMPLING = dict(temperature=0.7, top_p=0.8, top_k=20)  # GameEvalCallback's defaults


def heldout_seeds(n: int) -> list[int]:
    """The first ``n`` validation games of ``data_seed`` 0 (the configs' held-out games; pretraining plays training
    games only)."""
    return split_seeds(0, "val", n)


def pass_rates(model, tokenizer, seeds: Sequence[int], greedy: bool = False, enable_thinking: Optional[bool] = None,
               seed: int = 0, batch_size: int = 64, experiences: Optional[dict] = None) -> dict[str, float]:
    """Pass rate on ``seeds`` under each experience (``EXPERIENCES``), each played with the same seeded sampling."""
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    fmt = PerTurnFormat(ChatFormat(tokenizer, eos, enable_thinking=enable_thinking))
    factory = GameFactory(ENV_ID, MAX_TURNS, env_kwargs_for(ENV_ID, None))
    settings = SamplingSettings(max_new_tokens=MAX_NEW_TOKENS, greedy=greedy, **OPCD_SAMPLING)
    engine = build_engine("loop")
    device = next(model.parameters()).device
    sample = lambda ids, mask: sample_responses(model, ids, mask, settings, eos, pad, engine)  # noqa: E731
    out = {}
    for name, experience in (experiences or EXPERIENCES).items():
        with seeded_rng(device, seed):
            out[name] = pass_rate(sample, fmt, factory, list(seeds), experience, pad, device, batch_size)[0]
    return out


def scripted_rates(seeds: Sequence[int]) -> dict[str, float]:
    """Exact win probabilities on ``seeds``: the solver (= ``pass_oracle``), the naive player, the random legal
    player (= ``pass_random``)."""
    kwargs = env_kwargs_for(ENV_ID, None)
    boards = [oracle.board(ENV_ID, kwargs, s) for s in seeds]
    found = oracle.playability(ENV_ID, kwargs, seeds, MAX_TURNS)
    return {"solver": found.fraction, "naive": P.mean_win_probability(P.NAIVE, boards, MAX_TURNS),
            "random": found.random_pass}


@torch.no_grad()
def base_report(model, tokenizer, n_games: int = 128, seed: int = 0) -> dict[str, Any]:
    """The ``eval`` block of the game base's report."""
    seeds = heldout_seeds(n_games)
    kwargs = env_kwargs_for(ENV_ID, None)
    boards = {oracle.board(ENV_ID, kwargs, s) for s in seeds}
    return {
        "protocol": (f"{n_games} held-out games (validation split of data_seed 0: seeds {seeds[0]}..{seeds[-1]}), "
                     f"{ENV_ID} on OPCD's boards {kwargs}, at most {MAX_TURNS} moves, per-turn format (history of "
                     "actions); each experience played on the same games with the same seeded sampling"),
        "boards": (f"{len(boards)} distinct boards among these games: OPCD's 3x3 boards with 2 holes, start top-left "
                   "and goal bottom-right, are only 19, so the held-out games share their boards with the pretraining "
                   "games (never their seeds)"),
        "n_games": n_games,
        "sampled": {"thinking": pass_rates(model, tokenizer, seeds, seed=seed),
                    "no_thinking": pass_rates(model, tokenizer, seeds, enable_thinking=False, seed=seed)},
        "sampling": OPCD_SAMPLING,
        "greedy": {"thinking": pass_rates(model, tokenizer, seeds, greedy=True, seed=seed),
                   "no_thinking": pass_rates(model, tokenizer, seeds, greedy=True, enable_thinking=False, seed=seed)},
        "scripted": scripted_rates(seeds),
        "experiences": {k: v for k, v in EXPERIENCES.items()},
    }
