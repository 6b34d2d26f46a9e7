"""Print pip constraints for the lower-bounds environment: uv's ``--resolution lowest-direct`` of pyproject.toml.

    python scripts/min_constraints.py --uv .venv/bin/uv --python .venv-min/bin/python --extras dev \\
        --torch 2.13.0+cpu [--find-links DIR] > .venv-min/min-constraints.txt

``uv pip compile`` resolves every direct dependency of ``[project].dependencies`` and the chosen extras at its
lowest allowed version, the rest at the newest that fits. This wrapper adds two things uv does not do:

* torch is pinned to the build already installed (``--torch``, from the Makefile's TORCH_SPEC) instead of
  torch's own floor, and ``--find-links`` lets uv see that local wheel (a CPU build has no CUDA dependencies);
* the resolution is checked: every direct dependency must declare a lower bound and land exactly on it. A floor
  uv cannot reach together with the others (say ``matplotlib>=3.8`` where 3.8.0 needs numpy < 2 and another
  floor needs numpy 2) is an error naming the version it reached, so the floors in pyproject.toml stay the
  versions ``make test-min`` tests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def declared(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """``[project].dependencies`` plus the requirements of ``extras`` (ValueError for an unknown extra)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    groups = project.get("optional-dependencies", {})
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in groups:
            raise ValueError(f"no optional-dependency group {extra!r} (groups: {', '.join(sorted(groups))})")
        reqs += groups[extra]
    return [Requirement(r) for r in reqs]


def floors(reqs: list[Requirement], skip: set[str]) -> dict[str, str]:
    """``{name: lower bound}`` of each requirement (``>=X`` or ``==X``); ValueError when one has none."""
    out: dict[str, str] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        bounds = [s.version for s in req.specifier if s.operator in (">=", "==")]
        if not bounds:
            raise ValueError(f"{str(req)!r} declares no lower bound (>=X): say which version was tested")
        if name in out and out[name] != bounds[0]:
            raise ValueError(f"{name} has two different minimums: {out[name]} and {bounds[0]}")
        out[name] = bounds[0]
    return out


def pins(text: str) -> dict[str, str]:
    """``{name: version}`` of uv's ``name==version`` lines (comments and blank lines skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            out[canonicalize_name(req.name)] = spec.version
    return out


def off_floor(expected: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """The direct dependencies uv did not resolve at their declared floor, as readable lines."""
    from packaging.version import Version

    return [f"{name}: declared >={floor}, lowest that resolves with the other floors: {resolved.get(name, 'none')}"
            for name, floor in sorted(expected.items())
            if name not in resolved or Version(resolved[name]) != Version(floor)]


def compile_lowest(uv: str, python: str, pyproject: Path, extras: list[str], torch: str,
                   find_links: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(f"torch=={torch}\n")
        torch_pin = fh.name
    cmd = [uv, "pip", "compile", str(pyproject), "--resolution", "lowest-direct", "--python", python,
           "--constraint", torch_pin, "--no-header", "--no-annotate", "--quiet"]
    cmd += [a for extra in extras for a in ("--extra", extra)]
    cmd += [a for d in find_links for a in ("--find-links", d)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    Path(torch_pin).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"uv pip compile failed:\n{proc.stderr.strip()}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"))
    p.add_argument("--extras", default="dev", help="comma-separated optional-dependency groups (default: dev)")
    p.add_argument("--uv", default="uv", help="the uv executable")
    p.add_argument("--python", default=sys.executable, help="the interpreter to resolve for (default: this one)")
    p.add_argument("--torch", required=True, help="the installed torch version to pin, e.g. 2.13.0+cpu")
    p.add_argument("--find-links", action="append", default=[], help="where uv finds that torch wheel (repeatable)")
    args = p.parse_args(argv)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    try:
        expected = floors(declared(Path(args.pyproject), extras), skip={"torch"})
        text = compile_lowest(args.uv, args.python, Path(args.pyproject), extras, args.torch, args.find_links)
    except (ValueError, RuntimeError) as err:
        print(f"min_constraints: {err}", file=sys.stderr)
        return 1
    problems = off_floor(expected, pins(text))
    if problems:
        print("min_constraints: the declared floors do not resolve together; raise these or make them fit:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"# uv pip compile --resolution lowest-direct of pyproject.toml (extras: {','.join(extras) or 'none'}), "
          f"torch=={args.torch}; by scripts/min_constraints.py")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
