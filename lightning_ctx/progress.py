"""Training progress that reads well in a terminal and in a log.

In a terminal, :class:`StepProgressBar`: one bar over optimizer steps towards ``trainer.max_steps``. Elsewhere (a log
file, CI, ``| tee``), :class:`StepLogProgress`: one short line every N steps (step, loss terms, tokens/s, ETA) instead
of a bar redrawn with carriage returns, which a log keeps as one line of several hundred KB.
:func:`progress_callback` picks one. Epochs appear only when the run trains by epochs (no ``max_steps``).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


def _by_steps(trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0


class StepProgressBar(TQDMProgressBar):
    """One bar over optimizer steps when ``trainer.max_steps`` is set: ``Training: 40/150``.

    Lightning's bar restarts every epoch and, on a ``max_steps`` run, has no meaningful epoch total; the
    built-in world's epochs are 13 batches long, so that bar said nothing about how far the run was.
    Without ``max_steps`` it behaves exactly like Lightning's (``Epoch 3``).
    """

    def _show_step(self, trainer, pl_module=None) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step  # a resumed run starts where it stopped
        if pl_module is not None:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's run id, in the summary at the end
        return metrics

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not _by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
        bar.set_description("Training")
        self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self._show_step(trainer, pl_module)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class StepLogProgress(ProgressBar):
    """One line every ``every_n_steps`` optimizer steps (and at the last one), for logs:

    ``step 40/100  loss 0.123  opd 0.100  anchor 0.023  1,234 tok/s  elapsed 0:35  ETA 0:52``

    Args:
        every_n_steps: None = about 20 lines per run (``max_steps / 20``), or every 50 steps when training by epochs.
        stream: where the lines go (default: standard output, where Lightning's bars go).
    """

    LINES_PER_RUN = 20

    def __init__(self, every_n_steps: Optional[int] = None, stream=None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._start: Optional[tuple[float, int]] = None  # (time, step) when training started
        self._last_step = -1
        self._tokens_per_s: list[float] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def interval(self, trainer) -> int:
        if self.every_n_steps:
            return self.every_n_steps
        return max(1, trainer.max_steps // self.LINES_PER_RUN) if _by_steps(trainer) else 50

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tps = trainer.callback_metrics.get("train/tokens_per_s")
        if tps is not None:
            self._tokens_per_s.append(float(tps))
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == self._last_step:
            return  # a micro-batch of gradient accumulation, not a new optimizer step
        self._last_step = step
        last = _by_steps(trainer) and step >= trainer.max_steps
        if step % self.interval(trainer) == 0 or last:
            print(self.line(trainer, pl_module), file=self.stream or sys.stdout, flush=True)
            self._tokens_per_s.clear()

    def line(self, trainer, pl_module) -> str:
        step = trainer.global_step
        parts = [f"step {step}/{trainer.max_steps}" if _by_steps(trainer)
                 else f"epoch {trainer.current_epoch} step {step}"]
        for name, value in self.get_metrics(trainer, pl_module).items():
            if name.startswith("train/"):
                parts.append(f"{name[len('train/'):]} {float(value):.4g}")
        if self._tokens_per_s:
            parts.append(f"{sum(self._tokens_per_s) / len(self._tokens_per_s):,.0f} tok/s")
        if self._start is not None:
            elapsed = time.monotonic() - self._start[0]
            parts.append(f"elapsed {_clock(elapsed)}")
            done = step - self._start[1]
            if _by_steps(trainer) and done > 0 and step < trainer.max_steps:
                parts.append(f"ETA {_clock(elapsed / done * (trainer.max_steps - step))}")
        return "  ".join(parts)


def progress_callback(stream=None) -> ProgressBar:
    """The bar in a terminal, the line log elsewhere (decided by whether standard output is a terminal)."""
    out = stream or sys.stdout
    return StepProgressBar() if getattr(out, "isatty", lambda: False)() else StepLogProgress(stream=stream)
