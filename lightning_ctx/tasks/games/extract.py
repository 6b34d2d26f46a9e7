"""``lightning-ctx extract``: the experience text, written by the model from its own games (OPCD's extraction step).

Round 0 measures the starting experience (a file, or none) by its validation pass rate. Each round k = 1..K:

1. play ``games`` training games with the current experience as the system message (sampled at ``temperature``);
2. ask the model to revise the experience from those trajectories (:data:`REFLECT_PROMPT`, our own wording);
3. measure the revision's validation pass rate (greedy, the same ``val_games`` seeds every round);
4. the best experience so far is what the next round revises (a failed revision is not built on).

The best experience by validation pass rate (ties: the earlier one) is written to ``--out``. Every round goes to one
MLflow run: ``extract/train_pass``, ``extract/val_pass``, ``extract/experience_tokens`` at step k, and artifacts
``round_KK/experience.txt``, ``round_KK/reflection_prompt.txt``, ``round_KK/games.json``; ``extract/best_round``
and ``extract/best_val_pass`` at the end.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lightning_ctx.rollout_episodes import THINK_CLOSE, THINK_OPEN, ChatFormat, Episode, TurnSampler
from lightning_ctx.tasks.games.datamodule import SPLIT_OFFSETS
from lightning_ctx.tasks.games.env import GameFactory, check_env_id
from lightning_ctx.tasks.games.evaluate import pass_rate

REFLECT_PROMPT = """You are writing the experience notes a player reads before playing the text game {game}.
Below are the current notes and transcripts of games played with them, with how each game ended.
Revise the notes: keep the advice that led to wins, add general rules that would have avoided the losses and
invalid moves, and remove advice that did not help. Write rules that hold on any board, not a description of
these boards. Be concise (at most {max_words} words). Reply with the revised notes only.

Current notes:
{experience}

