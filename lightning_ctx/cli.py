"""``lightning-ctx``: LightningCLI (``fit``, ``validate``, ``test``) plus ``compare``, ``pretrain-world``, ``extract``.

Configs are YAML (``parser_mode="omegaconf"``, so values can be shared with ``${...}``).
User errors (bad data, missing model, vocab mismatch) print one line and exit with status 2 before
any training or tracking starts.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_ctx.checkpointing import RunCheckpoint, find_last_checkpoint, read_mlflow_run_id
from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import DataError
from lightning_ctx.knobs import Check, ConfigError, at_least, check_class_args
from lightning_ctx.models.loading import ModelError
from lightning_ctx.module import NonFiniteLossError, OnPolicyDistillation
from lightning_ctx.progress import StepProgressBar
from lightning_ctx.textfiles import read_text
from lightning_ctx.tracking import MLflowConfigCallback, MLflowLogger, TrackingError, check_tracking_reachable

USER_ERRORS = (DataError, ModelError, TrackingError)


_CURRENT_ARGV: list[str] = []  # the arguments being parsed, for locating config errors


class ConciseArgumentParser(LightningArgumentParser):
    """Config errors as one line naming the config file, line and key (no usage wall)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        print(f"lightning-ctx: error: {locate_config_error(message, _CURRENT_ARGV)}", file=sys.stderr)
        raise SystemExit(2)


BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"
BUILTIN_PREFIX = "builtin:"


def resolve_config(ref: str, relative_to: Optional[Path] = None) -> Path:
    """A config reference: ``builtin:NAME`` (shipped in the package), or a path (relative to the including file)."""
    if ref.startswith(BUILTIN_PREFIX):
        path = BUILTIN_CONFIGS / ref[len(BUILTIN_PREFIX):]
    else:
        path = Path(ref).expanduser()
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
    if not path.is_file():
        where = f" (from the defaults of {relative_to})" if relative_to else ""
        raise ConfigError(f"config file does not exist{where}", path=path,
                          field="defaults" if relative_to else "--config")
    return path


def _config_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[Path]:
    """``path``'s ``defaults`` (recursively, in order), then ``path`` itself."""
    import yaml

    if path.resolve() in stack:
        raise ConfigError(f"the defaults form a cycle: {' -> '.join(map(str, [*stack, path.resolve()]))}",
                          path=path, field="defaults")
    try:
        content = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML ({' '.join(str(err).split())})", path=path) from None
    defaults = content.get("defaults") if isinstance(content, dict) else None
    if defaults is not None and not (isinstance(defaults, list) and all(isinstance(d, str) for d in defaults)):
        raise ConfigError("must be a list of config paths", path=path, field="defaults")
    chain: list[Path] = []
    for ref in defaults or []:
        chain += _config_chain(resolve_config(ref, path.parent), (*stack, path.resolve()))
    return chain + [path]


