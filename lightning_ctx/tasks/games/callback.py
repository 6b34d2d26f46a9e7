"""``GameEvalCallback``: the episode-level evaluation of :mod:`lightning_ctx.tasks.games.evaluate` inside a Trainer.

Scheduled, logged, kept and uploaded by :class:`~lightning_ctx.eval.base_callback.EvaluationCallback` (step 0,
every ``every_n_steps`` steps and the end of fit; ``validate`` / ``test``). Logs the metrics of
:data:`~lightning_ctx.tasks.games.metrics.GAMES`: ``{prefix}pass_no_ctx``, ``{prefix}pass_ctx``, ``{prefix}harm``,
``{prefix}help``, turns, invalid-move rates, lengths, each with its 95% interval over games (``{prefix}harm_lo``,
``{prefix}harm_hi``, ``{prefix}n_items``), the oracle's ceiling and floor on the same seeds (``{prefix}pass_oracle``,
``{prefix}pass_random``) and the mechanistic metrics (``ctx_kl``, ``hidden_cos/*``); ``ref/teacher_pass_ctx`` once
(the teacher with the experience, when the teacher is a separate model; with the frozen initial student it equals
step 0's ``pass_ctx``). Uploads ``{prefix}step_000050/transcripts.json`` (every game both ways, as the student saw
it), ``curves.png`` and ``hidden_cos.png``. Each rank plays every ``world_size``-th seed; the rows are gathered
before the metrics are computed; rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from lightning_ctx.errors import DataError
from lightning_ctx.eval.artifacts import clean
from lightning_ctx.eval.base_callback import Evaluation, EvaluationCallback
from lightning_ctx.eval.evaluator import ContextMechanics, Sharding, resolve_layers
from lightning_ctx.knobs import above, at_least, check_class_args, within
from lightning_ctx.rollout import SamplingSettings, sample_responses
from lightning_ctx.tasks.games.evaluate import context_mechanics, pass_rate, play_both, reference_rates
from lightning_ctx.tasks.games.metrics import GAMES, measure_games
from lightning_ctx.tasks.games.task import GamesTask
from lightning_ctx.writing import write_text


class GameEvalCallback(EvaluationCallback):
    """Pass rates without and with the experience on the same seeds (see the module docstring).

    Args:
        max_games: cap on evaluated games (None = the whole split).
        greedy: greedy decoding instead of sampling; by default the games are sampled as OPCD evaluates them, at
            ``temperature`` 0.7, ``top_p`` 0.8, ``top_k`` 20 (0 = no top-k filter), seeded with ``seed``.
        mechanics: also log ``ctx_kl`` and ``hidden_cos/*`` on the turns played without the experience (one
            teacher-forced pass of the student without and one with it); ``hidden_layers``: indices into HF's
            ``hidden_states`` (None = every block).

    Other arguments as in :class:`~lightning_ctx.eval.base_callback.EvaluationCallback` (every_n_steps: 0 = only
    at the start and the end; eval_at_start, eval_at_end, split, test_split, batch_size: games decoded together,
    max_new_tokens: tokens per turn, seed, n_resamples, log_references: ``ref/teacher_pass_ctx`` once when the
    teacher is a separate model, log_artifacts: the transcripts and plots, prefix, test_prefix, progress,
    metric_modules).
    """

    KNOB_CHECKS = (at_least("max_games", 1),
                   above("temperature", 0, when=lambda a: not a["greedy"], hint="or set greedy: true"),
                   within("top_p", 0, 1, low_open=True), at_least("top_k", 0))
    registry = GAMES
    unit = "games"
    curve_references = ("teacher_pass_ctx",)

    def __init__(self, max_games: Optional[int] = None, greedy: bool = False, temperature: float = 0.7,
                 top_p: float = 0.8, top_k: int = 20, mechanics: bool = True, hidden_layers: Optional[list[int]] = None,
                 every_n_steps: Optional[int] = 25, **kwargs):
        check_class_args(GameEvalCallback, {**locals(), **kwargs}, "trainer.callbacks.")
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        self.max_games = max_games
        self.greedy, self.temperature, self.top_p, self.top_k = greedy, temperature, top_p, top_k
        self.mechanics, self.hidden_layers = mechanics, hidden_layers

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

    def check_setup(self, trainer, pl_module, split: str) -> None:
        self._dm(trainer, pl_module)

    # -- one evaluation --------------------------------------------------------------------------
    def evaluate(self, trainer, pl_module, split: str, prefix: str, step: int) -> Optional[Evaluation]:
        dm = self._dm(trainer, pl_module)
        seeds = self.seeds(dm, split)
        if not seeds:
            self.warn_once(f"empty:{split}", f"GameEvalCallback: the {split!r} split has no games; skipping")
            return None
        sharding = Sharding(int(trainer.global_rank), int(trainer.world_size))
        batch_size = self.batch_size or dm.eval_batch_size
        rows, plain = play_both(self.sampler(pl_module, pl_module.student), dm.task.episodes, dm.task.factory,
                                [s for _, s in sharding.shard(seeds)], dm.task.experience, pl_module.pad_token_id,
                                pl_module.device, batch_size)
        mechanics = ContextMechanics()
        if self.mechanics:
            student = pl_module.student
            mechanics = context_mechanics(student, dm.task.episodes, plain, dm.task.experience, pl_module.pad_token_id,
                                          resolve_layers(student, self.hidden_layers), pl_module.vocab_size,
                                          batch_size)
        rows = sorted((r for part in self.gather(rows) for r in part), key=lambda r: r["seed"])
        # with the oracle's ceiling and the random player's floor on the same seeds
        metrics = measure_games(rows, reference_rates(dm.task.factory, seeds), seed=self.seed,
                                n_resamples=self.n_resamples)
        metrics.update(ContextMechanics.gathered(mechanics, sharding).compute())
        return Evaluation(metrics, len(seeds), {"rows": rows})

    def write_tables(self, folder: Path, evaluation: Evaluation, *, stage: str, prefix: str, step: int,
                     split: str) -> list[Path]:
        payload = clean({"step": step, "split": split, "metrics": evaluation.metrics,
                         "games": evaluation.tables["rows"]})
        return [write_text(folder / "transcripts.json", json.dumps(payload, indent=1))]

    def measure_references(self, trainer, pl_module, split: str, before_training: bool) -> Optional[dict[str, float]]:
        """``teacher_pass_ctx``: a separate teacher's pass rate with the experience."""
        teacher = getattr(pl_module, "teacher", None)
        if pl_module.hparams.get("teacher") in (None, "base") or not isinstance(teacher, torch.nn.Module):
            return {}
        dm = self._dm(trainer, pl_module)
        seeds = self.seeds(dm, split)[int(trainer.global_rank)::int(trainer.world_size)]
        _, episodes = pass_rate(self.sampler(pl_module, teacher), dm.task.episodes, dm.task.factory, seeds,
                                dm.task.experience, pl_module.pad_token_id, pl_module.device,
                                self.batch_size or dm.eval_batch_size)
        passed = [p for part in self.gather([bool(e.outcome.passed) for e in episodes]) for p in part]
        return {"teacher_pass_ctx": sum(passed) / max(len(passed), 1)}
