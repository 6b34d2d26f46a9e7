"""Pretraining the game base (``builtin:games``) on the scripted players of :mod:`.players`.

Each example is one turn of a real FrozenLake game on OPCD's boards, rendered exactly as the per-turn format
renders it (:class:`lightning_ctx.rollout_episodes.PerTurnFormat`, history of actions): the prompt holds the
TextArena texts of the game so far (earlier moves drawn from a mix of the two players and a random one, so the
base has seen the states a student wanders into) and, in most examples, an experience; the target is the reply of
the player that experience calls for. The loss covers every token of the example by default (predicting the next
board and position report teaches the geometry the replies need), the reply and its end of turn only with
``--reply-only``.

Command line: ``lightning-ctx pretrain-games --out DIR --seed 0`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from lightning_ctx.errors import ConfigError
from lightning_ctx.models.pretraining import (
    CausalLMPretraining,
    check_pretrain_args,
    collate_prompt_answer,
    count_parameters,
    loadavg,
    machine_report,
    pretrain_trainer,
)
from lightning_ctx.rollout_episodes import ChatFormat, PerTurnFormat, TurnPrompt
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import NO_ACTION, TextGame
from lightning_ctx.tasks.games.frozenlake_base import players as P
from lightning_ctx.tasks.games.frozenlake_base.evaluate import EXPERIENCES, base_report
from lightning_ctx.tasks.games.frozenlake_base.model import build_games_model
from lightning_ctx.tasks.games.frozenlake_base.tokenizer import ENV_ID, build_games_tokenizer, save_games_tokenizer
from lightning_ctx.tasks.games.task import env_kwargs_for, split_seeds
from lightning_ctx.writing import write_text

RANDOM = "random"
PLAYER_LINE = TurnPrompt().player_line  # how the per-turn history shows an earlier move


class RealTexts:
    """TextArena's own texts on OPCD's boards, cached by game state.

    On a FrozenLake board the feedback to a move depends only on the board, the player's cell, the move and whether
    the previous move was invalid (a second invalid move in a row ends the game), so each such state is played
    through a real ``TextGame`` once (tests/tasks/games/test_frozenlake_base.py checks cached histories against
    games played move by move)."""

    def __init__(self, env_kwargs: Optional[dict] = None):
        self.env_kwargs = env_kwargs_for(ENV_ID, env_kwargs)
        self._first: dict = {}
        self._steps: dict = {}

    def board(self, seed: int) -> oracle.FrozenLakeBoard:
        return oracle.board(ENV_ID, self.env_kwargs, seed)

    def _play(self, seed: int, moves: list[str]) -> TextGame:
        game = TextGame(ENV_ID, seed, max_turns=len(moves) + 2, env_kwargs=self.env_kwargs)  # never the turn limit
        game.reset()
        for move in moves:
            game.step(move)
        return game

    def history(self, seed: int, moves: list[str]) -> tuple[list[str], oracle.Cell, bool]:
        """The per-turn history (``[observation, "Your move: [m]", feedback, ...]``) after ``moves`` (replies), the
        player's cell and whether the game is over."""
        board = self.board(seed)
        if board not in self._first:
            game = TextGame(ENV_ID, seed, max_turns=1, env_kwargs=self.env_kwargs)
            self._first[board] = game.reset()
        history, cell, invalid = [self._first[board]], board.start, False
        for k, move in enumerate(moves):
            key = (board, cell, invalid, move)
            if key not in self._steps:
                game = self._play(seed, moves[:k])
                done, feedback = game.step(move)
                self._steps[key] = (done, feedback, game.actions[-1])
            done, feedback, sent = self._steps[key]
            history.append(PLAYER_LINE.format(move=sent))
            if done:
                return history, cell, True
            history.append(feedback)
            result = None if sent == NO_ACTION else board.step(cell, sent.strip("[]"))
            invalid = result is None
            cell = cell if result is None else result[0]
        return history, cell, False