def expand_configs(argv: list[str]) -> list[str]:
    """Replace every ``--config FILE`` by ``--config`` of each of FILE's ``defaults``, then FILE itself.

    Configs compose: a task base, a method file and a model file stack like repeated ``--config``, and a
    file can name the ones it builds on (``defaults: [builtin:world.yaml, builtin:methods/opd.yaml]``).
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            ref, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            ref, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for path in _config_chain(resolve_config(ref)):
            out += ["--config", str(path)]
    return out


def _config_files(argv: list[str]) -> list[str]:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _yaml_key_line(node, parts: list[str]) -> Optional[int]:
    """1-based line of the key ``parts`` under a composed YAML ``node`` (``init_args`` levels and list
    items, such as callbacks, are looked through)."""
    import yaml

    if not parts:
        return None
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _yaml_key_line(item, parts)
            if found:
                return found
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for key, value in node.value:
        if key.value == parts[0]:
            return key.start_mark.line + 1 if len(parts) == 1 else _yaml_key_line(value, parts[1:])
    for key, value in node.value:
        if key.value == "init_args":
            return _yaml_key_line(value, parts)
    return None


def locate_key(key: str, argv: list[str], leaf_fallback: bool = False) -> Optional[tuple[str, Optional[int]]]:
    """Where knob ``key`` (``model.lr``) was set: ``("command line", None)`` or ``(config file, line)``.

    ``leaf_fallback``: for keys the parser does not know (a typo may sit at any depth), match the last
    name part anywhere in the file.
    """
    import yaml

    parts = key.split(".")
    spellings = {f"--{key}", f"--{parts[0]}.init_args.{'.'.join(parts[1:])}"}
    if any(a.split("=", 1)[0] in spellings for a in argv):
        return "command line", None
    for path in reversed(_config_files(argv)):  # the last config that sets a key wins
        try:
            node = yaml.compose(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        line = _yaml_key_line(node, parts)
        if line is None and leaf_fallback:
            line = _leaf_line(path, parts[-1])
        if line is not None:
            return path, line
    return None


def _leaf_line(path: str, leaf: str) -> Optional[int]:
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if re.match(rf"\s*{re.escape(leaf)}\s*:", line):
            return n
    return None


def locate_config_error(message: str, argv: list[str]) -> str:
    """Prefix ``message`` with ``file, line N`` when the offending key appears in a ``--config`` file."""
    message = " ".join(message.split())
    for key in re.findall(r"""['"]([A-Za-z_][\w.]*)['"]""", message):
        where = locate_key(key, argv, leaf_fallback=True)
        if where is not None and where[1] is not None:
            return f"{where[0]}, line {where[1]}, field '{key}': {message}"
    return message


def check_knobs(cfg, argv: list[str]) -> None:
    """Every knob of the parsed config against its class's ``KNOB_CHECKS``, before anything is built.

    Raises one :class:`ConfigError` naming the config file and line (or the command line) and the knob.
    """
    import importlib

    def cls_of(class_path: str):
        module_name, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            return None  # jsonargparse reports unknown classes itself

    sections = [(OnPolicyDistillation, cfg.get("model"), "model."),
                (RunCheckpoint, cfg.get("checkpoint"), "checkpoint."), (TrainerKnobs, cfg.get("trainer"), "trainer.")]
    data = cfg.get("data")
    if data is not None and getattr(data, "class_path", None):
        sections.append((cls_of(data.class_path), data.get("init_args"), "data."))
    trainer = cfg.get("trainer")
    for callback in (trainer.get("callbacks") if trainer is not None else None) or []:
        if getattr(callback, "class_path", None):
            sections.append((cls_of(callback.class_path), callback.get("init_args"), "trainer.callbacks."))
    try:
        for cls, args, prefix in sections:
            if cls is not None and args is not None:
                check_class_args(cls, dict(vars(args)) if not isinstance(args, dict) else args, prefix)
    except ConfigError as err:
        where = locate_key(err.field, argv)
        path, line = where if where is not None else (None, None)
        raise ConfigError(err.message, path=path, line=line, field=err.field) from None


class TrainerKnobs:
    """The ``trainer.*`` knobs this package checks (Lightning's own checks come later, after model loading)."""

    KNOB_CHECKS = (
        Check("max_steps", lambda v: v == -1 or (isinstance(v, int) and v >= 1), "must be -1 (no limit) or >= 1"),
        Check("max_epochs", lambda v: v == -1 or (isinstance(v, int) and v >= 1), "must be -1 (no limit) or >= 1"),
        at_least("accumulate_grad_batches", 1), at_least("gradient_clip_val", 0), at_least("log_every_n_steps", 1),
        at_least("num_nodes", 1),
    )

    def __init__(self, max_steps: int = -1, max_epochs: Optional[int] = None, accumulate_grad_batches: int = 1,
                 gradient_clip_val: Optional[float] = None, log_every_n_steps: Optional[int] = None,
                 num_nodes: int = 1):
        pass


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


if __name__ == "__main__":
    main()
