"""``lightning-ctx extract``: the experience text, written by the model from its own games (OPCD's extraction step).

Two procedures (``--mode``):

* ``accumulate`` (default; OPCD's procedure): each update plays ``--games`` fresh training games *without* the
  experience, shows the model the trajectories (every turn's input and output and how the game ended) beside the
  experience so far and asks for additional experience (:data:`ACCUMULATE_PROMPT`, our own wording), which is
  appended (the whole kept to ``--max-experience-tokens``, oldest lines dropped first);
* ``revise`` (this project's earlier variant): each update plays the training games *with* the best experience so
  far and asks the model to rewrite it (:data:`REVISE_PROMPT`); a revision that does not beat the best is not built
  on.

Every ``--eval-every`` updates (and before the first) the current experience is a candidate: its pass rate on the
same ``--val-games`` held-out games (sampled as the evaluation samples, seeded) decides which candidate is kept
(ties: the earlier one). The best is written to ``--out``; an empty best (no update wrote anything and there was no
starting experience) is an error, not an empty file. Every update goes to one MLflow run: ``extract/train_pass``,
``extract/val_pass`` (candidates only), ``extract/experience_tokens`` at step k, artifacts
``update_KKK/experience.txt``, ``update_KKK/prompt.txt``, ``update_KKK/games.json``; ``extract/best_update`` and
``extract/best_val_pass`` at the end, and ``best_experience.txt``.

``--writer template`` replaces the model's writing step by a scripted, template-filling writer for the built-in game
base (``builtin:games``, which plays but cannot write prose): it reads the same writing prompt and fills in the notes
that base was pretrained to read (:mod:`lightning_ctx.tasks.games.frozenlake_base.writer`), so extraction,
distillation and evaluation run as one CPU pipeline.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_ctx.rollout_episodes import THINK_CLOSE, THINK_OPEN, Episode, EpisodeFormat, TurnSampler
from lightning_ctx.tasks.games.env import GameFactory, check_env_id, check_env_kwargs
from lightning_ctx.tasks.games.evaluate import pass_rate
from lightning_ctx.tasks.games.task import SPLIT_OFFSETS, env_kwargs_for

MODES = ("accumulate", "revise")
WRITERS = ("model", "template")

ACCUMULATE_PROMPT = """You keep notes of experience for playing the text game {game}, and you improve them after
every game. Below are the notes so far and the transcript of a game you just played without them: each round's
input (what the game showed) and output (your reply), and how the game ended.
Compare what happened with the goal: infer the rules of the game and what wins and what loses. Write 1-3 new notes
that would help a player win on any board (rules, strategies, mistakes to avoid), not a description of this board.
They are appended to the notes so far: do not repeat those. One note per line, each starting with "- ".

Notes so far:
{experience}

Game transcript:
{games}"""

REVISE_PROMPT = """You are writing the experience notes a player reads before playing the text game {game}.
Below are the current notes and transcripts of games played with them, with how each game ended.
Revise the notes: keep the advice that led to wins, add general rules that would have avoided the losses and
invalid moves, and remove advice that did not help. Write rules that hold on any board, not a description of
these boards. Be concise (at most {max_words} words). Reply with the revised notes only.

Current notes:
{experience}

Games:
{games}"""

Write = Callable[[str], str]  # prompt -> the model's reply


def format_trajectory(e: Episode, index: int, max_chars: int = 6000) -> str:
    """One game as rounds of input and output (the student's view) and how it ended, cut to ``max_chars``."""
    o = e.outcome
    lines = [f"Game {index}: {'won' if o.passed else 'lost'} after {o.turns} moves (reward {o.reward:.2f}; {o.reason})"]
    turn = 0
    for m in e.transcript:
        if m["role"] == "user":
            lines.append(f"Round {turn + 1} input: {m['content'].strip()}")
        elif m["role"] == "assistant":
            turn += 1
            lines.append(f"Round {turn} output: {m['content'].strip()}")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars - 20] + "\n[... cut ...]"


