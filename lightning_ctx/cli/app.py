"""``lightning-ctx``: LightningCLI (``fit``, ``validate``, ``test``) plus ``compare``, ``pretrain-world``,
``pretrain-games``, ``extract``.

Config composition lives in :mod:`lightning_ctx.cli.compose`, locating config errors and the knob checks in
:mod:`lightning_ctx.cli.locate`; this module is the command itself.

Configs are YAML (``parser_mode="omegaconf"``, so values can be shared with ``${...}``).
User errors (bad data, missing model, vocab mismatch) print one line and exit with status 2 before
any training or tracking starts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_ctx.checkpointing import RunCheckpoint, find_last_checkpoint, read_mlflow_run_id
from lightning_ctx.cli.compose import expand_configs
from lightning_ctx.cli.locate import check_knobs, locate_config_error
from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import DataError
from lightning_ctx.models.loading import ModelError
from lightning_ctx.module import NonFiniteLossError, OnPolicyDistillation
from lightning_ctx.progress import StepProgressBar
from lightning_ctx.tracking import MLflowConfigCallback, MLflowLogger, TrackingError, check_tracking_reachable

USER_ERRORS = (DataError, ModelError, TrackingError)


_CURRENT_ARGV: list[str] = []  # the arguments being parsed, for locating config errors


class ConciseArgumentParser(LightningArgumentParser):
    """Config errors as one line naming the config file, line and key (no usage wall)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        print(f"lightning-ctx: error: {locate_config_error(message, _CURRENT_ARGV)}", file=sys.stderr)
        raise SystemExit(2)


def fix_subclass_defaults(cfg) -> None:
    """Give a data module subclass its own defaults (jsonargparse issue #460).

    When a config switches ``data.class_path`` away from ``ContextPairDataModule``, jsonargparse keeps
    the base class's defaults for shared arguments (``WorldDataModule`` would get ``batch_size=8``).
    An argument still equal to the base default is reset to the subclass default; the one thing this
    cannot tell apart is a value set explicitly to exactly the base default.
    """
    import importlib
    import inspect

    data = cfg.get("data") if cfg is not None else None
    class_path = getattr(data, "class_path", None) if data is not None else None
    if not class_path or class_path.endswith(".ContextPairDataModule"):
        return
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return
    base = inspect.signature(ContextPairDataModule.__init__).parameters
    own = inspect.signature(cls.__init__).parameters
    init_args = data.init_args
    for key, param in own.items():
        if key in base and key in init_args and param.default is not inspect.Parameter.empty:
            if init_args[key] == base[key].default and param.default != base[key].default:
                init_args[key] = param.default


class ContextCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
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
            ContextPairDataModule,
            subclass_mode_data=True,
            parser_class=ConciseArgumentParser,
            save_config_callback=MLflowConfigCallback,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_ctx.data.datamodule.ContextPairDataModule"}})
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_argument("--defaults", type=Optional[list[str]], default=None,
                            help="Configs this one builds on, applied before it (builtin:NAME or a path relative "
                                 "to this file); expanded by lightning-ctx before parsing.")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        fix_subclass_defaults(cfg)
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
            callbacks = [*callbacks, StepProgressBar()]  # steps out of max_steps, not a per-epoch bar
        return super()._instantiate_trainer(config, callbacks)

    def _prepare(self) -> None:
        """Validate data, model and tracking store before a logger creates any run."""
        dm, model = self.datamodule, self.model
        for logger in self.trainer.loggers:
            uri = getattr(logger, "_tracking_uri", None)
            if uri:
                check_tracking_reachable(uri)
        if dm is None:
            return
        dm.connect(model.tokenizer)
        model.check_data(dm)

    def _resume_tracking(self) -> None:
        """``--ckpt_path``: find the checkpoint and continue its MLflow run (no duplicate run)."""
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint):
                cb.set_default_dirpath(self.trainer.default_root_dir)
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path == "last":
            found = [find_last_checkpoint(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if cb.dirpath]
            found = [p for p in found if p is not None]
            if not found:
                return  # Lightning warns and starts fresh, as documented for ckpt_path=last
            ckpt_path = max(found, key=lambda p: p.stat().st_mtime)
        elif not Path(ckpt_path).exists():
            raise DataError("checkpoint does not exist", path=ckpt_path, field="ckpt_path")
        run_id = read_mlflow_run_id(ckpt_path)
        if run_id:
            for logger in self.trainer.loggers:
                if isinstance(logger, MLflowLogger):
                    logger.continue_run(run_id)

    def before_fit(self) -> None:
        self._prepare()
        self._resume_tracking()

    def before_validate(self) -> None:
        self._prepare()

    def before_test(self) -> None:
        self._prepare()


# Subcommands outside LightningCLI: name -> "module:function" taking argv (imported lazily).
EXTRA_COMMANDS = {
    "compare": "lightning_ctx.compare_report:compare_main",
    "pretrain-world": "lightning_ctx.tasks.world.pretrain:main",
    "pretrain-games": "lightning_ctx.tasks.games.frozenlake_base.pretrain:main",
    "extract": "lightning_ctx.tasks.games.extract:extract_main",
}


def main(argv: Optional[list[str]] = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _CURRENT_ARGV[:] = argv
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        module_name, func = EXTRA_COMMANDS[argv[0]].split(":")
        try:
            result = getattr(importlib.import_module(module_name), func)(argv[1:])
        except USER_ERRORS as err:
            print(f"lightning-ctx {argv[0]}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        raise SystemExit(result if isinstance(result, int) else 0)
    try:
        ContextCLI(args=None if from_command_line else argv)
    except USER_ERRORS as err:
        print(f"lightning-ctx: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:  # the run is marked failed and a checkpoint was saved first
        print(f"lightning-ctx: stopped: {err}", file=sys.stderr)
        raise SystemExit(3) from None