Games:
{games}"""

Reflect = Callable[[str], str]  # prompt -> the model's reply


def format_games(episodes: Sequence[Episode], max_games: int = 8, max_chars: int = 1500) -> str:
    """Transcripts for the reflection prompt: losses and wins interleaved, each cut to ``max_chars``."""
    won = [e for e in episodes if e.outcome.passed]
    lost = [e for e in episodes if not e.outcome.passed]
    chosen: list[Episode] = []
    while (won or lost) and len(chosen) < max_games:
        for pool in (lost, won):
            if pool and len(chosen) < max_games:
                chosen.append(pool.pop(0))
    blocks = []
    for i, e in enumerate(chosen, start=1):
        o = e.outcome
        lines = [f"Game {i}: {'won' if o.passed else 'lost'} after {o.turns} moves (reward {o.reward:.2f}; {o.reason})"]
        for m in e.transcript:
            if m["role"] == "system":
                continue
            who = "Player" if m["role"] == "assistant" else "Game"
            lines.append(f"{who}: {m['content'].strip()}")
        text = "\n".join(lines)
        blocks.append(text if len(text) <= max_chars else text[: max_chars - 20] + "\n[... cut ...]")
    return "\n\n".join(blocks)


def reflection_prompt(game: str, experience: str, episodes: Sequence[Episode], max_words: int = 400) -> str:
    return REFLECT_PROMPT.format(game=game, max_words=max_words, experience=experience or "(none yet)",
                                 games=format_games(episodes))


def clean_reply(reply: str) -> str:
    """The revised experience: the reply without a reasoning block ("" when the reply ended inside one, i.e. the
    token budget ran out while reasoning: a failed revision, not an experience)."""
    if THINK_CLOSE in reply:
        return reply.split(THINK_CLOSE)[-1].strip()
    return "" if THINK_OPEN in reply else reply.strip()


@dataclass
class ExtractionResult:
    best_experience: str
    best_round: int
    best_val_pass: float
    rounds: list[dict[str, Any]] = field(default_factory=list)


def run_extraction(play: TurnSampler, evaluate: TurnSampler, reflect: Reflect, chat: ChatFormat,
                   factory: GameFactory, rounds: int, games: int, val_games: int, initial: str = "",
                   seed: int = 0, pad_token_id: int = 0, device: Any = "cpu", batch_size: int = 16,
                   log: Optional[Callable[[int, dict, dict[str, str]], None]] = None) -> ExtractionResult:
    """The loop of the module docstring. ``play`` samples the training games, ``evaluate`` decodes the validation
    games (greedy), ``reflect`` answers the reflection prompt; ``log(round, metrics, texts)`` records each round."""
    game_name = factory.env_id.split("-")[0]
    base = seed * 10_000_000
    val_seeds = [base + SPLIT_OFFSETS["val"] + i for i in range(val_games)]

    def val_pass(experience: str) -> tuple[float, list[Episode]]:
        return pass_rate(evaluate, chat, factory, val_seeds, experience or None, pad_token_id, device, batch_size)

    best_pass, val_eps = val_pass(initial)
    best = ExtractionResult(initial, 0, best_pass)
    record = {"round": 0, "val_pass": best_pass, "experience": initial}
    best.rounds.append(record)
    if log:
        log(0, {"val_pass": best_pass}, {"experience.txt": initial or "(none)"})
    for k in range(1, rounds + 1):
        train_seeds = [base + SPLIT_OFFSETS["train"] + (k - 1) * games + i for i in range(games)]
        train_pass, episodes = pass_rate(play, chat, factory, train_seeds, best.best_experience or None, pad_token_id,
                                         device, batch_size)
        prompt = reflection_prompt(game_name, best.best_experience, episodes)
        experience = clean_reply(reflect(prompt))
        score, val_eps = val_pass(experience) if experience else (0.0, [])
        record = {"round": k, "train_pass": train_pass, "val_pass": score, "experience": experience}
        best.rounds.append(record)
        if log:
            games_json = json.dumps([{"seed": e.game.seed, **e.outcome.as_dict(), "transcript": e.transcript}
                                     for e in episodes], indent=1)
            log(k, {"train_pass": train_pass, "val_pass": score,
                    "experience_tokens": float(len(chat.encode(experience)))},
                {"experience.txt": experience or "(empty reply)", "reflection_prompt.txt": prompt,
                 "games.json": games_json})
        if experience and score > best.best_val_pass:
            best.best_experience, best.best_round, best.best_val_pass = experience, k, score
    return best


# -- the command ------------------------------------------------------------------------------------


def _model_samplers(model, tokenizer, eos_ids, max_new_tokens: int, temperature: float, reflect_tokens: int,
                    chat: ChatFormat):
    from lightning_ctx.rollout import SamplingSettings, build_engine, sample_responses

    engine = build_engine("hf")
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device

    def sampler(settings):
        return lambda ids, mask: sample_responses(model, ids, mask, settings, eos_ids, pad, engine)

    play = sampler(SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature))
    evaluate = sampler(SamplingSettings(max_new_tokens=max_new_tokens, greedy=True))
    reflect_settings = SamplingSettings(max_new_tokens=reflect_tokens, greedy=True)

    def reflect(prompt: str) -> str:
        import torch

        ids = torch.tensor([chat.first_prompt_ids(prompt)], device=device)
        out = sample_responses(model, ids, torch.ones_like(ids), reflect_settings, eos_ids, pad, engine)
        return tokenizer.decode(out.response_ids[0][out.response_mask[0]], skip_special_tokens=True)

    return play, evaluate, reflect


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-ctx extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local checkpoint folder (or an id in the HF cache)")
    p.add_argument("--env-id", default="FrozenLake-v0-raw", help="a -raw TextArena game (FrozenLake, Sokoban)")
    p.add_argument("--out", required=True, help="where to write the best experience text")
    p.add_argument("--experience", default=None, help="starting experience file (default: none)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--games", type=int, default=32, help="training games played per round")
    p.add_argument("--val-games", type=int, default=32, help="validation games scoring each experience")
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per game turn")
    p.add_argument("--reflect-max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the training games")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--experiment", default="extract", help="MLflow experiment")
    p.add_argument("--run-name", default=None)
    return p


def extract_main(argv: Sequence[str]) -> int:
    import mlflow
    import torch

    from lightning_ctx.errors import ConfigError
    from lightning_ctx.models.loading import load_causal_lm, load_tokenizer
    from lightning_ctx.rollout import eos_ids_for
    from lightning_ctx.textfiles import read_text
    from lightning_ctx.tracking import default_tracking_uri

    a = build_parser().parse_args(list(argv))
    for name in ("rounds", "games", "val_games", "max_turns", "max_new_tokens", "reflect_max_new_tokens"):
        if getattr(a, name) < (0 if name == "rounds" else 1):
            raise ConfigError(f"must be >= {0 if name == 'rounds' else 1}, got {getattr(a, name)}",
                              field=f"--{name.replace('_', '-')}")
    check_env_id(a.env_id)
    initial = read_text(a.experience, field="--experience").strip() if a.experience else ""
    torch.manual_seed(a.seed)
    tokenizer = load_tokenizer(a.model)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(a.model, dtype=a.dtype).to(device)
    eos_ids = eos_ids_for(tokenizer, model)
    thinking = None if a.enable_thinking is None else a.enable_thinking == "true"
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id], enable_thinking=thinking)
    play, evaluate, reflect = _model_samplers(model, tokenizer, eos_ids, a.max_new_tokens, a.temperature,
                                              a.reflect_max_new_tokens, chat)
    mlflow.set_tracking_uri(default_tracking_uri())
    mlflow.set_experiment(a.experiment)
    with mlflow.start_run(run_name=a.run_name or f"extract-{a.env_id}") as run:
        mlflow.log_params({k: v for k, v in vars(a).items() if v is not None})

        def log(k: int, metrics: dict, texts: dict[str, str]) -> None:
            mlflow.log_metrics({f"extract/{name}": float(v) for name, v in metrics.items()}, step=k)
            for name, text in texts.items():
                mlflow.log_text(text, f"round_{k:02d}/{name}")

        result = run_extraction(play, evaluate, reflect, chat, GameFactory(a.env_id, a.max_turns), a.rounds, a.games,
                                a.val_games, initial, a.seed, tokenizer.pad_token_id, device, a.batch_size, log)
        mlflow.log_metrics({"extract/best_round": result.best_round, "extract/best_val_pass": result.best_val_pass})
        mlflow.log_text(result.best_experience, "best_experience.txt")
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.best_experience + "\n", encoding="utf-8")
        print(f"best experience: round {result.best_round}, validation pass rate {result.best_val_pass:.3f} -> {out} "
              f"(MLflow run {run.info.run_id})")
    return 0
