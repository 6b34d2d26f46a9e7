"""``GameEvalCallback``: the episode-level evaluation of :mod:`lightning_ctx.tasks.games.evaluate` inside a Trainer.

Logs ``{prefix}pass_no_ctx``, ``{prefix}pass_ctx``, ``{prefix}harm``, ``{prefix}help``, turns, invalid-move rates,
lengths, the oracle's ceiling and floor on the same seeds (``{prefix}pass_oracle``, ``{prefix}pass_random``) and the
mechanistic metrics (``ctx_kl``, ``hidden_cos/*``) at the global step (at step 0 before training, every
``every_n_steps`` steps and at the end of fit; on ``validate`` / ``test``), ``ref/teacher_pass_ctx`` once (the
teacher with the experience, when the teacher is a separate model; with the frozen initial student it equals step 0's
``pass_ctx``), and uploads ``{prefix}step_000050/transcripts.json`` (every game both ways, as the student saw it).
Each rank plays every ``world_size``-th seed; results are gathered before the metrics are computed; rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ctx.errors import DataError
from lightning_ctx.eval.artifacts import clean
from lightning_ctx.eval.callback import log_to_loggers, upload_artifacts
from lightning_ctx.eval.evaluator import gather_objects, resolve_layers, seeded_rng
from lightning_ctx.knobs import above, at_least, check_class_args, within
from lightning_ctx.rollout import SamplingSettings, sample_responses
from lightning_ctx.tasks.games.evaluate import (
    GameSummary,
    Mechanics,
    context_mechanics,
    evaluate_games,
    game_metrics,
    pass_rate,
    reference_rates,
)
from lightning_ctx.tasks.games.task import GamesTask

SUMMARY_KEYS = ("pass_no_ctx", "pass_ctx", "harm", "help", "turns_no_ctx", "invalid_rate_no_ctx", "pass_oracle",
                "pass_random")


class GameEvalCallback(Callback):
    """Pass rates without and with the experience on the same seeds (see the module docstring).

    Args:
        every_n_steps: evaluate every N optimizer steps during fit (0 = only at the start and the end).
        eval_at_start / eval_at_end: evaluate at step 0 before training / at the end of fit.
        split / test_split: the games evaluated during fit and ``validate`` / on ``test``.
        max_games: cap on evaluated games (None = the whole split).
        batch_size: games decoded together (None = the data module's ``eval_batch_size``).
        max_new_tokens: tokens per turn (None = the module's ``max_new_tokens``).
        greedy: greedy decoding instead of sampling; by default the games are sampled as OPCD evaluates them, at
            ``temperature`` 0.7, ``top_p`` 0.8, ``top_k`` 20 (0 = no top-k filter), seeded with ``seed``.
        mechanics: also log ``ctx_kl`` and ``hidden_cos/*`` on the turns played without the experience (one
            teacher-forced pass of the student without and one with it); ``hidden_layers``: indices into HF's
            ``hidden_states`` (None = every block).
        log_references: log ``ref/teacher_pass_ctx`` once when the teacher is a separate model.
        log_artifacts: upload the transcripts. prefix / test_prefix: metric name prefixes.
    """

    KNOB_CHECKS = (at_least("every_n_steps", 0), at_least("max_games", 1), at_least("batch_size", 1),
                   at_least("max_new_tokens", 1),
                   above("temperature", 0, when=lambda a: not a["greedy"], hint="or set greedy: true"),
                   within("top_p", 0, 1, low_open=True), at_least("top_k", 0))

    def __init__(self, every_n_steps: int = 25, eval_at_start: bool = True, eval_at_end: bool = True,
                 split: str = "val", test_split: str = "test", max_games: Optional[int] = None,
                 batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None, greedy: bool = False,
                 temperature: float = 0.7, top_p: float = 0.8, top_k: int = 20, seed: int = 0,
                 mechanics: bool = True, hidden_layers: Optional[list[int]] = None, log_references: bool = True,
                 log_artifacts: bool = True, prefix: str = "eval/", test_prefix: str = "test/"):
        check_class_args(GameEvalCallback, locals(), "trainer.callbacks.")
        super().__init__()
        self.every_n_steps, self.eval_at_start, self.eval_at_end = every_n_steps, eval_at_start, eval_at_end
        self.split, self.test_split, self.max_games = split, test_split, max_games
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.greedy, self.temperature, self.top_p, self.top_k, self.seed = greedy, temperature, top_p, top_k, seed
        self.mechanics, self.hidden_layers = mechanics, hidden_layers
        self.log_references, self.log_artifacts = log_references, log_artifacts
        self.prefix, self.test_prefix = prefix, test_prefix
        self.history: list[dict] = []
        self._last_step: Optional[int] = None
        self._refs_done = False

    # -- what is played --------------------------------------------------------------------------
    def _dm(self, trainer, pl_module):
        """The data module, connected; its task is a :class:`GamesTask` (episodes, factory, experience)."""
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(getattr(dm, "task", None), GamesTask):
            raise DataError("GameEvalCallback needs data.task: lightning_ctx.tasks.games.GamesTask")
        dm.connect(pl_module.tokenizer)
        return dm

    def seeds(self, dm, split: str) -> list[int]:
        seeds = [r.meta["seed"] for r in dm.records(split)]
        return seeds[: self.max_games] if self.max_games is not None else seeds

    def settings(self, pl_module) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens or pl_module.sampling.max_new_tokens,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, greedy=self.greedy)

    def sampler(self, pl_module, model):
        settings = self.settings(pl_module)

        def sample(ids, mask):
            return sample_responses(model, ids, mask, settings, pl_module.eos_token_ids, pl_module.pad_token_id,
                                    pl_module.engine)
        return sample

    # -- one evaluation --------------------------------------------------------------------------
    def evaluate(self, trainer, pl_module, split: str, prefix: str) -> Optional[dict[str, float]]:
        dm = self._dm(trainer, pl_module)
        seeds = self.seeds(dm, split)
        if not seeds:
            rank_zero_warn(f"GameEvalCallback: the {split!r} split has no games; skipping")
            return None
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        mine = seeds[rank::world]
        batch_size = self.batch_size or dm.eval_batch_size
        with seeded_rng(pl_module.device, self.seed + rank):
            result = evaluate_games(self.sampler(pl_module, pl_module.student), dm.task.episodes, dm.task.factory,
                                    mine, dm.task.experience, pl_module.pad_token_id, pl_module.device, batch_size)
        mechanics = Mechanics()
        if self.mechanics:
            student = pl_module.student
            mechanics = context_mechanics(student, dm.task.episodes, result.episodes_no_ctx, dm.task.experience,
                                          pl_module.pad_token_id, resolve_layers(student, self.hidden_layers),
                                          pl_module.vocab_size, batch_size)
        parts = gather_objects((result.transcripts, result.no_ctx, result.ctx, mechanics))
        rows = sorted((r for p in parts for r in p[0]), key=lambda r: r["seed"])
        no_ctx, ctx = _merge([p[1] for p in parts]), _merge([p[2] for p in parts])
        for p in parts[1:]:
            parts[0][3].merge(p[3])
        # with the oracle's ceiling and the random player's floor on the same seeds
        metrics = {**game_metrics(no_ctx, ctx, reference_rates(dm.task.factory, seeds)), **parts[0][3].compute()}
        step = int(trainer.global_step)
        log_to_loggers(trainer.loggers, lambda k, m: rank_zero_warn(m), {f"{prefix}{k}": v for k, v in metrics.items()},
                       step)
        for k, v in metrics.items():
            trainer.callback_metrics[f"{prefix}{k}"] = torch.tensor(v)
        self.history.append({"step": step, "prefix": prefix, "metrics": dict(metrics)})
        if trainer.is_global_zero:
            rank_zero_info(f"[{prefix}step {step}, {split}, {len(seeds)} games] "
                           + " ".join(f"{k}={metrics[k]:.3f}" for k in SUMMARY_KEYS))
            if self.log_artifacts:
                self._publish(trainer, prefix, step, split, metrics, rows)
        return metrics

    def _publish(self, trainer, prefix: str, step: int, split: str, metrics: dict, rows: list[dict]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="lightning_ctx_games_"))
        try:
            path = tmp / "transcripts.json"
            path.write_text(json.dumps(clean({"step": step, "split": split, "metrics": metrics, "games": rows}),
                                       indent=1))
            upload_artifacts(trainer.loggers, [(path, f"{prefix}step_{step:06d}")])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _references(self, trainer, pl_module) -> None:
        """``ref/teacher_pass_ctx``: a separate teacher's pass rate with the experience (once)."""
        self._refs_done = True
        teacher = getattr(pl_module, "teacher", None)
        if not self.log_references or pl_module.hparams.get("teacher") in (None, "base") \
                or not isinstance(teacher, torch.nn.Module):
            return
        dm = self._dm(trainer, pl_module)
        seeds = self.seeds(dm, self.split)[int(trainer.global_rank)::int(trainer.world_size)]
        with seeded_rng(pl_module.device, self.seed):
            _, episodes = pass_rate(self.sampler(pl_module, teacher), dm.task.episodes, dm.task.factory, seeds,
                                    dm.task.experience, pl_module.pad_token_id, pl_module.device,
                                    self.batch_size or dm.eval_batch_size)
        summary = _merge(gather_objects(GameSummary.of(episodes)))
        value = sum(summary.passed) / max(len(summary.passed), 1)
        log_to_loggers(trainer.loggers, lambda k, m: rank_zero_warn(m), {"ref/teacher_pass_ctx": value},
                       int(trainer.global_step))

    # -- Lightning hooks -------------------------------------------------------------------------
    def _fit_eval(self, trainer, pl_module) -> None:
        if self._last_step == trainer.global_step:
            return
        self._last_step = int(trainer.global_step)
        self.evaluate(trainer, pl_module, self.split, self.prefix)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._refs_done:
            self._references(trainer, pl_module)
        if self.eval_at_start and trainer.global_step == 0:
            self._fit_eval(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_steps, trainer.global_step
        if n and step > 0 and step % n == 0:
            self._fit_eval(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.eval_at_end:
            self._fit_eval(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if fn == "validate" and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, self.split, self.prefix)

    def on_test_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module, self.test_split, self.test_prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = state_dict.get("last_step")


def _merge(parts: list[GameSummary]) -> GameSummary:
    out = GameSummary()
    for p in parts:
        for name in ("passed", "rewards", "turns", "invalid", "tokens"):
            getattr(out, name).extend(getattr(p, name))
    return out