#: How the earlier moves of an example are drawn (the target turn's reply always comes from the player the
#: experience calls for).
BEHAVIOUR = {P.EXPERIENCED: 0.4, P.NAIVE: 0.4, RANDOM: 0.2}
RANDOM_MOVES = ("up", "down", "left", "right", None)  # None: a reply without an action
BUCKET = 8  # batches drawn at once and sorted by length


def sample_experience(rng: random.Random, p_none: float, p_builtin: float) -> Optional[str]:
    """No experience, the built-in one, or a random set of notes in random order (half of them without a hole
    note, so the base learns that only the hole notes change its play)."""
    u = rng.random()
    if u < p_none:
        return None
    if u < p_none + p_builtin:
        return P.BUILTIN_EXPERIENCE
    holes = rng.sample(P.HOLE_NOTES, rng.randint(1, len(P.HOLE_NOTES))) if rng.random() < 0.5 else []
    others = rng.sample(P.OTHER_NOTES, rng.randint(0 if holes else 1, len(P.OTHER_NOTES)))
    notes = holes + others
    rng.shuffle(notes)
    return "\n".join(f"- {n}" for n in notes)


def behaviour_move(rng: random.Random, board: oracle.FrozenLakeBoard, cell: oracle.Cell) -> Optional[str]:
    who = rng.choices(list(BEHAVIOUR), weights=list(BEHAVIOUR.values()))[0]
    if who == RANDOM:
        return rng.choice(RANDOM_MOVES)
    return draw(rng, P.move_probabilities(who, board, cell))


def draw(rng: random.Random, probabilities: dict[str, float]) -> str:
    return rng.choices(list(probabilities), weights=list(probabilities.values()))[0]


