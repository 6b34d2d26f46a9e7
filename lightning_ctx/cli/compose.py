"""Config composition: ``--config`` files and the ones they build on (``defaults:``), in order.

A task base, a method file and a model file stack like repeated ``--config``; a file names what it builds on with
``defaults: [builtin:world.yaml, ../models/x.yaml]`` (``builtin:NAME`` = shipped in ``lightning_ctx/configs/``;
other paths are relative to the including file). Cycles and missing files are one-line errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lightning_ctx.errors import ConfigError
from lightning_ctx.textfiles import read_text

BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
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


def config_files(argv: list[str]) -> list[str]:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
