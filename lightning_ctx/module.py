"""``OnPolicyDistillation``: one training step = rollout -> teacher scoring -> student passes -> loss.

    L = opd_weight * L_opd + anchor_weight * L_anchor (+ retain_weight * L_retain) (+ extra terms)

The terms are data (:mod:`lightning_ctx.loss`): the module samples the rollouts they ask for and logs, checks and
accumulates every term by iterating over them.

* ``L_opd``: token divergence between the student without context and the frozen teacher with
  context, on the student's own sampled response (reverse KL by default).
* ``L_anchor``: KL(sg[p_student(.|x, y<t)] || p_student(.|c, x, y<t)) on the same response; the anchor
  reuses the no-context logits of the OPD pass (one extra with-context forward, no extra no-context one).
* ``L_retain`` (optional): on the same prompts under *other* contexts c', the student's own response
  is scored by student and teacher with c', so distillation does not make the student blind to c'.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ctx.checkpointing import add_run_state, restore_rng_states, rng_states_for_rank, save_beside_checkpoints
from lightning_ctx.data.batches import ContextPairBatch
from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.distributed import StepTokens, any_rank, global_token_scale, is_sharded
from lightning_ctx.knobs import Check, ConfigError, above, at_least, check_class_args, non_empty, one_of, within
from lightning_ctx.loss import DistillationLoss, LossTerm
from lightning_ctx.models.loading import DTYPES, ModelError, load_model_config
from lightning_ctx.models.scoring import response_logits
from lightning_ctx.models.teachers import build_student_and_teacher, check_model_choices
from lightning_ctx.objectives import ConsistencyDirection, DivergenceKind, Scope
from lightning_ctx.optim import build_optimizer
from lightning_ctx.rollout import ENGINES, Rollout, SamplingSettings, build_engine, eos_ids_for, sample_responses
from lightning_ctx.rollout_episodes import EpisodeBatch

ROLLOUT = "rollout"  # what a non-finite step names when the student's sampling distribution itself was non-finite


def nonfinite_message(step: int, bad: Optional[str], terms: dict[str, torch.Tensor], saved: Optional[str],
                      names: Sequence[str]) -> str:
    values = ", ".join(f"{k}={terms[k].item():.4g}" for k in names if k in terms)
    if bad == ROLLOUT:
        what = "the student's next-token probabilities while sampling the rollout (the weights have diverged)"
    elif bad:
        what = f"term '{bad}' = {terms[bad].item()} ({values})"
    else:
        what = f"on another rank (this rank's: {values or 'its rollout failed'})"
    return (f"non-finite loss at step {step}: {what}"
            + (f"; state before this step saved to {saved}" if saved else "")
            + "; set model.on_nonfinite=skip to skip such steps instead")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of an HF model (transformers 5 renamed gradient checkpointing)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def first_nonfinite(terms: dict[str, torch.Tensor], names: Sequence[str]) -> Optional[str]:
    """The first of the loss terms ``names`` (then ``loss``) that is NaN/inf, or None."""
    for name in (*names, "loss"):
        if name in terms and not torch.isfinite(terms[name]).all():
            return name
    return None


LOADED_IN_CONFIGURE_MODEL = frozenset({"student", "teacher", "vocab_size", "objective", "eos_token_ids", "step_tokens"})


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term is NaN/inf; names the step and the term."""


