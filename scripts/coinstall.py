"""Check that lightning-ctx installs beside GPU inference stacks without changing what they resolve to.

    python scripts/coinstall.py --uv .venv/bin/uv "vllm==0.33.0" "sglang==0.5.23" "trl[vllm]"

For each stack, uv resolves the stack alone and the stack together with pyproject.toml (what
``pip install -e . <stack>`` asks for), for this interpreter and platform. It fails when the pair does not
resolve, or when adding us moves the stack itself, its engine (vllm, sglang), torch or transformers to another
version: an unpinned ``trl[vllm]`` would otherwise fall back silently to an older vllm that allows our floors.
Resolution only (package metadata, no wheel download), a few seconds per stack with uv; ``pip install
--dry-run`` downloads every wheel it considers, several GB for vllm.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
#: Beside the stack's own names: versions that adding us must not move.
GUARDED = ("torch", "transformers", "vllm", "sglang")


def resolve(uv: str, python: str, stack: str, pyproject: str | None = None) -> tuple[dict[str, str] | None, str]:
    """``({name: version}, "")`` of uv's resolution of ``stack`` (plus ``pyproject``), or ``(None, uv's error)``."""
    with tempfile.TemporaryDirectory() as tmp:
        stack_in = Path(tmp) / "stack.in"
        stack_in.write_text(stack + "\n")
        sources = [str(stack_in)] + ([pyproject] if pyproject else [])
        proc = subprocess.run([uv, "pip", "compile", *sources, "--python", python, "--no-header", "--no-annotate",
                               "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr.strip()
    pins = {}
    for line in proc.stdout.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins, ""


def check(stack: str, alone: dict[str, str], together: dict[str, str]) -> list[str]:
    """What adding us changed among the stack's own name and ``GUARDED`` (empty = fine)."""
    names = {canonicalize_name(Requirement(stack).name), *GUARDED}
    return [f"{name} {alone[name]} -> {together.get(name, 'absent')}" for name in sorted(names)
            if name in alone and together.get(name) != alone[name]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stacks", nargs="+", help='requirements to co-install with, e.g. "vllm==0.33.0" "trl[vllm]"')
    p.add_argument("--uv", default="uv", help="the uv executable")
    p.add_argument("--python", default=sys.executable, help="the interpreter to resolve for (default: this one)")
    p.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"))
    args = p.parse_args(argv)
    failed = 0
    for stack in args.stacks:
        alone, err = resolve(args.uv, args.python, stack)
        if alone is None:
            print(f"coinstall: {stack}: does not resolve even alone:\n{err}", file=sys.stderr)
            failed += 1
            continue
        together, err = resolve(args.uv, args.python, stack, args.pyproject)
        if together is None:
            print(f"coinstall: {stack} + lightning-ctx: no solution:\n{err}", file=sys.stderr)
            failed += 1
            continue
        moved = check(stack, alone, together)
        own = canonicalize_name(Requirement(stack).name)
        shown = ", ".join(f"{n} {together[n]}" for n in dict.fromkeys((own, *GUARDED)) if n in together)
        if moved:
            print(f"coinstall: {stack} + lightning-ctx resolves only by moving {'; '.join(moved)}", file=sys.stderr)
            failed += 1
        else:
            print(f"coinstall: {stack} + lightning-ctx: ok ({shown})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
