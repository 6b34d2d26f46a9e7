"""What the command prints besides our own lines: third-party notices that say nothing about a run are silenced, and
Lightning's model table becomes one line.

Silenced, each where its library allows it (a warnings filter or a logging filter, never a global switch):

* Lightning's "Found N module(s) in eval mode at the start of training": the teacher is frozen on purpose;
* torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside Lightning's own pytree code;
* Lightning's "Tip: ... try installing [litlogger]" advertisement (runs are tracked in MLflow), and its note that a
  model summary callback is already configured (ours, :class:`CompactModelSummary`);
* MLflow's "Creating initial MLflow database tables..." / "Updating database tables" on a new store;
* transformers' "Loading weights" progress bars (thousands of carriage returns in a log).
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters above (again on every call: a caller may have reset the warning filters)."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # the tip, and the note that our one-line CompactModelSummary replaces Lightning's default table
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessages("💡 Tip", "Trainer already configured with model summary callbacks"))
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class CompactModelSummary(ModelSummary):
    """Lightning's model summary as one line: each top-level module with its type and parameters (no FLOPs column,
    which Lightning cannot count here and prints as 0)."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes, total_flops: int = 0, **kwargs) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count as count

        columns = dict(summary_data)
        parts = [f"{name} {kind} ({params}{', frozen' if mode == 'eval' else ''})"
                 for name, kind, params, mode in zip(columns["Name"], columns["Type"], columns["Params"],
                                                     columns["Mode"])]
        rank_zero_info(f"model: {'; '.join(parts)}; {count(trainable_parameters)} of {count(total_parameters)} "
                       f"parameters train; {model_size:.1f} MB")
