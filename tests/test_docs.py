"""The documentation stays true: knobs, generated reference, commands the README tells users to run."""

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
REFERENCE = REPO / "docs" / "config_reference.md"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


def test_every_model_knob_is_documented(generator):
    printed = generator.printed_config()
    docs = README.read_text() + REFERENCE.read_text()
    missing = [k for k in printed["model"] if f"`model.{k}`" not in docs]
    assert not missing, f"undocumented model knobs {missing}: run python scripts/gen_config_reference.py"
    missing = [k for k in printed["data"] if k != "task" and f"`data.{k}`" not in docs]
    assert not missing, f"undocumented data knobs {missing}: run python scripts/gen_config_reference.py"


def test_the_reference_covers_every_task_and_every_callback(generator):
    """A task or an evaluation callback added to the package without a section in the reference fails here."""
    from lightning.pytorch import Callback

    from lightning_ctx.data.task import Task
    from lightning_ctx.knobs import bound_args

    listed = {generator.canonical(path) for path, _ in generator.TASKS}
    bases = {generator.canonical(path) for path in generator.TASK_BASES}
    assert generator.package_subclasses(Task) - bases == listed
    listed = {generator.canonical(path) for path, *_ in generator.CALLBACKS}
    cli = {generator.canonical(path) for path in (*generator.CLI_CALLBACKS, *generator.CALLBACK_BASES)}
    assert {c for c in generator.package_subclasses(Callback)} - cli == listed
    reference = REFERENCE.read_text()
    for path, _ in generator.TASKS:  # every knob of every task, with a meaning
        for knob in bound_args(generator.resolve(path), {}):
            row = next((ln for ln in reference.splitlines() if ln.startswith(f"| `data.task.init_args.{knob}` ")), "")
            assert row and not row.endswith("|  |"), (path, knob)


def test_config_reference_is_current(generator):
    assert REFERENCE.read_text(encoding="utf-8") == generator.render(), \
        "docs/config_reference.md is stale: run python scripts/gen_config_reference.py"


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


def test_readme_make_commands_exist():
    from tests.helpers import documentation_text

    assert {"demo", "test"} <= set(re.findall(r"\bmake ([a-z][a-z0-9_-]*)", README.read_text()))
    used = set(re.findall(r"\bmake ([a-z][a-z0-9_-]*)", documentation_text()))
    missing = used - _makefile_targets()
    assert not missing, f"README mentions make targets the Makefile lacks: {sorted(missing)}"


def test_readme_paths_and_modules_exist():
    from tests.helpers import documentation_text

    text = documentation_text()
    pattern = r"\b((?:experiments|notebooks|scripts|docs|benchmarks)/[\w./-]+\.(?:yaml|ipynb|py|md|jsonl|txt))"
    for path in set(re.findall(pattern, text)):
        assert (REPO / path).exists(), f"README mentions {path}, which does not exist"
    for module in set(re.findall(r"python -m ([\w.]+)", text)):
        if module.split(".")[0] in ("lightning_ctx", "benchmarks"):
            assert importlib.util.find_spec(module) is not None, f"README runs python -m {module}, which is missing"


def test_nothing_cites_a_design_file_outside_the_repo():
    """Code and docs cite docs/design.md; the steering DESIGN.md outside the repository is not shipped."""
    offenders = []
    for path in [*REPO.glob("lightning_ctx/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("*.md"),
                 *REPO.glob("docs/*.md"), *REPO.glob("notebooks/*.ipynb"), *REPO.glob("experiments/**/*.yaml")]:
        text = path.read_text(encoding="utf-8")
        if re.search(r"\bDESIGN(\.md| §| section)", text) and path.name != "test_docs.py":
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
    assert (REPO / "docs" / "design.md").exists()


# Repository paths as docs and docstrings name them: a top-level folder we ship, then a path to a file or folder.
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:lightning_ctx|experiments|notebooks|scripts|docs|benchmarks|tests"
                       r"|requirements)/[\w./<>*{}-]*[\w/>*}])")
DESIGN_SECTION = re.compile(r'docs/design\.md,?\s+"([^"]+)"')


def _doc_sources() -> list[Path]:
    return [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("lightning_ctx/**/*.py"),
            *REPO.glob("lightning_ctx/**/*.yaml"), *REPO.glob("experiments/**/*.yaml"), *REPO.glob("benchmarks/*.py"),
            *REPO.glob("scripts/*.py")]


def named_paths(text: str) -> set[str]:
    """Repository paths named in ``text`` (placeholders such as ``<task>`` or globs are skipped)."""
    return {p.rstrip("/.") for p in REPO_PATH.findall(text) if not re.search(r"[<>*{}]|\.\.\.", p)}


def test_named_paths_are_found_and_placeholders_skipped():  # the check below must be able to fail
    text = ("see lightning_ctx/loss.py, `docs/design.md`, experiments/paper/base/, lightning_ctx/tasks/<task>/ and "
            "experiments/paper/game_*.yaml.")
    assert named_paths(text) == {"lightning_ctx/loss.py", "docs/design.md", "experiments/paper/base"}


def test_every_repo_path_named_in_docs_and_docstrings_exists():
    missing = {}
    for source in _doc_sources():
        for path in named_paths(source.read_text(encoding="utf-8")):
            # a path may be written relative to the repository or to the package (lightning_ctx/configs/...)
            if not (REPO / path).exists() and not (REPO / "lightning_ctx" / path).exists():
                missing.setdefault(str(source.relative_to(REPO)), []).append(path)
    assert not missing, f"paths that do not exist: {missing}"


def test_every_cited_design_section_is_a_heading():
    headings = set(re.findall(r"^#+\s+(.+?)\s*$", (REPO / "docs" / "design.md").read_text(), flags=re.M))
    cited = {}
    for source in _doc_sources():
        for section in DESIGN_SECTION.findall(source.read_text(encoding="utf-8")):
            if section not in headings:
                cited.setdefault(section, []).append(str(source.relative_to(REPO)))
    assert not cited, f"cited design-doc sections that are not headings of docs/design.md: {cited}"
