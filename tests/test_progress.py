"""The training bar counts optimizer steps towards max_steps instead of restarting every epoch; outside a terminal one
short line every N steps replaces the bar."""

import io
from types import SimpleNamespace

from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_ctx.progress import StepLogProgress, StepProgressBar, progress_callback


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
    assert tq.total == 150 and tq.n == 39 and tq.desc.startswith("Training:")  # resumed: starts at its step
    trainer.global_step = 40
    bar.on_train_batch_end(trainer, None, None, None, batch_idx=2)
    assert tq.n == 40 and tq.total == 150
    trainer.current_epoch, trainer.global_step = 12, 52
    bar.on_train_epoch_start(trainer)  # a new epoch does not restart the count
    assert tq.n == 52 and tq.total == 150 and "epoch" not in tq.desc


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
    # pytest captures standard output: not a terminal, so the line log
    assert sum(isinstance(cb, StepLogProgress) for cb in cli.trainer.callbacks) == 1
    cli = ContextCLI(args=[*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert not any(isinstance(cb, (StepProgressBar, StepLogProgress)) for cb in cli.trainer.callbacks)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_bar_a_log_gets_lines():
    assert isinstance(progress_callback(_Terminal()), StepProgressBar)
    assert isinstance(progress_callback(io.StringIO()), StepLogProgress)


def _log_trainer(max_steps, metrics):
    return SimpleNamespace(max_steps=max_steps, global_step=0, current_epoch=0, is_global_zero=True,
                           progress_bar_metrics=metrics, callback_metrics={"train/tokens_per_s": 200.0}, loggers=[])


def test_log_lines_every_n_steps_with_eta(monkeypatch):
    import lightning_ctx.progress as progress

    clock = iter(float(t) for t in range(0, 1000, 10))  # 10 s per call of time.monotonic
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = StepLogProgress(stream=out)  # 100 steps -> a line every 5
    trainer = _log_trainer(100, {"train/loss": 0.5, "train/opd": 0.25, "train/anchor": 0.125})
    bar.on_train_start(trainer, None)  # t = 0
    for step in range(1, 101):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step - 1)
        bar.on_train_batch_end(trainer, None, None, None, step - 1)  # a micro-batch of the same step: no line
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in out.getvalue()
    assert lines[0] == "step 5/100  loss 0.5  opd 0.25  anchor 0.125  200 tok/s  elapsed 0:10  ETA 3:10"
    assert lines[-1].startswith("step 100/100") and "ETA" not in lines[-1] and "epoch" not in out.getvalue()


def test_log_lines_by_epochs_name_the_epoch():
    out = io.StringIO()
    bar = StepLogProgress(every_n_steps=2, stream=out)
    trainer = _log_trainer(-1, {"train/loss": 1.0})
    trainer.current_epoch = 3
    bar.on_train_start(trainer, None)
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step)
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 3 step 2", "epoch 3 step 4"]
    assert all("ETA" not in line for line in lines)
