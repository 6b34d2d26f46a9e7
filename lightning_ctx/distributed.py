"""What a training step needs when it spans several processes (DDP, FSDP) and micro-batches (accumulation).

One rule for every loss term (docs/design.md, "Objectives"): a per-token mean over *everything that makes up
one optimizer step* -- all micro-batches of an accumulation and all ranks -- never a mean of per-batch means,
which would weight a token by how many tokens its batch or rank happened to get.

How it is kept exactly: each micro-batch backpropagates per-token *sums* (:meth:`StepTokens.add`); Lightning
divides every micro-batch's loss by ``accumulate_grad_batches`` and DDP/FSDP average gradients over the
``world_size`` ranks, so before the optimizer (and before Lightning's gradient clipping, which comes after
``on_before_optimizer_step``) all gradients are multiplied by ``accumulate * world_size / tokens of the step``
(:meth:`StepTokens.finish`). The retention term has its own tokens (the responses under other contexts): within
a micro-batch it is a per-token mean over all ranks' retention tokens, weighted by that micro-batch's share of
the step's main tokens. That is exact without accumulation; with it, it assumes the retention/main token ratio
is about the same in every micro-batch (documented approximation).
"""

from __future__ import annotations

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


LOGGED_TERMS = ("loss", "opd", "anchor", "retain", "entropy")


class StepTokens:
    """Per-token sums of one optimizer step, over its micro-batches (this rank's; summed over ranks at the end)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens = 0.0
        self.sums = dict.fromkeys(LOGGED_TERMS, 0.0)
        self.seen: set[str] = set()  # the terms this step had (the same on every rank)

    def add(self, trainer, terms: dict[str, torch.Tensor], anchor_weight: float, retain_weight: float) -> torch.Tensor:
        """The micro-batch's loss to backpropagate: per-token sums, from the per-token means in ``terms``.

        ``terms`` holds this rank's unscaled per-token means and the token counts ``tokens`` (main responses) and
        ``retain_tokens``; one all-reduce of the two counts per micro-batch when there is a retention term.
        """
        n = terms["tokens"].to(torch.float32)
        main = terms["opd"] + (anchor_weight * terms["anchor"] if "anchor" in terms else 0.0)
        loss = n * main
        parts = {"opd": n * terms["opd"].detach(), "entropy": n * terms["entropy"].detach()}
        if "anchor" in terms:
            parts["anchor"] = n * terms["anchor"].detach()
        if "retain" in terms:
            k = terms["retain_tokens"].to(torch.float32)
            counts = sum_over_ranks(trainer, torch.stack([n, k]).detach())
            weight = k * counts[0] / counts[1].clamp(min=1)  # k local tokens, as many as n_global/k_global each
            loss = loss + retain_weight * terms["retain"] * weight
            parts["retain"] = terms["retain"].detach() * weight
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
        keys = list(LOGGED_TERMS)
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
