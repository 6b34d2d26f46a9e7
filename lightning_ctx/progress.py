"""A training progress bar that counts optimizer steps towards ``trainer.max_steps``."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """One bar over optimizer steps when ``trainer.max_steps`` is set: ``Training (epoch 11): 40/150``.

    Lightning's bar restarts every epoch and, on a ``max_steps`` run, has no meaningful epoch total; the
    built-in world's epochs are 13 batches long, so that bar said nothing about how far the run was.
    Without ``max_steps`` it behaves exactly like Lightning's.
    """

    @staticmethod
    def _by_steps(trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _show_step(self, trainer, pl_module=None) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step  # a resumed run starts where it stopped
        if pl_module is not None:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
        bar.set_description(f"Training (epoch {trainer.current_epoch})")
        self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self._show_step(trainer, pl_module)
