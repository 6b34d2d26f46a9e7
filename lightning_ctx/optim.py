"""AdamW (torch, or bitsandbytes' 8-bit states) with linear warmup and a constant or cosine schedule."""

from __future__ import annotations

import math

import torch

from lightning_ctx.errors import ModelError


def build_optimizer(params, name: str, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                    schedule: str, min_lr_ratio: float = 0.0) -> dict:
    """Lightning's ``configure_optimizers`` dict: the optimizer and a per-step LR scheduler."""
    params = list(params)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ModelError("model.optimizer: adamw8bit needs bitsandbytes (pip install "
                             "'lightning-ctx[quant]')") from None
        optimizer = bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, schedule,
                                                                      min_lr_ratio))
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
