"""Gradient accumulation weighs every token of an optimizer step alike.

``accumulate_grad_batches: 2`` with batches of 2 must give the same loss and gradient as one batch of 4: one
per-token mean over everything that makes up the step (``lightning_ctx.distributed.StepTokens``), not the
mean of the two micro-batches' per-token means. Greedy rollouts make both runs score the same responses; the
checkpoint's extra EOS makes the two micro-batches' token counts differ (checked), which is what a mean of
means gets wrong.
"""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import make_records
from tests.test_ddp import MAX_NEW, _checkpoint_with_uneven_eos


class StepProbe(pl.Callback):
    """Per micro-batch: its token count; after the optimizer step: the logged loss and the (rescaled) grads."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)
        self.tokens: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens.append(int(pl_module._last_tokens))
        if trainer.global_step == 1 and not (self.out / "grads.pt").exists():  # the first optimizer step is done
            grads = {n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}
            torch.save(grads, self.out / "grads.pt")
            result = {"loss": float(trainer.callback_metrics["train/loss"]),
                      "opd": float(trainer.callback_metrics["train/opd"]), "tokens": self.tokens}
            (self.out / "step.json").write_text(json.dumps(result))


def _fit(path, train, out, batch_size, accumulate):
    from lightning_ctx.cli import main

    out.mkdir()
    main(["fit", "--seed_everything", "0", "--model.student", path, "--model.greedy_rollout", "true",
          "--model.max_new_tokens", str(MAX_NEW), "--model.anchor_weight", "0.5", "--model.rollout_warmup", "false",
          "--data.task.train_file", train, "--data.batch_size", str(batch_size), "--data.shuffle", "false",
          "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.accumulate_grad_batches",
          str(accumulate), "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.num_sanity_val_steps", "0", "--trainer.callbacks+=tests.test_accumulation.StepProbe",
          f"--trainer.callbacks.out_dir={out}"])
    return json.loads((out / "step.json").read_text()), torch.load(out / "grads.pt")


@pytest.mark.slow
def test_accumulated_step_equals_one_batch_of_the_combined_size(tmp_path, jsonl_file):
    records = make_records(4, context="ADD2")
    path = _checkpoint_with_uneven_eos(tmp_path, records)
    train = jsonl_file(records)
    one, g_one = _fit(path, train, tmp_path / "one", batch_size=4, accumulate=1)
    acc, g_acc = _fit(path, train, tmp_path / "acc", batch_size=2, accumulate=2)

    micro = acc["tokens"][:2]
    assert micro[0] != micro[1], micro  # unequal micro-batches: a mean of means would differ
    assert sum(micro) == one["tokens"][0]
    assert acc["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert acc["opd"] == pytest.approx(one["opd"], rel=1e-5)
    assert g_one.keys() == g_acc.keys() and len(g_one) > 0
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-4, atol=1e-7, msg=name)
