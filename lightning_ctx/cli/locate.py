"""Where a config error comes from: the config file and line (or the command line) of a knob, and the knob checks
(``KNOB_CHECKS`` of each configured class) run on the parsed config before anything is built."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from lightning_ctx.checkpointing import RunCheckpoint
from lightning_ctx.cli.compose import config_files
from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.knobs import Check, ConfigError, at_least, check_class_args
from lightning_ctx.module import OnPolicyDistillation


def _yaml_key_line(node, parts: list[str]) -> Optional[int]:
    """1-based line of the key ``parts`` under a composed YAML ``node`` (``init_args`` levels and list
    items, such as callbacks, are looked through; ``callbacks+``, a list appended to, is ``callbacks``)."""
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
        if key.value in (parts[0], f"{parts[0]}+"):
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
    # --data.task.x is also written --data.task.init_args.x; a callback's --trainer.callbacks.init_args.x
    spellings = {f"--{key}",
                 *(f"--{'.'.join(parts[:i])}.init_args.{'.'.join(parts[i:])}" for i in range(1, len(parts)))}
    if any(a.split("=", 1)[0] in spellings for a in argv):
        return "command line", None
    for path in reversed(config_files(argv)):  # the last config that sets a key wins
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


#: Said when a config still uses the data section's old shape (a DataModule subclass per task).
OLD_DATA_SHAPE = ("the task now goes under data.task ({class_path: lightning_ctx.tasks.world.WorldTask, init_args: "
                  "{...}}; the *DataModule classes are *Task classes) and the loader's knobs (batch_size, "
                  "max_prompt_length, ...) directly under data; see docs/design.md, \"Data\"")


def _new_data_knob(name: str) -> str:
    """Where an old ``data.init_args.<name>`` lives now: the loader's own knobs directly under ``data``, the rest
    under ``data.task``."""
    import inspect

    return name if name in inspect.signature(TaskDataModule.__init__).parameters else f"task.{name}"


def locate_config_error(message: str, argv: list[str]) -> str:
    """Prefix ``message`` with ``file, line N`` when the offending key appears in a ``--config`` file (and say how
    the data section changed when the key is of its old shape)."""
    message = " ".join(message.split())
    hint = f" ({OLD_DATA_SHAPE})" if re.search(r"data\.(init_args|class_path)|DataModule", message) else ""
    old_knobs = dict.fromkeys(re.findall(r"data\.init_args\.(\w+)", message))
    if old_knobs:
        hint = f" (write {', '.join('data.' + _new_data_knob(k) for k in old_knobs)}; {OLD_DATA_SHAPE})"
    for key in re.findall(r"""['"]([A-Za-z_][\w.]*)['"]""", message):
        where = locate_key(key, argv, leaf_fallback=True)
        if where is not None and where[1] is not None:
            return f"{where[0]}, line {where[1]}, field '{key}': {message}{hint}"
    return message + hint


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

    def as_dict(args) -> dict:
        return dict(vars(args)) if not isinstance(args, dict) else dict(args)

    sections = [(OnPolicyDistillation, cfg.get("model"), "model."),
                (RunCheckpoint, cfg.get("checkpoint"), "checkpoint."), (TrainerKnobs, cfg.get("trainer"), "trainer.")]
    data = cfg.get("data")
    if data is not None:
        data_args = as_dict(data)
        sections.append((TaskDataModule, data_args, "data."))
        task = data_args.get("task")
        if task is not None and getattr(task, "class_path", None):
            # a task's checks also see the DataModule's knobs (the games' playability reads max_eval_items)
            loader = {k: v for k, v in data_args.items() if k != "task"}
            sections.append((cls_of(task.class_path), {**loader, **as_dict(task.get("init_args") or {})}, "data.task."))
    trainer = cfg.get("trainer")
    for callback in (trainer.get("callbacks") if trainer is not None else None) or []:
        if getattr(callback, "class_path", None):
            sections.append((cls_of(callback.class_path), callback.get("init_args"), "trainer.callbacks."))
    try:
        for cls, args, prefix in sections:
            if cls is not None and args is not None:
                check_class_args(cls, as_dict(args), prefix)
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
