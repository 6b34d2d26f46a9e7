"""Knob ranges, declared once beside each class and checked before anything is loaded.

Each configurable class lists its constraints as ``KNOB_CHECKS`` (a tuple of :class:`Check`). Its
``__init__`` calls :func:`check_args` first thing (so Python users get the same errors), and the CLI
calls :func:`check_class_args` on the parsed config *before* any class is instantiated, so a bad knob
costs no model load and leaves no MLflow run behind. A failure is one :class:`ConfigError` naming the
knob (``model.anchor_weight``), what it must be, and the value given.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

from lightning_ctx.errors import ConfigError
from lightning_ctx.textfiles import file_problem


@dataclass(frozen=True)
class Check:
    """One constraint on argument ``name``; ``None`` passes unless ``required``."""

    name: str
    ok: Callable[[Any], bool]
    expect: str
    when: Optional[Callable[[Mapping[str, Any]], bool]] = None  # applies only if this holds for the args
    required: bool = False
    hint: str = ""  # what else would make the value acceptable


@dataclass(frozen=True)
class ArgsCheck:
    """A check over several arguments that measures something to say what is wrong (e.g. the games' playability):
    ``run(args)`` raises its own :class:`ConfigError` naming the knob and the measured value."""

    run: Callable[[Mapping[str, Any]], None]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def at_least(name: str, low: float, **kw) -> Check:
    return Check(name, lambda v: _number(v) and v >= low, f"must be >= {low}", **kw)


def above(name: str, low: float, **kw) -> Check:
    return Check(name, lambda v: _number(v) and v > low, f"must be > {low}", **kw)


def within(name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False, **kw) -> Check:
    def ok(v):
        return (_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Check(name, ok, f"must be in {interval}", **kw)


def one_of(name: str, choices: Iterable[str], **kw) -> Check:
    choices = tuple(choices)
    return Check(name, lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}", **kw)


def non_empty(name: str, **kw) -> Check:
    return Check(name, lambda v: isinstance(v, str) and bool(v.strip()), "must be a non-empty string",
                 required=True, **kw)


def existing_file(name: str, **kw) -> Check:
    """A path that exists, is a regular file and can be opened (the message says which one failed)."""
    return Check(name, lambda v: file_problem(v) is None, "", **kw)


def check_args(checks: Iterable[Check | ArgsCheck], args: Mapping[str, Any], prefix: str = "",
               whole: bool = True) -> None:
    """Raise :class:`ConfigError` for the first argument in ``args`` that breaks its check (``whole=False``: skip the
    :class:`ArgsCheck` ones, for a class that runs them itself once everything they read is known)."""
    for check in checks:
        if isinstance(check, ArgsCheck):
            if whole:
                check.run(args)
            continue
        if check.name not in args:
            continue
        value = args[check.name]
        if value is None and not check.required:
            continue
        if check.when is not None and not check.when(args):
            continue
        if not check.ok(value):
            problem = check.expect or file_problem(value)
            hint = f" ({check.hint})" if check.hint else ""
            raise ConfigError(f"{problem}{hint}, got {value!r}", field=f"{prefix}{check.name}")


def literal_choices(annotation: Any) -> Optional[tuple]:
    """The values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation; None for any other type."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        parts = [literal_choices(a) for a in typing.get_args(annotation) if a is not type(None)]
        if parts and all(p is not None for p in parts):
            return tuple(v for p in parts for v in p)
    return None


def class_checks(cls: type) -> tuple[Check, ...]:
    """A ``one_of`` check per ``Literal``-typed ``__init__`` argument of ``cls`` and its bases (the choices are
    declared once, by the type), then their ``KNOB_CHECKS`` (a subclass adds to, never loses, its base's checks)."""
    out: list[Check] = []
    for klass in reversed(cls.__mro__):
        init = vars(klass).get("__init__")
        if init is not None and klass is not object:
            try:
                hints = typing.get_type_hints(init)
            except (NameError, TypeError):  # an annotation that does not resolve: no derived checks for it
                hints = {}
            for name, annotation in hints.items():
                choices = literal_choices(annotation)
                if choices is not None:
                    out.append(one_of(name, choices))
    for klass in reversed(cls.__mro__):
        out.extend(vars(klass).get("KNOB_CHECKS", ()))
    return tuple(out)


def bound_args(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` completed with the defaults of ``cls.__init__`` and of its bases' (a subclass that passes
    ``**kwargs`` on), so conditional checks see every argument."""
    args: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        args.update({name: p.default for name, p in inspect.signature(init).parameters.items()
                     if p.default is not inspect.Parameter.empty})
    args.update(given)
    return args


def check_class_args(cls: type, given: Mapping[str, Any], prefix: str, whole: bool = True) -> None:
    check_args(class_checks(cls), bound_args(cls, given), prefix, whole)


def renamed(old: str, new: str, old_value: Any, new_value: Any, default: Any, prefix: str = "") -> Any:
    """A knob renamed ``old`` -> ``new``, whose old name still works for one release: the value to use (the old
    name's, with a ``FutureWarning``, when only it is set); both set is a :class:`ConfigError`."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise ConfigError(f"is the old name of {prefix}{new}: set only {prefix}{new}", field=f"{prefix}{old}")
    warnings.warn(f"{prefix}{old} is renamed {prefix}{new}; the old name goes in the next release", FutureWarning,
                  stacklevel=3)
    return old_value
