"""``OnPolicyDistillation``: one training step = rollout -> teacher scoring -> student passes -> loss.

    L = L_opd + anchor_weight * L_anchor (+ retain_weight * L_retain)

* ``L_opd``: token divergence between the student without context and the frozen teacher with
  context, on the student's own sampled response (reverse KL by default).
* ``L_anchor``: KL(sg[p_student(.|x, y<t)] || p_student(.|c, x, y<t)) on the same response; the anchor
  reuses the no-context logits of the OPD pass (one extra with-context forward, no extra no-context one).
* ``L_retain`` (optional): on the same prompts under *other* contexts c', the student's own response
  is scored by student and teacher with c', so distillation does not make the student blind to c'.
"""

from __future__ import annotations

import math
import time
from typing import Literal, Optional

import lightning.pytorch as pl
import torch

from lightning_ctx import objectives
from lightning_ctx.data.datamodule import ContextPairBatch
from lightning_ctx.data.render import join_prompt_and_response, response_logits
from lightning_ctx.models.loading import (ModelError, check_teacher_compatible, freeze, frozen_copy,
                                          load_causal_lm, load_tokenizer, output_vocab_size)
from lightning_ctx.rollout import Rollout, SamplingSettings, build_engine, eos_ids_for, sample_responses


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term is NaN/inf; names the step and the term."""


class OnPolicyDistillation(pl.LightningModule):
    """On-policy context distillation with the anchored context-removability regularizer.

    Args:
        student: HF causal LM folder (or an id already in the HF cache), or ``builtin:world``.
        teacher: None = frozen copy of the initial student (self-distillation with context); else a
            folder/id of a model sharing the student's tokenizer.
        anchor_weight: beta of the anchored consistency term (0 = plain OPD; 0.5 was best in the paper).
        retain_weight: weight of the optional other-context retention term (needs ``data.retain_contexts``).
        divergence: ``reverse_kl`` | ``forward_kl`` | ``jsd`` | ``sampled`` (sampled-token estimator).
        jsd_beta: beta of the generalized JSD (0 = forward KL, 1 = reverse KL).
        scope: ``full`` vocabulary or the student's ``topk`` indices (``topk``, ``topk_union_teacher``).
        chunk_size: sequence chunk for the KL terms (bounds float32 ``[B, chunk, V]`` memory); None = all at once.
        anchor_direction: ``forward`` (paper) | ``reverse`` | ``symmetric``; ``detach_anchor``: stop-gradient on the anchor.
        max_new_tokens / temperature / top_p / top_k: rollout sampling; ``rollout_engine``: ``hf`` | ``hf_static``.
        lr / weight_decay / warmup_steps / lr_schedule (``constant`` | ``cosine``) / min_lr_ratio: AdamW schedule.
        dtype / teacher_dtype: weights dtype (``float32`` | ``bfloat16`` | ``float16``).
        trust_remote_code: off unless asked. local_files_only: never download implicitly.
        on_nonfinite: ``raise`` (save a checkpoint, then stop with the step and term) or ``skip`` the step.
    """

    def __init__(
        self,
        student: str = "builtin:world",
        teacher: Optional[str] = None,
        anchor_weight: float = 0.0,
        retain_weight: float = 0.0,
        divergence: Literal["reverse_kl", "forward_kl", "jsd", "sampled"] = "reverse_kl",
        jsd_beta: float = 0.5,
        scope: Literal["full", "topk"] = "full",
        topk: int = 256,
        topk_union_teacher: bool = False,
        chunk_size: Optional[int] = None,
        anchor_direction: Literal["forward", "reverse", "symmetric"] = "forward",
        detach_anchor: bool = True,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        rollout_engine: str = "hf",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.0,
        dtype: str = "float32",
        teacher_dtype: Optional[str] = None,
        trust_remote_code: bool = False,
        local_files_only: bool = True,
        on_nonfinite: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        if anchor_weight < 0 or retain_weight < 0:
            raise ValueError("anchor_weight and retain_weight must be >= 0")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be raise or skip, got {on_nonfinite!r}")
        self.save_hyperparameters()
        self.sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         top_k=top_k)
        self.engine = build_engine(rollout_engine)
        self.tokenizer = load_tokenizer(student, trust_remote_code, local_files_only)
        self.student = load_causal_lm(student, dtype, trust_remote_code, local_files_only)
        self.student.train()  # from_pretrained returns eval mode; Lightning keeps modules as it finds them
        if teacher is None:
            self.teacher = frozen_copy(self.student)
            self.vocab_size = output_vocab_size(self.student)
        else:
            teacher_tok = load_tokenizer(teacher, trust_remote_code, local_files_only)
            self.teacher = freeze(load_causal_lm(teacher, teacher_dtype or dtype, trust_remote_code, local_files_only))
            self.vocab_size = check_teacher_compatible(self.tokenizer, teacher_tok, self.student, self.teacher, teacher)
        self.eos_token_ids = eos_ids_for(self.tokenizer, self.student)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.skipped_steps = 0
        # The teacher is rebuilt from its source on load: checkpoints hold the student only.
        self.strict_loading = False
        self._step_started: float | None = None

    # -- checks ---------------------------------------------------------------------------------
    def check_data(self, datamodule) -> None:
        """Every prompt (with context) plus ``max_new_tokens`` must fit the model's positions."""
        limit = getattr(self.student.config, "max_position_embeddings", None)
        if limit is None:
            return
        longest = datamodule.longest_prompt()
        if longest + self.sampling.max_new_tokens > limit:
            raise ModelError(f"{self.hparams.student}: the longest context + prompt ({longest} tokens) plus "
                             f"model.max_new_tokens={self.sampling.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={limit}")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "longest_prompt"):
            if getattr(dm, "tokenizer", None) is None:
                dm.set_tokenizer(self.tokenizer)
            self.check_data(dm)

    # -- the step -------------------------------------------------------------------------------
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               settings: Optional[SamplingSettings] = None) -> Rollout:
        """On-policy responses from the student for left-padded prompts."""
        return sample_responses(self.student, prompt_ids, prompt_mask, settings or self.sampling, self.eos_token_ids,
                                self.pad_token_id, self.engine)

    def _teacher_logits(self, inputs) -> torch.Tensor:
        self.teacher.eval()  # Lightning's .train() on the module also reaches the teacher
        with torch.no_grad():
            return response_logits(self.teacher, inputs, self.vocab_size)

    def _divergence(self, student_logits, teacher_logits, tokens, mask) -> torch.Tensor:
        hp = self.hparams
        if hp.divergence == "sampled":
            teacher_lp = objectives.token_logprobs(teacher_logits, tokens, chunk_size=hp.chunk_size)
            return objectives.sampled_token_loss(student_logits, teacher_lp, tokens, mask)
        return objectives.token_divergence(student_logits, teacher_logits, mask, kind=hp.divergence, beta=hp.jsd_beta,
                                           scope=hp.scope, topk=hp.topk, chunk_size=hp.chunk_size,
                                           topk_union_teacher=hp.topk_union_teacher)

    def compute_losses(self, batch: ContextPairBatch, rollout: Rollout,
                       retain_rollout: Optional[Rollout] = None) -> dict[str, torch.Tensor]:
        """All loss terms for a batch and fixed rollout(s); ``loss`` is their weighted sum."""
        hp = self.hparams
        mask, tokens = rollout.response_mask, rollout.response_ids
        student_in = join_prompt_and_response(batch.prompt_ids, batch.prompt_mask, tokens, mask)
        ctx_in = join_prompt_and_response(batch.ctx_prompt_ids, batch.ctx_prompt_mask, tokens, mask)
        t0 = time.perf_counter()
        teacher_logits = self._teacher_logits(ctx_in)
        t1 = time.perf_counter()
        student_logits = response_logits(self.student, student_in, self.vocab_size)
        opd = self._divergence(student_logits, teacher_logits, tokens, mask)
        del teacher_logits  # never keep [B, R, V] teacher logits alive past the term that needs them
        out = {"opd": opd}
        loss = opd
        if hp.anchor_weight > 0:
            ctx_student_logits = response_logits(self.student, ctx_in, self.vocab_size)
            anchor = objectives.anchored_consistency(student_logits, ctx_student_logits, mask,
                                                     direction=hp.anchor_direction, detach_anchor=hp.detach_anchor,
                                                     scope=hp.scope, topk=hp.topk, chunk_size=hp.chunk_size)
            out["anchor"] = anchor
            loss = loss + hp.anchor_weight * anchor
        if hp.retain_weight > 0 and retain_rollout is not None:
            r_in = join_prompt_and_response(batch.retain_prompt_ids, batch.retain_prompt_mask,
                                            retain_rollout.response_ids, retain_rollout.response_mask)
            r_teacher = self._teacher_logits(r_in)
            r_student = response_logits(self.student, r_in, self.vocab_size)
            retain = self._divergence(r_student, r_teacher, retain_rollout.response_ids, retain_rollout.response_mask)
            out["retain"] = retain
            loss = loss + hp.retain_weight * retain
        out["loss"] = loss
        with torch.no_grad():
            out["entropy"] = objectives.token_entropy(student_logits.detach(), mask, chunk_size=hp.chunk_size)
        out["time_teacher_s"] = torch.tensor(t1 - t0)
        return out

    def model_step(self, batch: ContextPairBatch) -> tuple[dict[str, torch.Tensor], Rollout]:
        """Shared by training and validation: sample on-policy, then compute every term."""
        t0 = time.perf_counter()
        rollout = self.sample(batch.prompt_ids, batch.prompt_mask)
        retain_rollout = None
        if self.hparams.retain_weight > 0 and batch.retain_prompt_ids is not None:
            retain_rollout = self.sample(batch.retain_prompt_ids, batch.retain_prompt_mask)
        t_rollout = time.perf_counter() - t0
        terms = self.compute_losses(batch, rollout, retain_rollout)
        terms["time_rollout_s"] = torch.tensor(t_rollout)
        return terms, rollout

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> Optional[str]:
        for name in ("opd", "anchor", "retain", "loss"):
            if name in terms and not torch.isfinite(terms[name]).all():
                return name
        return None

    def training_step(self, batch: ContextPairBatch, batch_idx: int):
        terms, rollout = self.model_step(batch)
        bad = self._check_finite(terms)
        if bad is not None:
            step = self.global_step
            if self.hparams.on_nonfinite == "skip":
                self.skipped_steps += 1
                self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
                return None  # Lightning skips backward and the optimizer step
            raise NonFiniteLossError(f"non-finite loss at step {step}: term '{bad}' = {terms[bad].item()} "
                                     f"(opd={terms['opd'].item():.4g}"
                                     + (f", anchor={terms['anchor'].item():.4g}" if "anchor" in terms else "")
                                     + (f", retain={terms['retain'].item():.4g}" if "retain" in terms else "") + ")")
        self._log_terms("train", terms, rollout, batch_size=len(batch))
        self._last_tokens = rollout.num_tokens
        return terms["loss"]

    def validation_step(self, batch: ContextPairBatch, batch_idx: int):
        terms, rollout = self.model_step(batch)
        self._log_terms("val", terms, rollout, batch_size=len(batch))

    def test_step(self, batch: ContextPairBatch, batch_idx: int):
        terms, rollout = self.model_step(batch)
        self._log_terms("test", terms, rollout, batch_size=len(batch))

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor], rollout: Rollout, batch_size: int) -> None:
        on_step = stage == "train"
        for name in ("loss", "opd", "anchor", "retain", "entropy"):
            if name in terms:
                self.log(f"{stage}/{name}", terms[name].detach().float(), on_step=on_step, on_epoch=not on_step,
                         prog_bar=name in ("loss", "opd", "anchor"), batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/response_len", rollout.lengths.float().mean(), on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/truncated", (~rollout.finished).float().mean(), on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=not on_step)
        if on_step:
            self.log("time/rollout_s", terms["time_rollout_s"], on_step=True, batch_size=batch_size)
            self.log("time/teacher_s", terms["time_teacher_s"], on_step=True, batch_size=batch_size)

    # -- timing (tokens/s over the whole step, backward and optimizer included) -------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_started is not None and outputs is not None:
            elapsed = time.perf_counter() - self._step_started
            self.log("time/step_s", elapsed, on_step=True, batch_size=len(batch))
            self.log("train/tokens_per_s", getattr(self, "_last_tokens", 0) / max(elapsed, 1e-9), on_step=True,
                     batch_size=len(batch))

    # -- checkpoints hold the student; the teacher comes back from its source ----------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.warmup_steps, total, hp.lr_schedule,
                                                                          hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0):
    """Linear warmup, then constant or cosine decay to ``min_ratio`` (a picklable closure for resume)."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
