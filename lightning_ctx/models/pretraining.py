"""Pretraining the built-in base models (the rule world's, the game's): prompt/answer batches with the loss on the
answer only, a LightningModule with AdamW and warmup + cosine, plain-text progress, and the machine facts a
pretraining report records, and the portable way to save their tokenizers."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


def collate_prompt_answer(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
                          ) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` for ``(prompt ids, answer ids)`` pairs; ``labels``
    are -100 on the prompt and the padding, so the loss covers the answer only (HF shifts labels internally)."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids, labels, mask = [], [], []
    for p, a in pairs:
        p, a = list(p), list(a)
        fill = width - len(p) - len(a)
        ids.append(p + a + [pad_token_id] * fill)
        labels.append([-100] * len(p) + a + [-100] * fill)
        mask.append([1] * (len(p) + len(a)) + [0] * fill)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


class CausalLMPretraining(pl.LightningModule):
    """Next-token loss on the labelled tokens of ``model``; AdamW (no decay on norms and biases), linear warmup then
    cosine to ``min_lr_ratio`` of ``lr`` at ``max_steps``."""

    def __init__(self, model, lr: float, weight_decay: float = 0.1, warmup_steps: int = 100, max_steps: int = 1000,
                 min_lr_ratio: float = 0.05, betas: tuple[float, float] = (0.9, 0.98)):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loss_printer(every: int) -> pl.Callback:
    class PrintLoss(pl.Callback):
        """Plain-text loss lines (for logs, when the progress bar is off)."""

        def __init__(self):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0 or step == trainer.max_steps:
                loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
                print(f"step {step:5d}/{trainer.max_steps}  loss {loss:.4f}  {time.perf_counter() - self.t0:6.1f}s",
                      flush=True)

    return PrintLoss()


def pretrain_trainer(max_steps: int, progress: bool) -> pl.Trainer:
    """The CPU trainer both pretraining commands use (no logger, no checkpoints, gradient clipping at 1)."""
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=1.0,
                      log_every_n_steps=50, callbacks=[] if progress else [loss_printer(max(1, max_steps // 20))])


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings are counted once


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_report(load_start: float | None) -> dict[str, Any]:
    """``hardware`` and ``versions`` of a pretraining report."""
    import lightning
    import transformers

    return {
        "hardware": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "machine": platform.machine(), "processor": platform.processor() or None,
                     "loadavg_1min_start": load_start, "loadavg_1min_end": loadavg(),
                     "note": "wall times depend on other processes sharing the CPUs (see loadavg)"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lightning": lightning.__version__, "python": platform.python_version()},
    }


def save_portable_tokenizer(tokenizer, output_dir: str | Path, config: dict[str, Any]) -> None:
    """Write a ``PreTrainedTokenizerFast`` that every supported transformers (4.56 to 5.x) and ``tokenizers`` alone
    read the same way: ``tokenizer.json``, ``chat_template.jinja`` and ``config`` as ``tokenizer_config.json`` (plain
    ``PreTrainedTokenizerFast`` keys). ``save_pretrained`` would write the installed transformers' format: 5.x's
    (``TokenizersBackend``, ``extra_special_tokens`` as a list) fails to load under 4.x."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(output_dir / "tokenizer.json"))
    (output_dir / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    text = json.dumps(config, indent=2, ensure_ascii=False)
    (output_dir / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")


def check_pretrain_args(a, *, at_least_one: Sequence[str], non_negative: Sequence[str] = (),
                        fractions: Sequence[str] = ()) -> None:
    """The arguments of a ``pretrain-*`` command in range, ``--width`` a multiple of ``--heads``, ``--lr`` a positive
    number and ``--out`` a folder that can be written, before any work: one ConfigError naming the flag."""
    from lightning_ctx.errors import ConfigError
    from lightning_ctx.writing import check_output_dir

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in at_least_one:
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ConfigError(f"must be >= 1, got {getattr(a, name)}", field=flag(name))
    for name in non_negative:
        if getattr(a, name) < 0:
            raise ConfigError(f"must be >= 0, got {getattr(a, name)}", field=flag(name))
    for name in fractions:
        if not 0 <= getattr(a, name) <= 1:
            raise ConfigError(f"must be between 0 and 1, got {getattr(a, name)}", field=flag(name))
    if a.width % a.heads:
        raise ConfigError(f"--width {a.width} must be a multiple of --heads {a.heads}", field="--width")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        raise ConfigError(f"must be a positive number, got {a.lr}", field="--lr")
    check_output_dir(a.out, "--out")
