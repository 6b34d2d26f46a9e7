"""``lightning-ctx``: LightningCLI (``fit``, ``validate``, ``test``) plus the commands of :data:`EXTRA_COMMANDS`
(``export``, ``compare``, ``ui``, ``extract``, ``pretrain-world``, ``pretrain-games``); ``lightning-ctx --help`` lists
them all.

Config composition lives in :mod:`lightning_ctx.cli.compose`, locating config errors and the knob checks in
:mod:`lightning_ctx.cli.locate`, ``--ckpt_path`` (which checkpoint, which run, which ``--model.*`` values) in
:mod:`lightning_ctx.cli.resume`; this module is the command itself.

Configs are YAML (``parser_mode="omegaconf"``, so values can be shared with ``${...}``).
Every failure a user can meet ends in one line on stderr, never a Python traceback, with an exit status that says
which kind it was (:data:`EXIT_CODES`, docs/reliability.md).
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_ctx.checkpointing import RunCheckpoint, run_checkpoint, use_atomic_checkpoint_io
from lightning_ctx.cli.compose import expand_configs
from lightning_ctx.cli.locate import check_knobs, locate_config_error
from lightning_ctx.cli.resume import Resume, continue_tracking, merge_model_config, read_resume, resolve_ckpt_path
from lightning_ctx.console import CompactModelSummary, PlainJsonargparseFormatter, quiet_third_party
from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.data.records import DataError
from lightning_ctx.errors import WriteError
from lightning_ctx.export import ModelExport
from lightning_ctx.models.loading import ModelError
from lightning_ctx.module import NonFiniteLossError, OnPolicyDistillation
from lightning_ctx.progress import progress_callback
from lightning_ctx.summary import run_summary
from lightning_ctx.tracking import (
    MLflowConfigCallback,
    MLflowLogger,
    TrackingError,
    check_store_writable,
    check_tracking_reachable,
)

USER_ERRORS = (DataError, ModelError, TrackingError)

#: Exit status of ``lightning-ctx`` -> what it means (docs/reliability.md lists the same).
EXIT_CODES = {
    0: "done",
    1: "interrupted with Ctrl-C (Lightning's own exit), or compare found nothing to compare",
    2: "a user error found before training: config, data, model, checkpoint or tracking store (one line names it)",
    3: "stopped at a non-finite loss (a checkpoint of the state before the step, unless the weights diverged)",
    4: "a file could not be written (a full disk, no permission); the last good checkpoint is named",
    143: "stopped by SIGTERM (preemption) after saving last.ckpt at a step boundary; resume with --ckpt_path last",
}


class Preempted(Exception):
    """A fit stopped by SIGTERM at a step boundary (its checkpoint saved); exit 143."""


def user_error_in(err: BaseException) -> Optional[BaseException]:
    """The user error behind ``err``: itself, or one it was raised from (jsonargparse wraps errors raised while it
    builds the configured classes, e.g. a task reading its files, in its own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (*USER_ERRORS, WriteError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_CURRENT_ARGV: list[str] = []  # the arguments being parsed, for locating config errors


class ConciseArgumentParser(LightningArgumentParser):
    """Config errors as one line naming the config file, line and key (no usage wall)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        print(f"lightning-ctx: error: {locate_config_error(message, _CURRENT_ARGV)}", file=sys.stderr)
        raise SystemExit(2)


class ContextCLI(LightningCLI):
    """``print_summary``: the run summary after fit / validate / test (:mod:`lightning_ctx.summary`)."""

    def __init__(self, args=None, run: bool = True, print_summary: bool = True, **kwargs):
        quiet_third_party()
        self.print_summary = print_summary
        if args is None or isinstance(args, (list, tuple)):
            args = expand_configs(list(sys.argv[1:] if args is None else args))
            _CURRENT_ARGV[:] = args
        kwargs.setdefault("trainer_defaults", {
            "logger": {"class_path": "lightning_ctx.tracking.MLflowLogger"},
            "log_every_n_steps": 1,
            "max_steps": 50,
        })
        super().__init__(
            OnPolicyDistillation,
            TaskDataModule,  # the one DataModule: configs name its task (data.task), not a DataModule class
            parser_class=ConciseArgumentParser,
            save_config_callback=MLflowConfigCallback,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False,
                           "formatter_class": PlainJsonargparseFormatter},
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (no ``predict``: the module has no ``forward`` to predict with)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, without its warning about ``args`` beside ``sys.argv``: :func:`main` passes the command line
        itself, with every config's ``defaults`` expanded (``expand_configs``)."""
        self.config = parser.parse_args(args) if isinstance(args, (list, tuple)) else parser.parse_object(args)
        self._resolve_ckpt_path()  # here, not in Lightning's _parse_ckpt_path: Lightning < 2.6 has no such hook

    def _parse_ckpt_path(self) -> None:
        """Lightning >= 2.6 reads ``--ckpt_path``'s hyperparameters here; :meth:`_resolve_ckpt_path` has done it."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data.task": {"class_path": "lightning_ctx.data.task.JSONLTask"}})
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelExport, "export")
        parser.add_argument("--defaults", type=Optional[list[str]], default=None,
                            help="Configs this one builds on, applied before it (builtin:NAME or a path relative "
                                 "to this file); expanded by lightning-ctx before parsing.")

    def _resolve_ckpt_path(self) -> None:
        """Lightning's own replaces the model config by the checkpoint's hyperparameters, silently dropping this
        command's ``--model.*`` values, and reads ``last`` from another file than it restores. Here ``last`` is
        resolved once, the file is checked, and the values are merged (:mod:`lightning_ctx.cli.resume`)."""
        self.resume: Optional[Resume] = None
        self.resolved_ckpt_path: Optional[str] = None  # what trainer.fit/validate/test get (_prepare_subcommand_kwargs)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        path = resolve_ckpt_path(cfg, subcommand)
        if path is None:
            return
        self.resume, hparams = read_resume(path)
        if hparams:
            merged, changes = merge_model_config(hparams, cfg.get("model"), _CURRENT_ARGV, path)
            self.config = self.parser.parse_object({subcommand: {"model": merged}}, self.config)
            if changes:
                rank_zero_info(f"resuming {path} (step {self.resume.step}) with {', '.join(changes)}")
        self.resolved_ckpt_path = str(path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Lightning's, with ``ckpt_path`` the file resolved above (the config keeps what was asked, e.g. ``last``:
        jsonargparse refuses a config whose ``ckpt_path`` was set after parsing)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs:
            kwargs["ckpt_path"] = self.resolved_ckpt_path
        return kwargs

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        check_knobs(cfg, _CURRENT_ARGV)
        if cfg is not None and "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg.weights_only = True  # --ckpt_path loads tensors and primitives only, never arbitrary pickles

    def _instantiate_trainer(self, config, callbacks):
        # The checkpoint callback is always configured (``--checkpoint.*``) but must step aside when
        # the user turns checkpointing off, or Lightning refuses the combination.
        if config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, RunCheckpoint)]
        chosen = list(callbacks) + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(cb, ProgressBar) for cb in chosen):
            callbacks = [*callbacks, progress_callback()]  # a bar over steps in a terminal, short lines in a log
        if config.get("enable_model_summary") is not False and not any(isinstance(cb, ModelSummary) for cb in chosen):
            callbacks = [*callbacks, CompactModelSummary()]  # one line instead of Lightning's table
        trainer = super()._instantiate_trainer(config, callbacks)
        use_atomic_checkpoint_io(trainer)  # also for the checkpoints saved without the checkpoint callback
        return trainer

    def _prepare(self) -> None:
        """Validate data, model and tracking store before a logger creates any run."""
        dm, model = self.datamodule, self.model
        for logger in self.trainer.loggers:
            uri = getattr(logger, "_tracking_uri", None)
            if uri:
                check_tracking_reachable(uri)
                check_store_writable(uri)
        if dm is None:
            return
        dm.connect(model.tokenizer)
        model.check_data(dm)

    def before_fit(self) -> None:
        self._prepare()
        if self.resume is not None:
            continue_tracking(self.trainer, self.resume)

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit``; a SIGTERM (preemption) ends the MLflow run KILLED and becomes :class:`Preempted`."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            self.trainer.fit(model, **kwargs)
        except SIGTERMException:
            keeper = run_checkpoint(self.trainer)
            saved = keeper.last_good if keeper is not None else None
            for logger in self.trainer.loggers:
                if isinstance(logger, MLflowLogger):
                    logger.end_killed()
            step = self.trainer.global_step
            if saved:
                raise Preempted(f"SIGTERM at step {step}; {saved} holds it: resume with the same command plus "
                                "--ckpt_path last") from None
            why = ("trainer.enable_checkpointing is false" if keeper is None
                   else "the weights were not finite" if keeper.nonfinite_at is not None else "nothing was written")
            raise Preempted(f"SIGTERM at step {step}; no checkpoint ({why}), so the run cannot be resumed") from None

    def before_validate(self) -> None:
        self._prepare()

    def before_test(self) -> None:
        self._prepare()

    def _summarize(self, stage: str) -> None:
        text = run_summary(self.trainer, stage) if self.print_summary else None
        if text:
            print(text, flush=True)

    def after_fit(self) -> None:
        self._summarize("fit")

    def after_validate(self) -> None:
        self._summarize("validate")

    def after_test(self) -> None:
        self._summarize("test")


# Subcommands outside LightningCLI: name -> "module:function" taking argv (imported lazily).
EXTRA_COMMANDS = {
    "compare": "lightning_ctx.compare_report:compare_main",
    "pretrain-world": "lightning_ctx.tasks.world.pretrain:main",
    "pretrain-games": "lightning_ctx.tasks.games.frozenlake_base.pretrain:main",
    "extract": "lightning_ctx.tasks.games.extract:extract_main",
    "export": "lightning_ctx.export:export_main",
    "ui": "lightning_ctx.cli.ui:ui_main",
}

# One line per subcommand for ``lightning-ctx --help`` (every registered command has one: tests/test_cli_help.py).
DESCRIPTIONS = {
    "fit": "distill: train the student from a config (--config FILE), evaluate it, track it in MLflow",
    "validate": "evaluate a model (or --ckpt_path) on the validation split",
    "test": "evaluate a model (or --ckpt_path) on the test split (metrics test/*)",
    "export": "the distilled student as a save_pretrained folder, from a checkpoint or an MLflow run",
    "compare": "the OPD vs anchored table of finished runs, read back from MLflow",
    "ui": "the MLflow UI on ./mlruns (a moved or copied store is re-rooted first)",
    "extract": "a text game's experience, written by the model from its own games (OPCD's extraction)",
    "pretrain-world": "retrain the built-in rule-world base model (builtin:world)",
    "pretrain-games": "retrain the built-in FrozenLake game base model (builtin:games)",
}


def top_level_help() -> str:
    registered = [*ContextCLI.subcommands(), *EXTRA_COMMANDS]
    names = [n for n in DESCRIPTIONS if n in registered] + [n for n in registered if n not in DESCRIPTIONS]
    width = max(map(len, names)) + 2
    lines = ["usage: lightning-ctx COMMAND [--help] [options]", "",
             "On-policy context distillation on PyTorch Lightning; runs are tracked in MLflow (./mlruns).", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}{DESCRIPTIONS.get(name, '')}" for name in names]
    lines += ["", "Run `lightning-ctx COMMAND --help` for the flags of one command (fit, validate and test share",
              "theirs; `lightning-ctx fit --print_config` prints every knob with its value)."]
    return "\n".join(lines)


def _fail(prefix: str, message: str, code: int) -> None:
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _CURRENT_ARGV[:] = argv
    quiet_third_party()
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        raise SystemExit(0 if argv else 2)
    prefix = f"lightning-ctx {argv[0]}" if argv[0] in EXTRA_COMMANDS else "lightning-ctx"
    try:
        if argv[0] in EXTRA_COMMANDS:
            import importlib

            module_name, func = EXTRA_COMMANDS[argv[0]].split(":")
            result = getattr(importlib.import_module(module_name), func)(argv[1:])
            raise SystemExit(result if isinstance(result, int) else 0)
        ContextCLI(args=None if from_command_line else argv)
    except NonFiniteLossError as err:  # the run is marked failed and a checkpoint was saved first (finite weights)
        _fail("lightning-ctx: stopped", str(err), 3)
    except Preempted as err:
        _fail("lightning-ctx: stopped", str(err), 143)
    except Exception as err:  # noqa: BLE001 - only user errors (possibly wrapped) become one line; others re-raise
        found = user_error_in(err)
        if found is None:
            raise
        _fail(f"{prefix}: error", str(found), 4 if isinstance(found, WriteError) else 2)