class GameTurns(torch.utils.data.IterableDataset):
    """Endless, seeded stream of pretraining batches (already collated: use ``batch_size=None``).

    An example: a training-split game of ``data_seed`` 0 (the games the configs train on; never a validation or
    test game), 0 to ``max_turns - 1`` earlier moves (``BEHAVIOUR``), an experience (``sample_experience``), the
    thinking mode (``p_thinking``: the template's default; otherwise ``enable_thinking: false``), and the target
    reply of ``players.player_for(experience)`` in the current state.
    """

    def __init__(self, tokenizer, batch_size: int = 32, seed: int = 0, n_games: int = 512, max_turns: int = 5,
                 p_none: float = 0.4, p_builtin: float = 0.3, p_thinking: float = 0.7, reply_only: bool = False,
                 env_kwargs: Optional[dict] = None):
        self.tokenizer, self.batch_size, self.seed, self.reply_only = tokenizer, batch_size, seed, reply_only
        self.seeds = split_seeds(0, "train", n_games)
        self.max_turns, self.p_none, self.p_builtin, self.p_thinking = max_turns, p_none, p_builtin, p_thinking
        self.texts = RealTexts(env_kwargs)
        eos = [tokenizer.eos_token_id]
        self.formats = {thinking: PerTurnFormat(ChatFormat(tokenizer, eos, enable_thinking=None if thinking else False))
                        for thinking in (True, False)}

    def example(self, rng: random.Random) -> tuple[list[int], list[int], dict]:
        seed = rng.choice(self.seeds)
        board = self.texts.board(seed)
        turns = rng.randrange(self.max_turns)
        moves, cell = [], board.start
        while len(moves) < turns:
            move = behaviour_move(rng, board, cell)
            history, next_cell, over = self.texts.history(seed, moves + [action_reply(move)])
            if over:
                break
            moves.append(action_reply(move))
            cell = next_cell
        history, cell, _ = self.texts.history(seed, moves)
        experience = sample_experience(rng, self.p_none, self.p_builtin)
        thinking = rng.random() < self.p_thinking
        player = P.player_for(experience)
        move = draw(rng, P.move_probabilities(player, board, cell))
        prompt = self.formats[thinking].prompt_ids(history, experience)
        reply = self.tokenizer(P.reply_text(player, board, cell, move, thinking), add_special_tokens=False).input_ids
        info = {"seed": seed, "turn": len(moves) + 1, "player": player, "thinking": thinking, "move": move}
        return prompt, list(reply) + [self.tokenizer.eos_token_id], info

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(f"lightning_ctx.games.pretrain/{self.seed}")
        while True:
            # BUCKET batches at a time, sorted by length: prompts run from ~140 to ~390 tokens, and right padding
            # to the longest of a random batch wasted a third of every step
            pairs = sorted((self.example(rng)[:2] for _ in range(BUCKET * self.batch_size)),
                           key=lambda pair: len(pair[0]) + len(pair[1]))
            batches = [pairs[i:i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
            rng.shuffle(batches)
            for batch in batches:
                yield self.collate(batch)

    def collate(self, pairs) -> dict[str, torch.Tensor]:
        """Prompt and reply, right-padded; ``labels`` on every real token (the game texts too: predicting the next
        board and position report teaches the geometry the replies need) unless ``reply_only``."""
        batch = collate_prompt_answer(pairs, self.tokenizer.pad_token_id)
        if not self.reply_only:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def action_reply(move: Optional[str]) -> str:
    """A reply that sends ``move`` (None: a reply without an action)."""
    return f"[{move}]" if move else "no move"


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------

#: threads=1: on the shared 2-core machine one thread is the fastest (docs/design.md, pitfalls).
DEFAULTS = dict(layers=3, width=96, heads=4, rope_theta=10000.0, max_steps=400, batch_size=32, lr=5e-3,
                weight_decay=0.1, warmup_steps=20, p_none=0.4, p_builtin=0.3, p_thinking=0.7, reply_only=False,
                eval_games=128, threads=1)


def pretrain_games(output_dir: str | Path, seed: int = 0, progress: bool = True, command: Optional[str] = None,
                   **overrides) -> dict[str, Any]:
    """Pretrain a game base (``DEFAULTS`` updated with ``overrides``), save it (safetensors, tokenizer with its chat
    template, report.json) to ``output_dir`` and return the report."""
    hp = {**DEFAULTS, **overrides}
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pretraining settings {sorted(unknown)}")
    t0 = time.perf_counter()
    load_start = loadavg()
    if hp["threads"]:
        torch.set_num_threads(hp["threads"])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    tokenizer = build_games_tokenizer()
    model = build_games_model(tokenizer, seed=seed, layers=hp["layers"], width=hp["width"], heads=hp["heads"],
                              rope_theta=hp["rope_theta"])
    module = CausalLMPretraining(model, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                 warmup_steps=hp["warmup_steps"], max_steps=hp["max_steps"])
    data = GameTurns(tokenizer, batch_size=hp["batch_size"], seed=seed, p_none=hp["p_none"],
                     p_builtin=hp["p_builtin"], p_thinking=hp["p_thinking"], reply_only=hp["reply_only"])
    trainer = pretrain_trainer(hp["max_steps"], progress)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None, num_workers=0))
    train_seconds = time.perf_counter() - t0

    model.eval()
    t1 = time.perf_counter()
    evaluation = base_report(model, tokenizer, n_games=hp["eval_games"], seed=seed)
    eval_seconds = time.perf_counter() - t1
    model.save_pretrained(str(output_dir))
    save_games_tokenizer(tokenizer, output_dir)  # portable across transformers 4.56 / 5.x
    args = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items() if v != DEFAULTS[k]]
    report = {
        "command": command or shlex.join(["lightning-ctx", "pretrain-games", "--out", str(output_dir), "--seed",
                                          str(seed), *args]),
        "seed": seed,
        "model": {"arch": "qwen3", "layers": hp["layers"], "width": hp["width"], "heads": hp["heads"],
                  "rope_theta": hp["rope_theta"],
                  "intermediate": model.config.intermediate_size, "vocab_size": model.config.vocab_size,
                  "parameters": count_parameters(model), "tie_word_embeddings": True,
                  "max_position_embeddings": model.config.max_position_embeddings},
        "training": {"max_steps": hp["max_steps"], "batch_size": hp["batch_size"], "lr": hp["lr"],
                     "warmup_steps": hp["warmup_steps"], "schedule": "linear warmup + cosine to 5%",
                     "optimizer": f"AdamW(0.9, 0.98), weight decay {hp['weight_decay']} (matrices), grad clip 1.0",
                     "examples": (f"one turn of a training game each ({len(data.seeds)} seeds of the train split); "
                                  f"earlier moves drawn from {BEHAVIOUR}; experience: none {hp['p_none']}, the "
                                  f"built-in one {hp['p_builtin']}, a random set of notes otherwise (half without a "
                                  f"hole note); the template's thinking mode {hp['p_thinking']}, else "
                                  "enable_thinking false"),
                     "loss": "next-token loss on every token of the example (the game texts and the reply)",
                     "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))},
        "eval": evaluation,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        **machine_report(load_start),
    }
    write_text(output_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict[str, Any]) -> str:
    ev = report["eval"]
    lines = [f"pass rate on {ev['n_games']} held-out games ({ev['boards'].split(':')[0]})",
             f"{'decoding':<10} {'thinking':<12} " + " ".join(f"{k:>12}" for k in EXPERIENCES)]
    for decoding in ("sampled", "greedy"):
        for mode, rates in ev[decoding].items():
            lines.append(f"{decoding:<10} {mode:<12} " + " ".join(f"{rates[k]:>12.3f}" for k in EXPERIENCES))
    lines.append("scripted players (exact): " + ", ".join(f"{k} {v:.3f}" for k, v in ev["scripted"].items()))
    lines.append(f"wall time: train {report['train_seconds']:.1f}s, evaluation {report['eval_seconds']:.1f}s")
    return "\n".join(lines)


#: One line per pretraining setting for ``--help``.
SETTING_HELP = {
    "layers": "transformer blocks", "width": "hidden size", "heads": "attention heads",
    "rope_theta": "rotary embedding base", "max_steps": "optimizer steps", "batch_size": "turns per step",
    "lr": "peak AdamW learning rate (cosine decay)", "weight_decay": "AdamW weight decay on the matrices",
    "warmup_steps": "linear warm-up steps", "p_none": "share of examples without an experience",
    "p_builtin": "share of examples with the built-in experience (the rest: random sets of notes)",
    "p_thinking": "share of examples in the template's thinking mode (the rest: enable_thinking false)",
    "reply_only": "loss on the reply only (default: every token of the example)",
    "eval_games": "held-out games in the final report", "threads": "torch threads (0 = leave as is)",
}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from lightning_ctx.console import PlainHelpFormatter

    p = argparse.ArgumentParser(prog="lightning-ctx pretrain-games", formatter_class=PlainHelpFormatter,
                                description="Pretrain the FrozenLake game base (what builtin:games ships) from scratch "
                                            "on CPU on the scripted players and print its held-out pass rates.")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, report.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the example stream")
    for key, value in DEFAULTS.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=SETTING_HELP[key])
        else:
            p.add_argument(flag, type=type(value), default=value, help=SETTING_HELP[key])
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    check_pretrain_args(a, at_least_one=("layers", "width", "heads", "max_steps", "batch_size", "eval_games"),
                        non_negative=("warmup_steps", "threads", "weight_decay", "rope_theta"),
                        fractions=("p_none", "p_builtin", "p_thinking"))
    if a.p_none + a.p_builtin > 1:
        raise ConfigError(f"--p-none {a.p_none} + --p-builtin {a.p_builtin} must be at most 1", field="--p-builtin")
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    report = pretrain_games(a.out, seed=a.seed, progress=not a.no_progress,
                            command=shlex.join(["lightning-ctx", "pretrain-games", *argv_list]),
                            **{k: getattr(a, k) for k in DEFAULTS})
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