def format_games(episodes: Sequence[Episode], max_games: int = 8, max_chars: int = 6000) -> str:
    """Transcripts for a prompt: losses and wins interleaved, each cut to ``max_chars``."""
    won = [e for e in episodes if e.outcome.passed]
    lost = [e for e in episodes if not e.outcome.passed]
    chosen: list[Episode] = []
    while (won or lost) and len(chosen) < max_games:
        for pool in (lost, won):
            if pool and len(chosen) < max_games:
                chosen.append(pool.pop(0))
    return "\n\n".join(format_trajectory(e, i, max_chars) for i, e in enumerate(chosen, start=1))


def writing_prompt(mode: str, game: str, experience: str, episodes: Sequence[Episode], max_words: int = 400) -> str:
    template = ACCUMULATE_PROMPT if mode == "accumulate" else REVISE_PROMPT
    return template.format(game=game, max_words=max_words, experience=experience or "(none yet)",
                           games=format_games(episodes))


def clean_reply(reply: str) -> str:
    """The written experience: the reply without a reasoning block ("" when the reply ended inside one, i.e. the
    token budget ran out while reasoning: a failed update, not an experience)."""
    if THINK_CLOSE in reply:
        return reply.split(THINK_CLOSE)[-1].strip()
    return "" if THINK_OPEN in reply else reply.strip()