class OnPolicyDistillation(pl.LightningModule):
    """On-policy context distillation with the anchored context-removability regularizer.

    Args:
        student: HF causal LM folder (or an id already in the HF cache), or ``builtin:world``.
        teacher: None = frozen copy of the initial student (self-distillation with context; with ``lora``
            the base weights with the adapter disabled, which *are* the initial student); ``base`` = the LoRA
            student's base weights with the adapter disabled (one copy of the weights in memory); else a
            folder/id of a model sharing the student's tokenizer.
        lora: peft LoRA on the student, e.g. ``{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}``
            (None = full fine-tuning). Only the adapter trains; checkpoints still hold the full student.
        teacher_quantization: ``4bit`` (NF4) | ``8bit`` (LLM.int8) bitsandbytes loading of the teacher (a
            separate checkpoint, or the initial student re-loaded quantized when ``teacher`` is None).
        opd_weight: weight of the teacher-matching term on the student's own responses (``opd``; 0 drops it, e.g.
            for the off-policy baseline, ``builtin:methods/offpolicy_cd.yaml``).
        anchor_weight: beta of the anchored consistency term (0 = plain OPD; 0.5 was best in the paper).
        retain_weight: weight of the optional other-context retention term (needs ``data.retain_contexts``).
        extra_terms: more loss terms (``lightning_ctx.loss.LossTerm`` subclasses, ``class_path`` + ``init_args``),
            logged, normalised and checked like the built-in ones.
        divergence: ``reverse_kl`` | ``forward_kl`` | ``jsd`` | ``sampled`` (sampled-token estimator).
        jsd_beta: beta of the generalized JSD (0 = forward KL, 1 = reverse KL).
        scope: ``full`` vocabulary or the student's ``topk`` indices (``topk``, ``topk_union_teacher``).
        topk_renormalize: ``scope: topk`` only: renormalise over the index set (OPCD's ``kl_renorm_topk``; off as
            in OPCD = full-vocabulary log-probs at the indices). The paper's safety settings turn it on.
        gradient_checkpointing: recompute the student's activations in backward (less memory, more compute).
        chunk_size: sequence chunk for the KL terms (bounds float32 ``[B, chunk, V]`` memory); None = automatic
            (see ``auto_chunk``).
        auto_chunk / auto_chunk_mib: with ``chunk_size`` None and a vocabulary of >= 32768 entries, chunk so
            that one float32 ``[B, chunk, V]`` block is at most ``auto_chunk_mib`` MiB (256: chunk 27 for
            B = 16, V = 151936). Smaller vocabularies stay unchunked. ``auto_chunk: false`` = never chunk
            unless ``chunk_size`` is set. Chunked losses equal unchunked ones (they are recomputed in backward).
        anchor_direction: ``forward`` (paper) | ``reverse`` | ``symmetric``; ``detach_anchor``: stop-gradient on
            the anchor.
        max_new_tokens / temperature / top_p / top_k: rollout sampling; ``rollout_engine``: ``hf`` (``generate``) |
            ``hf_static`` (static KV cache, compiled on a GPU) | ``loop`` (lean decode loop, fastest on a CPU) |
            ``hf_static_nocompile`` | ``hf_static_compile``; see ``lightning_ctx.rollout``.
        greedy_rollout: decode rollouts greedily instead of sampling (deterministic; for tests and debugging).
        rollout_warmup: decode one dummy batch of the training shape at fit start (compilation, CUDA graph
            capture and the static cache's sizing then stay out of the timed steps).
        optimizer: ``adamw`` (torch) | ``adamw8bit`` (bitsandbytes, 8-bit optimizer states).
        lr / weight_decay / warmup_steps / lr_schedule (``constant`` | ``cosine``) / min_lr_ratio: AdamW schedule.
        dtype / teacher_dtype: weights dtype (``float32`` | ``bfloat16`` | ``float16``).
        trust_remote_code: off unless asked. local_files_only: never download implicitly.
        on_nonfinite: ``raise`` (save a checkpoint, then stop with the step and term) or ``skip`` the step.
    """

    KNOB_CHECKS = (
        non_empty("student"),
        at_least("opd_weight", 0), at_least("anchor_weight", 0), at_least("retain_weight", 0),
        Check("opd_weight", lambda v: v > 0, "> 0: it is the only loss term",
              when=lambda a: not a["anchor_weight"] and not a["retain_weight"] and not a.get("extra_terms"),
              hint="or add a term (model.extra_terms)"),
        within("jsd_beta", 0, 1),  # the Literal-typed choices (divergence, scope, ...) are checked from their types
        at_least("topk", 1), at_least("chunk_size", 1), at_least("auto_chunk_mib", 1),
        Check("topk_renormalize", lambda v: not v, "has no effect unless model.scope is topk",
              when=lambda a: a["scope"] != "topk", hint="set model.scope: topk or model.topk_renormalize: false"),
        at_least("max_new_tokens", 1),
        above("temperature", 0, when=lambda a: not a["greedy_rollout"], hint="or set model.greedy_rollout: true"),
        within("top_p", 0, 1, low_open=True), at_least("top_k", 0), one_of("rollout_engine", sorted(ENGINES)),
        above("lr", 0), at_least("weight_decay", 0), at_least("warmup_steps", 0), within("min_lr_ratio", 0, 1),
        one_of("dtype", sorted(DTYPES)), one_of("teacher_dtype", sorted(DTYPES)),
    )

    def __init__(
        self,
        student: str = "builtin:world",
        teacher: Optional[str] = None,
        opd_weight: float = 1.0,
        anchor_weight: float = 0.0,
        retain_weight: float = 0.0,
        extra_terms: Optional[list[LossTerm]] = None,
        divergence: Literal[DivergenceKind, "sampled"] = "reverse_kl",
        jsd_beta: float = 0.5,
        scope: Scope = "full",
        topk: int = 256,
        topk_union_teacher: bool = False,
        topk_renormalize: bool = False,
        chunk_size: Optional[int] = None,
        auto_chunk: bool = True,
        auto_chunk_mib: int = 256,
        anchor_direction: ConsistencyDirection = "forward",
        detach_anchor: bool = True,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        rollout_engine: str = "hf",
        greedy_rollout: bool = False,
        rollout_warmup: bool = True,
        optimizer: Literal["adamw", "adamw8bit"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.0,
        dtype: str = "float32",
        teacher_dtype: Optional[str] = None,
        lora: Optional[dict[str, Any]] = None,
        teacher_quantization: Optional[Literal["4bit", "8bit"]] = None,
        trust_remote_code: bool = False,
        local_files_only: bool = True,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        gradient_checkpointing: bool = False,
    ):
        check_class_args(OnPolicyDistillation, locals(), "model.")
        super().__init__()
        self.save_hyperparameters()
        self.sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         top_k=top_k, greedy=greedy_rollout)
        self.engine = build_engine(rollout_engine)
        # Cheap things now (tokenizer, config, the teacher's tokenizer): errors before any run starts. The weights
        # load in configure_model, under the strategy's device and init context (straight onto each rank's device).
        self.tokenizer = check_model_choices(student, teacher, lora, teacher_quantization, trust_remote_code,
                                             local_files_only)
        self.model_config = load_model_config(student, trust_remote_code, local_files_only)
        self.pad_token_id = self.tokenizer.pad_token_id
        self._extra_terms = list(extra_terms or ())
        self._models_loaded = False
        self.skipped_steps = 0
        # The teacher is rebuilt from its source on load: checkpoints hold the student only.
        self.strict_loading = False
        self._step_started: float | None = None

    # -- the models -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the student and the teacher (once; Lightning calls this in fit / validate / test under the strategy's
        device and init context, ``load_from_checkpoint`` before restoring). Direct use from Python loads them on
        the first access to ``student``, ``teacher``, ``objective``, ... (see ``__getattr__``)."""
        if self._models_loaded:
            return
        hp = self.hparams
        _, student, teacher, vocab_size = build_student_and_teacher(
            hp.student, hp.teacher, lora=hp.lora, teacher_quantization=hp.teacher_quantization, dtype=hp.dtype,
            teacher_dtype=hp.teacher_dtype, trust_remote_code=hp.trust_remote_code,
            local_files_only=hp.local_files_only, tokenizer=self.tokenizer)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(student)
        objective = DistillationLoss.from_hparams(hp, vocab_size, self._extra_terms)
        self.student, self.teacher, self.vocab_size, self.objective = student, teacher, vocab_size, objective
        self.eos_token_ids = eos_ids_for(self.tokenizer, student)
        self.step_tokens = StepTokens(objective.terms)  # per-token sums over one optimizer step's micro-batches
        self._models_loaded = True

    def __getattr__(self, name: str):
        # The models and what depends on them, loaded on first use outside a Trainer (notebooks, tests)
        if name in LOADED_IN_CONFIGURE_MODEL and not self.__dict__.get("_models_loaded", True):
            self.configure_model()
            return getattr(self, name)  # now an attribute or a submodule
        return super().__getattr__(name)

    def state_dict(self, *args, **kwargs):
        self.configure_model()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.configure_model()
        return super().load_state_dict(*args, **kwargs)

    # -- checks ---------------------------------------------------------------------------------
    def check_data(self, datamodule) -> None:
        """Every prompt (with context) plus ``max_new_tokens`` must fit the model's positions, and the
        retention term needs other contexts to retain (else it would silently be plain OPD)."""
        if self.hparams.retain_weight > 0 and not datamodule.retain_contexts:
            raise ConfigError(f"is {self.hparams.retain_weight}, but there are no other contexts to retain: set "
                              "data.retain_contexts or data.retain_others: true, or model.retain_weight: 0",
                              field="model.retain_weight")
        limit = getattr(self.model_config, "max_position_embeddings", None)
        if limit is None:
            return
        longest = datamodule.longest_prompt()
        if longest + self.sampling.max_new_tokens > limit:
            raise ModelError(f"{self.hparams.student}: the longest context + prompt ({longest} tokens) plus "
                             f"model.max_new_tokens={self.sampling.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={limit}")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(dm, TaskDataModule):
            dm.connect(self.tokenizer)
            self.check_data(dm)

    # -- the step -------------------------------------------------------------------------------
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               settings: Optional[SamplingSettings] = None, model=None) -> Rollout:
        """Responses for left-padded prompts: on-policy from the student (or from ``model``)."""
        settings = settings or self.sampling
        if self._trainer is not None and is_sharded(self.trainer) and self.trainer.world_size > 1:
            # sharded weights: each forward gathers them from every rank, so all ranks decode in step
            settings = dataclasses.replace(settings, sync_ranks=True)
        return sample_responses(self.student if model is None else model, prompt_ids, prompt_mask, settings,
                                self.eos_token_ids, self.pad_token_id, self.engine)

    def _teacher_logits(self, inputs) -> torch.Tensor:
        self.teacher.eval()  # Lightning's .train() on the module also reaches the teacher
        with torch.no_grad():
            return response_logits(self.teacher, inputs, self.vocab_size)

    def _token_scale(self, mask: torch.Tensor) -> Optional[torch.Tensor]:
        return global_token_scale(self.trainer, mask) if self._trainer is not None else None

    def compute_losses(self, batch: ContextPairBatch, rollouts: Rollout | Mapping[str, Rollout],
                       local: bool = False) -> dict[str, torch.Tensor]:
        """All loss terms for a batch and fixed rollouts (one ``Rollout`` = the student's; or ``{"student": ...,
        "retain": ..., "teacher": ...}``); ``loss`` is their weighted sum.

        Per-token means, over the global batch under DDP/FSDP (``global_token_scale``); ``local``: over this
        rank's tokens only (training turns them into the step's per-token mean itself, see ``StepTokens``).
        """
        scale = (lambda mask: None) if local else self._token_scale
        if isinstance(rollouts, Rollout):
            rollouts = {"student": rollouts}
        return self.objective(self.student, self._teacher_logits, batch, rollouts, scale)

    def sample_rollouts(self, batch) -> tuple[ContextPairBatch, dict[str, Rollout]]:
        """The rollouts the loss terms ask for (``student``: the student without the context; ``retain``: the
        student under another context; ``teacher``: the teacher with the context)."""
        needed = self.objective.rollouts
        if isinstance(batch, EpisodeBatch):  # multi-turn games: played, then scored like single responses
            if set(needed) - {"student"}:
                raise ConfigError(f"game episodes support the terms on the student's own rollout only, not on "
                                  f"{sorted(set(needed) - {'student'})}", field="model.extra_terms")
            batch, rollout = batch.play(self.sample, self.device)
            return batch, {"student": rollout}
        rollouts = {}
        if "student" in needed:
            rollouts["student"] = self.sample(batch.prompt_ids, batch.prompt_mask)
        if "retain" in needed and batch.retain_prompt_ids is not None:
            rollouts["retain"] = self.sample(batch.retain_prompt_ids, batch.retain_prompt_mask)
        if "teacher" in needed:
            rollouts["teacher"] = self.sample(batch.ctx_prompt_ids, batch.ctx_prompt_mask, model=self.teacher)
        return batch, rollouts

    def model_step(self, batch: ContextPairBatch, local: bool = False) -> tuple[dict[str, torch.Tensor], Rollout]:
        """Shared by training and validation: sample the rollouts, then compute every term; returns the terms and
        the main rollout."""
        t0 = time.perf_counter()
        batch, rollouts = self.sample_rollouts(batch)
        t_rollout = time.perf_counter() - t0
        terms = self.compute_losses(batch, rollouts, local=local)
        terms["time_rollout_s"] = torch.tensor(t_rollout)
        return terms, rollouts[self.objective.rollouts[0]]

    def training_step(self, batch: ContextPairBatch, batch_idx: int):
        trainer = self.trainer if self._trainer is not None else None
        try:
            terms, rollout = self.model_step(batch, local=True)
            bad = first_nonfinite(terms, self.step_tokens.names[:-2])
        except RuntimeError as err:  # torch.multinomial on NaN/inf probabilities: the same as a non-finite loss
            if "probability tensor contains" not in str(err):
                raise
            terms, rollout, bad = {}, None, ROLLOUT
        # All ranks decide together: a rank that skipped (or raised) alone would leave the others waiting in
        # the gradient all-reduce.
        if any_rank(trainer, bad is not None):
            return self._nonfinite_step(trainer, bad, terms)
        self.log_terms("train", terms, rollout, batch_size=len(batch))
        self._last_tokens = rollout.num_tokens
        return self.step_tokens.add(trainer, terms)

    def _nonfinite_step(self, trainer, bad: Optional[str], terms: dict[str, torch.Tensor]):
        step = self.global_step
        if self.hparams.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
            if trainer is not None and trainer.world_size > 1:
                # Lightning refuses None under DDP/FSDP, and the gradient all-reduce needs a backward on every
                # rank: zero gradients; a step with no tokens left drops them (StepTokens.finish), so the
                # optimizer skips it as it does for None in one process.
                return sum(p.sum() for p in self.student.parameters() if p.requires_grad) * 0.0
            return None  # Lightning skips backward and the optimizer step
        saved = save_beside_checkpoints(trainer, f"nonfinite-step{step:06d}.ckpt") if trainer else None
        raise NonFiniteLossError(nonfinite_message(step, bad, terms, saved, self.step_tokens.names[:-2]))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Per-token sums -> the step's per-token mean (before Lightning clips); logs the step's exact terms."""
        for name, value in (self.step_tokens.finish(self.trainer, self) or {}).items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in self._prog_bar,
                     batch_size=1, rank_zero_only=True)

    def validation_step(self, batch: ContextPairBatch, batch_idx: int):
        terms, rollout = self.model_step(batch)
        self.log_terms("val", terms, rollout, batch_size=len(batch))

    def test_step(self, batch: ContextPairBatch, batch_idx: int):
        terms, rollout = self.model_step(batch)
        self.log_terms("test", terms, rollout, batch_size=len(batch))

    # -- logging ------------------------------------------------------------------------------------
    @property
    def _prog_bar(self) -> set[str]:
        return {"loss"} | {t.name for t in self.objective.terms if t.prog_bar}

    def log_terms(self, stage: str, terms: dict[str, torch.Tensor], rollout: Rollout, batch_size: int) -> None:
        """Per-batch values of ``stage``; the training loss terms are logged per optimizer step instead
        (``on_before_optimizer_step``: exact per-token means over the whole step)."""
        on_step = stage == "train"
        # sync_dist on every step too (one small all-reduce per value): under DDP the rank-mean of the
        # token-rescaled terms (see ``global_token_scale``) is the per-token mean over the global batch.
        for name in self.step_tokens.names:
            if name in terms and not on_step:
                self.log(f"{stage}/{name}", terms[name].detach().float(), on_step=False, on_epoch=True,
                         prog_bar=name in self._prog_bar, batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/response_len", rollout.lengths.float().mean(), on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/truncated", (~rollout.finished).float().mean(), on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=True)
        for name, value in getattr(rollout, "stats", {}).items():  # episode pass rate, turns, invalid moves
            self.log(f"{stage}/{name}", float(value), on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                     sync_dist=True)
        if on_step:
            self.log("time/rollout_s", terms["time_rollout_s"], on_step=True, batch_size=batch_size)
            self.log("time/teacher_s", terms["time_teacher_s"], on_step=True, batch_size=batch_size)

    def warm_up_rollouts(self) -> Optional[float]:
        """One dummy decode of the training shape (batch size, longest prompt) before the timed steps: compilation,
        CUDA graph capture and the static cache's sizing then stay out of them."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(dm, TaskDataModule):
            return None
        seconds = self.engine.warmup(self.student, dm.batch_size, dm.longest_prompt(), self.sampling,
                                     self.eos_token_ids, self.pad_token_id)
        for logger in self.loggers:
            logger.log_metrics({"time/rollout_warmup_s": seconds}, step=0)
        return seconds

    # -- timing (tokens/s over the whole step, backward and optimizer included) -------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_started is not None and outputs is not None:
            seconds = time.perf_counter() - self._step_started
            self.log("time/step_s", seconds, on_step=True, batch_size=len(batch))
            self.log("train/tokens_per_s", getattr(self, "_last_tokens", 0) / max(seconds, 1e-9), on_step=True,
                     batch_size=len(batch))

    # -- checkpoints hold the student; the teacher comes back from its source ----------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        add_run_state(checkpoint, self.skipped_steps, self.loggers if self._trainer is not None else [])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        # This rank's own states, applied at train start, after everything that might draw random numbers
        # while restoring (and after on_fit_start's rank-offset seed).
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        self._pending_rng_states, why = rng_states_for_rank(checkpoint, rank, world)
        if why:
            rank_zero_warn(f"resuming: {why}")

    def on_train_start(self) -> None:
        states = getattr(self, "_pending_rng_states", None)
        if states is not None:
            restore_rng_states(states)
            self._pending_rng_states = None

    # -- fit start: rank-decorrelated sampling, rollout warm-up ------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:
            # seed_everything seeds every rank alike: without an offset all ranks would draw the same
            # sampling noise (correlated rollouts) and the same dropout masks.
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        if self.hparams.get("rollout_warmup", True) and hasattr(self.engine, "warmup"):
            self.warm_up_rollouts()

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        return build_optimizer([p for p in self.student.parameters() if p.requires_grad], hp.get("optimizer", "adamw"),
                               hp.lr, hp.weight_decay, hp.warmup_steps, total, hp.lr_schedule, hp.min_lr_ratio)
