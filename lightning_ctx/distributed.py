"""What a training step needs when it spans several processes (DDP, FSDP) and micro-batches (accumulation).

One rule for every loss term (docs/design.md, "Objectives"): a per-token mean over *everything that makes up
one optimizer step* -- all micro-batches of an accumulation and all ranks -- never a mean of per-batch means,
which would weight a token by how many tokens its batch or rank happened to get.

How it is kept exactly: each micro-batch backpropagates per-token *sums* (:meth:`StepTokens.add`); Lightning
divides every micro-batch's loss by ``accumulate_grad_batches`` and DDP/FSDP average gradients over the
``world_size`` ranks, so before the optimizer (and before Lightning's gradient clipping, which comes after
``on_before_optimizer_step``) all gradients are multiplied by ``accumulate * world_size / tokens of the step``
(:meth:`StepTokens.finish`), the tokens of the step's main rollout (the first loss term's). A term on another
rollout (e.g. ``retain``: the responses under other contexts) has its own tokens: within a micro-batch it is a
per-token mean over all ranks' tokens of its rollout, weighted by that micro-batch's share of the step's main
tokens. That is exact without accumulation; with it, it assumes the ratio of the two token counts is about the same
in every micro-batch (documented approximation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch


def world_size(trainer) -> int:
    return int(trainer.world_size) if trainer is not None else 1


def is_sharded(trainer) -> bool:
    """True under a strategy whose parameters are sharded over ranks (FSDP): a forward is then a collective."""
    if trainer is None:
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def global_token_scale(trainer, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``n_local * world_size / n_global`` under a multi-process strategy, else None.

    For evaluation terms (validation/test): each term is a per-token mean over the rank's own tokens, and the
    rank-mean of the logged values times this factor is the per-token mean over the global batch. (Training
    uses :class:`StepTokens`, which also covers accumulation.)
    """
    if world_size(trainer) <= 1:
        return None
    n_local = mask.sum().to(torch.float32)
    n_global = trainer.strategy.reduce(n_local.clone(), reduce_op="sum")
    return n_local * trainer.world_size / n_global.clamp(min=1)


def any_rank(trainer, flag: bool) -> bool:
    """True when ``flag`` is True on any rank (every rank must call it: a collective under DDP/FSDP)."""
    if world_size(trainer) <= 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


def sum_over_ranks(trainer, values: torch.Tensor) -> torch.Tensor:
    if world_size(trainer) <= 1:
        return values
    return trainer.strategy.reduce(values.clone(), reduce_op="sum")


class StepTokens:
    """Per-token sums of one optimizer step, over its micro-batches (this rank's; summed over ranks at the end).

    ``terms``: the objective's :class:`~lightning_ctx.loss.LossTerm` s (name, weight, rollout); the first one's
    rollout is the step's main rollout. Logged per step: every term, ``loss`` and ``entropy``.
    """

    def __init__(self, terms: Sequence = ()):
        self.terms = list(terms)
        self.names = [t.name for t in self.terms] + ["loss", "entropy"]
        self.main = self.terms[0].rollout if self.terms else "student"
        self.reset()

    def reset(self) -> None:
        self.tokens = 0.0
        self.sums = dict.fromkeys(self.names, 0.0)
        self.seen: set[str] = set()  # the terms this step had (the same on every rank)

    def add(self, trainer, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's loss to backpropagate: per-token sums, from the per-token means in ``values``.

        ``values`` holds this rank's unscaled per-token means by term name and each rollout's token count
        (``tokens/<rollout>``); one all-reduce of the counts per micro-batch when a term is on another rollout.
        """
        n = values[f"tokens/{self.main}"].to(torch.float32)
        present = [t for t in self.terms if t.name in values]
        others = sorted({t.rollout for t in present} - {self.main})
        weights = {self.main: n}
        if others:  # k local tokens of rollout r count as many as n_global / k_global each
            local = torch.stack([n] + [values[f"tokens/{r}"].to(torch.float32) for r in others]).detach()
            counts = sum_over_ranks(trainer, local)
            for i, r in enumerate(others, start=1):
                weights[r] = local[i] * counts[0] / counts[i].clamp(min=1)
        loss = n * 0.0
        parts = {"entropy": n * values["entropy"].detach()}
        for t in present:
            weighted = values[t.name] * weights[t.rollout]
            loss = loss + t.weight * weighted
            parts[t.name] = weighted.detach()
        parts["loss"] = loss.detach()
        self.tokens += float(n)
        for key, value in parts.items():
            self.sums[key] += float(value)
        self.seen.update(parts)
        return loss

    def finish(self, trainer, module: torch.nn.Module) -> Optional[dict[str, float]]:
        """Rescale the step's gradients to the per-token mean; returns the step's per-token means.

        None when the step has no tokens (all its micro-batches were skipped): the gradients are dropped.

        Every rank must call it (one all-reduce). Gradients of sharded parameters (FSDP) are scaled shard by shard.
        """
        keys = list(self.names)
        local = torch.tensor([self.tokens, *(self.sums[k] for k in keys)], dtype=torch.float64)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        total = sum_over_ranks(trainer, local.to(device)).cpu()
        seen = self.seen
        self.reset()
        tokens = float(total[0])
        if tokens <= 0:  # every micro-batch skipped (on every rank): no update at all, not even AdamW's momentum
            for p in module.parameters():
                p.grad = None
            return None
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1)) if trainer is not None else 1
        factor = accumulate * world_size(trainer) / tokens
        with torch.no_grad():
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        return {k: float(v) / tokens for k, v in zip(keys, total[1:]) if k in seen}