def append_experience(experience: str, addition: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """``experience`` + ``addition`` (one note per line), oldest lines dropped until it fits ``max_tokens``."""
    lines = [line for line in (experience + "\n" + addition).splitlines() if line.strip()]
    while len(lines) > 1 and count_tokens("\n".join(lines)) > max_tokens:
        lines.pop(0)
    return "\n".join(lines)


@dataclass
class ExtractionResult:
    best_experience: str
    best_update: int
    best_val_pass: float
    updates: list[dict[str, Any]] = field(default_factory=list)


def run_extraction(play: TurnSampler, evaluate: TurnSampler, write: Write, fmt: EpisodeFormat, factory: GameFactory,
                   updates: int, games: int, val_games: int, initial: str = "", mode: str = "accumulate",
                   eval_every: int = 1, max_experience_tokens: int = 2048, seed: int = 0, pad_token_id: int = 0,
                   device: Any = "cpu", batch_size: int = 16,
                   log: Optional[Callable[[int, dict, dict[str, str]], None]] = None) -> ExtractionResult:
    """The loop of the module docstring. ``play`` samples the training games, ``evaluate`` plays the held-out ones,
    ``write`` answers the writing prompt; ``log(update, metrics, texts)`` records each update."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    game_name = factory.env_id.split("-")[0]
    base = seed * 10_000_000
    val_seeds = [base + SPLIT_OFFSETS["val"] + i for i in range(val_games)]
    count = lambda text: len(fmt.chat.encode(text))  # noqa: E731

    def val_pass(experience: str) -> float:
        import torch

        from lightning_ctx.eval.evaluator import seeded_rng

        with seeded_rng(torch.device(device), seed):  # the same sampling noise for every candidate
            return pass_rate(evaluate, fmt, factory, val_seeds, experience or None, pad_token_id, device,
                             batch_size)[0]

    result = ExtractionResult(initial, 0, val_pass(initial))
    result.updates.append({"update": 0, "val_pass": result.best_val_pass, "experience": initial})
    if log:
        log(0, {"val_pass": result.best_val_pass}, {"experience.txt": initial or "(none)"})
    current = initial
    for k in range(1, updates + 1):
        train_seeds = [base + SPLIT_OFFSETS["train"] + (k - 1) * games + i for i in range(games)]
        start = result.best_experience if mode == "revise" else current
        # OPCD plays the trajectories without the experience; the revise variant with the best one
        played_with = (start or None) if mode == "revise" else None
        train_pass, episodes = pass_rate(play, fmt, factory, train_seeds, played_with, pad_token_id, device,
                                         batch_size)
        prompt = writing_prompt(mode, game_name, start, episodes)
        written = clean_reply(write(prompt))
        current = append_experience(start, written, count, max_experience_tokens) if mode == "accumulate" \
            else written
        record = {"update": k, "train_pass": train_pass, "experience": current}
        metrics = {"train_pass": train_pass, "experience_tokens": float(count(current))}
        if (k % eval_every == 0 or k == updates) and current:
            record["val_pass"] = metrics["val_pass"] = val_pass(current)
            if record["val_pass"] > result.best_val_pass:
                result.best_experience, result.best_update, result.best_val_pass = current, k, record["val_pass"]
        result.updates.append(record)
        if log:
            games_json = json.dumps([{"seed": e.game.seed, **e.outcome.as_dict(), "transcript": e.transcript}
                                     for e in episodes], indent=1)
            log(k, metrics, {"experience.txt": current or "(empty reply)", "prompt.txt": prompt,
                             "games.json": games_json})
    return result


# -- the command ------------------------------------------------------------------------------------


def _model_samplers(model, tokenizer, eos_ids, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                    write_tokens: int, fmt: EpisodeFormat):
    import torch

    from lightning_ctx.rollout import SamplingSettings, build_engine, sample_responses

    engine = build_engine("hf")
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    play = lambda ids, mask: sample_responses(model, ids, mask, settings, eos_ids, pad, engine)  # noqa: E731
    write_settings = SamplingSettings(max_new_tokens=write_tokens, greedy=True)

    def write(prompt: str) -> str:
        ids = torch.tensor([fmt.chat.first_prompt_ids(prompt)], device=device)
        out = sample_responses(model, ids, torch.ones_like(ids), write_settings, eos_ids, pad, engine)
        return tokenizer.decode(out.response_ids[0][out.response_mask[0]], skip_special_tokens=True)

    return play, write


def build_parser() -> argparse.ArgumentParser:
    from lightning_ctx.console import PlainHelpFormatter

    p = argparse.ArgumentParser(prog="lightning-ctx extract", description=__doc__.split("\n\n")[0],
                                formatter_class=PlainHelpFormatter)
    p.add_argument("--model", required=True, help="local checkpoint folder (or an id in the HF cache)")
    p.add_argument("--env-id", default="FrozenLake-v0-raw", help="a -raw TextArena game (FrozenLake, Sokoban)")
    p.add_argument("--env-kwargs", default=None,
                   help="the game's constructor arguments as JSON, e.g. '{\"size\": 3}' (default: OPCD's boards, "
                        "as the games task's env_kwargs)")
    p.add_argument("--out", required=True, help="where to write the best experience text")
    p.add_argument("--experience", default=None, help="starting experience file (default: none)")
    p.add_argument("--mode", choices=MODES, default="accumulate",
                   help="accumulate: OPCD's procedure (games without the experience, notes appended); revise: "
                        "games with the best experience, the notes rewritten")
    p.add_argument("--writer", choices=WRITERS, default="model",
                   help="who writes the notes: the model (greedy, from the writing prompt) or a scripted template "
                        "writer for the built-in game base, which cannot write prose (it fills in the notes that base "
                        "was pretrained to read from the outcomes in the same prompt: "
                        "lightning_ctx/tasks/games/frozenlake_base/writer.py)")
    p.add_argument("--updates", type=int, default=32, help="experience updates")
    p.add_argument("--games", type=int, default=1, help="training games played per update (OPCD: 1)")
    p.add_argument("--eval-every", type=int, default=4, help="score a candidate every N updates")
    p.add_argument("--val-games", type=int, default=32, help="held-out games scoring each candidate")
    p.add_argument("--max-experience-tokens", type=int, default=2048,
                   help="the experience is kept to this many tokens (oldest lines dropped first)")
    p.add_argument("--max-turns", type=int, default=5, help="moves per game")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per game turn")
    p.add_argument("--write-max-new-tokens", type=int, default=1024, help="tokens of one experience update")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling of every game (OPCD: 0.7 / 0.8 / 20)")
    p.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling of every game")
    p.add_argument("--top-k", type=int, default=20, help="top-k sampling of every game (0 = off)")
    p.add_argument("--episode-format", choices=("per_turn", "single_sequence"), default="per_turn",
                   help="per_turn: one prompt per move with the game so far (OPCD); single_sequence: one chat")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                   help="the chat template's enable_thinking (Qwen3; default: the template's own)")
    p.add_argument("--batch-size", type=int, default=16, help="games played in parallel")
    p.add_argument("--seed", type=int, default=0, help="seed of the games and the sampling")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype (float32, bfloat16, float16)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--experiment", default="extract", help="MLflow experiment")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: MLflow's)")
    return p


def extract_main(argv: Sequence[str]) -> int:
    import mlflow
    import torch

    from lightning_ctx.errors import ConfigError
    from lightning_ctx.models.loading import load_causal_lm, load_tokenizer
    from lightning_ctx.rollout import eos_ids_for
    from lightning_ctx.rollout_episodes import ChatFormat, build_format
    from lightning_ctx.textfiles import read_text
    from lightning_ctx.tracking import open_store
    from lightning_ctx.writing import check_output_file, write_text

    a = build_parser().parse_args(list(argv))
    for name in ("updates", "games", "val_games", "eval_every", "max_turns", "max_new_tokens",
                 "write_max_new_tokens", "max_experience_tokens", "batch_size"):
        if getattr(a, name) < 1:
            raise ConfigError(f"must be >= 1, got {getattr(a, name)}", field=f"--{name.replace('_', '-')}")
    if a.temperature <= 0 or not 0 < a.top_p <= 1 or a.top_k < 0:
        raise ConfigError("sampling needs temperature > 0, 0 < top-p <= 1, top-k >= 0", field="--temperature")
    check_env_id(a.env_id, field="--env-id")
    try:
        env_kwargs = None if a.env_kwargs is None else json.loads(a.env_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"is not JSON ({err})", field="--env-kwargs") from None
    check_env_kwargs(a.env_id, env_kwargs, field="--env-kwargs")
    factory = GameFactory(a.env_id, a.max_turns, env_kwargs_for(a.env_id, env_kwargs))
    out = check_output_file(a.out, "--out")  # a folder, or a file in the way of its folder: said before extracting
    uri = open_store()  # MLflow's refused file store, an unreachable server: said before the model loads
    initial = read_text(a.experience, field="--experience").strip() if a.experience else ""
    torch.manual_seed(a.seed)
    tokenizer = load_tokenizer(a.model)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(a.model, dtype=a.dtype).to(device)
    eos_ids = eos_ids_for(tokenizer, model)
    thinking = None if a.enable_thinking is None else a.enable_thinking == "true"
    fmt = build_format(a.episode_format, ChatFormat(tokenizer, [tokenizer.eos_token_id], enable_thinking=thinking))
    play, write = _model_samplers(model, tokenizer, eos_ids, a.max_new_tokens, a.temperature, a.top_p, a.top_k,
                                  a.write_max_new_tokens, fmt)
    if a.writer == "template":
        from lightning_ctx.tasks.games.frozenlake_base.writer import TemplateWriter

        write = TemplateWriter()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(a.experiment)
    with mlflow.start_run(run_name=a.run_name or f"extract-{a.env_id}") as run:
        mlflow.log_params({k: v for k, v in vars(a).items() if v is not None})

        def log(k: int, metrics: dict, texts: dict[str, str]) -> None:
            mlflow.log_metrics({f"extract/{name}": float(v) for name, v in metrics.items()}, step=k)
            for name, text in texts.items():
                mlflow.log_text(text, f"update_{k:03d}/{name}")

        result = run_extraction(play, play, write, fmt, factory, a.updates, a.games,
                                a.val_games, initial, a.mode, a.eval_every, a.max_experience_tokens, a.seed,
                                tokenizer.pad_token_id, device, a.batch_size, log)
        mlflow.log_metrics({"extract/best_update": result.best_update, "extract/best_val_pass": result.best_val_pass})
        if not result.best_experience:
            mlflow.set_tag("extract/result", "no experience")
            raise ConfigError(f"no update wrote any experience in {a.updates} updates (and there was no starting "
                              f"experience): nothing written; see MLflow run {run.info.run_id} for the model's "
                              "replies (more --updates or --write-max-new-tokens, or a starting --experience)",
                              path=out, field="--out")
        mlflow.log_text(result.best_experience, "best_experience.txt")
        write_text(out, result.best_experience + "\n")  # atomic: a full disk leaves no half-written experience
        print(f"best experience: update {result.best_update}, held-out pass rate {result.best_val_pass:.3f} -> {out} "
              f"(MLflow run {run.info.run_id})")
    return 0
