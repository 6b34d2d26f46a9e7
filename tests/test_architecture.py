"""The layout of docs/design.md holds: no import cycles, pure layers stay pure, and state stays with its owner (no
module-level function that takes the LightningModule as its first argument: such code is a method)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_ctx"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, at top level or inside functions (lazy imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # ``from pkg import sub`` depends on the submodule; on the package itself only for names it defines
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = subs + ([base] if any(t not in known for t in subs) else [])
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():  # the check above must be able to fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer, forbidden", [
    ("lightning_ctx.objectives", ("lightning", "transformers", "lightning_ctx.data", "lightning_ctx.models")),
    ("lightning_ctx.tasks.world.rules", ("lightning", "torch", "transformers")),
    ("lightning_ctx.tasks.frozenlake.rules", ("lightning", "torch", "transformers")),
    ("lightning_ctx.tasks.mcqa.convert", ("lightning", "torch", "transformers")),
    ("lightning_ctx.errors", ("lightning", "torch")),
    ("lightning_ctx.data", ("lightning_ctx.tasks", "lightning_ctx.module", "lightning_ctx.eval")),
])
def test_pure_layers_import_nothing_heavier(layer, forbidden):
    for name, path in _modules().items():
        if name != layer and not name.startswith(layer + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]  # lazy registry imports allowed
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        bad = [m for m in names if any(m == f or m.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{name} imports {bad}"


def _module_first_functions(source: str) -> list[str]:
    """Module-level functions whose first parameter is the LightningModule (named ``pl_module``, or annotated as a
    LightningModule / OnPolicyDistillation): code that belongs in the module's class, where its state is."""
    found = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.args.args:
            continue
        first = node.args.args[0]
        annotation = ast.unparse(first.annotation) if first.annotation is not None else ""
        if first.arg == "pl_module" or "LightningModule" in annotation or "OnPolicyDistillation" in annotation:
            found.append(node.name)
    return found


def test_no_function_takes_the_lightning_module_as_its_first_argument():
    bad = [f"{name}.{fn}" for name, path in _modules().items()
           for fn in _module_first_functions(path.read_text(encoding="utf-8"))]
    assert not bad, bad


def test_the_module_first_check_can_fail():
    source = ("def log_terms(module: pl.LightningModule, stage): ...\n"
              "def warm(pl_module): ...\n"
              "def fine(model, pl_module): ...\n"
              "class A:\n    def method(self, pl_module): ...\n")
    assert _module_first_functions(source) == ["log_terms", "warm"]
