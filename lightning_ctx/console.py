"""What the commands print besides our own lines.

* Third-party notices that say nothing about a run are silenced (:func:`quiet_third_party`), each where its library
  allows it (a warnings filter or a logging filter, never a global switch):

  - Lightning's "Found N module(s) in eval mode at the start of training": the teacher is frozen on purpose;
  - Lightning's "Checkpoint directory ... exists and is not empty": each run writes to a folder of its own, so a
    non-empty one holds the same run's checkpoints (a resumed run);
  - torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside Lightning's own pytree code;
  - Lightning's "Tip: ... try installing [litlogger]" advertisement (runs are tracked in MLflow), and its note that a
    model summary callback is already configured (ours, :class:`CompactModelSummary`);
  - MLflow's "Creating initial MLflow database tables..." / "Updating database tables" on a new store;
  - transformers' "Loading weights" and MLflow's "Downloading artifacts" progress bars (carriage returns in a log).

* Lightning's model table becomes one line (:class:`CompactModelSummary`).
* ``--help`` is plain text: docstrings lose their reStructuredText markup and every flag shows its default
  (:class:`PlainJsonargparseFormatter` for fit / validate / test, :class:`PlainHelpFormatter` for the argparse
  commands).

Outside the ``cli`` package so that the commands implemented elsewhere (``compare``, ``export``, ``extract``,
``pretrain-world``) and notebooks can use it without importing the command.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import warnings

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^`>]*>)?`")  # :class:`~a.b.C` -> C, :func:`x <y>` -> x
_LITERAL = re.compile(r"``([^`]+)``")  # ``code`` -> code
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")  # `text <url>`_ -> text
_DIRECTIVE = re.compile(r"\.\. [a-z-]+::\s*")  # .. warning:: (the text after it stays)


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup (roles, double-backtick literals, links)."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text)
    text = _DIRECTIVE.sub("", _LINK.sub(r"\1", text))
    return _LITERAL.sub(r"\1", text)


class PlainJsonargparseFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter (types and defaults of every flag), with docstring markup removed."""

    def _get_help_string(self, action) -> str:
        return plain_text(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def start_section(self, heading) -> None:  # group titles are docstring first lines
        super().start_section(plain_text(heading) if heading else heading)


class PlainHelpFormatter(argparse.HelpFormatter):
    """argparse help with the default of every flag that has one (unless its help already says it), in plain text."""

    def _get_help_string(self, action) -> str:
        text = plain_text(action.help or "")
        default = action.default
        flag_only = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)
        has_default = (default is not None and default is not argparse.SUPPRESS and not isinstance(action, flag_only)
                       and action.option_strings)
        if has_default and "%(default)" not in text and "default" not in text.lower():
            text += (" " if text else "") + "(default: %(default)s)"
        return text

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


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
    # every run has a checkpoint folder of its own (lightning_ctx.checkpointing): a non-empty one is its own resumed
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # the data position of a resumed run comes from its restored step (TaskDataModule._draws_done), so the
    # sampler restarts where the interrupted run stood: Lightning's generic doubt does not apply
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # the tip, and the note that our one-line CompactModelSummary replaces Lightning's default table
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessages("💡 Tip", "Trainer already configured with model summary callbacks"))
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read by MLflow at each download
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
