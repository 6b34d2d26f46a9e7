"""The training bar counts optimizer steps towards max_steps instead of restarting every epoch."""

import io
from types import SimpleNamespace

from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_ctx.progress import StepProgressBar


def _bar_and_trainer(max_steps, global_step=0, epoch=0):
    bar = StepProgressBar()
    bar._train_progress_bar = Tqdm(file=io.StringIO(), disable=False)
    trainer = SimpleNamespace(max_steps=max_steps, global_step=global_step, current_epoch=epoch,
                              num_training_batches=13, progress_bar_metrics={}, loggers=[])
    return bar, trainer


def test_bar_total_is_max_steps_across_epochs(monkeypatch):
    bar, trainer = _bar_and_trainer(150, global_step=39, epoch=11)
    monkeypatch.setattr(StepProgressBar, "get_metrics", lambda self, t, m: {"train/loss": 0.5})
    bar.on_train_epoch_start(trainer)
    tq = bar.train_progress_bar
    assert tq.total == 150 and tq.n == 39 and "epoch 11" in tq.desc  # a resumed run starts at its step
    trainer.global_step = 40
    bar.on_train_batch_end(trainer, None, None, None, batch_idx=2)
    assert tq.n == 40 and tq.total == 150
    trainer.current_epoch, trainer.global_step = 12, 52
    bar.on_train_epoch_start(trainer)  # a new epoch does not restart the count
    assert tq.n == 52 and tq.total == 150 and "epoch 12" in tq.desc


def test_bar_without_max_steps_counts_batches_per_epoch(monkeypatch):
    bar, trainer = _bar_and_trainer(-1, global_step=100, epoch=3)
    monkeypatch.setattr(StepProgressBar, "total_train_batches", property(lambda self: 13))
    monkeypatch.setattr(StepProgressBar, "get_metrics", lambda self, t, m: {})
    bar.on_train_epoch_start(trainer)
    tq = bar.train_progress_bar
    assert tq.total == 13 and tq.n == 0 and tq.desc.startswith("Epoch 3")
    bar.on_train_batch_end(trainer, None, None, None, batch_idx=4)
    assert tq.n == 5


def test_cli_installs_the_step_bar_unless_bars_are_off(mlflow_uri):
    from lightning_ctx.cli import ContextCLI

    args = ["--trainer.max_steps", "3", "--trainer.enable_model_summary", "false"]
    cli = ContextCLI(args=args, run=False)
    assert sum(isinstance(cb, StepProgressBar) for cb in cli.trainer.callbacks) == 1
    cli = ContextCLI(args=[*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert not any(isinstance(cb, StepProgressBar) for cb in cli.trainer.callbacks)
