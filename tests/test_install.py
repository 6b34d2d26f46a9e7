"""Installation: the Makefile's install stamp, the lock, the lower-bounds constraints and the version tags."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK = ROOT / "requirements" / "lock.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extras=("dev",)) -> list[Requirement]:
    reqs = list(PYPROJECT["dependencies"])
    for extra in extras:
        reqs += PYPROJECT["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver and " " not in line, f"lock line is not name==version: {line!r}"
            pins[_norm(name)] = ver
    return pins


def _min_constraints(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "min_constraints.py"), *args],
                          capture_output=True, text=True)


# ------------------------------------------------------------------------------------------- lower bounds


def test_min_constraints_pin_every_declared_lower_bound():
    proc = _min_constraints("--extras", "dev,lora,quant", "--skip", "torch")
    assert proc.returncode == 0, proc.stderr
    pins = dict(line.split("==") for line in proc.stdout.splitlines() if not line.startswith("#"))
    expected = {}
    for req in _declared(("dev", "lora", "quant")):
        if _norm(req.name) == "torch":
            continue
        (spec,) = [s for s in req.specifier if s.operator == ">="]
        expected[_norm(req.name)] = spec.version
    assert pins == expected


def test_min_constraints_refuse_a_dependency_without_lower_bound(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.13", "numpy"]\n')
    proc = _min_constraints("--pyproject", str(bad), "--extras", "")
    assert proc.returncode == 1 and "'numpy' declares no lower bound" in proc.stderr


def test_every_dependency_declares_a_lower_bound_and_torch_matches_the_makefile_pin():
    for req in _declared(("dev", "lora", "quant")):
        assert any(s.operator == ">=" for s in req.specifier), f"{req} has no lower bound"
    makefile = (ROOT / "Makefile").read_text()
    (torch_pin,) = re.findall(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    (torch_req,) = [r for r in _declared(()) if r.name == "torch"]
    assert torch_req.specifier.contains(torch_pin)


# ------------------------------------------------------------------------------------------------- lock


def test_lock_satisfies_pyproject_and_pins_torch_like_the_makefile():
    pins = _lock()
    for req in _declared(("dev",)):
        name = _norm(req.name)
        assert name in pins, f"{name} missing from {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} outside {req}"
    assert "lightning-ctx" not in pins
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= torch=={pins['torch']}" in makefile  # no local label (+cpu): CUDA builds match too


# --------------------------------------------------------------------------------------- Makefile stamp


@pytest.fixture
def make_dir(tmp_path):
    """A copy of the Makefile and its inputs, with a fake venv, for ``make -n`` (prints, runs nothing)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    for rel in ("Makefile", "pyproject.toml", "requirements/lock.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text("")
    old = 1_000_000_000
    for rel in ("Makefile", "pyproject.toml", "requirements/lock.txt", ".venv/bin/python"):
        os.utime(tmp_path / rel, (old, old))
    return tmp_path


def _dry(make_dir, *args) -> str:
    proc = subprocess.run(["make", "-n", *args], cwd=make_dir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return re.sub(r" +", " ", proc.stdout)


@pytest.mark.parametrize("target", ["test", "bench"])  # demo: tests/test_install_min.py
def test_targets_install_until_the_stamp_is_newer_than_pyproject_makefile_and_lock(make_dir, target):
    out = _dry(make_dir, target)
    assert "pip install -c requirements/lock.txt \"torch==" in out  # torch first, pinned, locked
    assert "pip install -c requirements/lock.txt -e '.[dev]'" in out
    assert out.index("torch==") < out.index("-e '.[dev]'")
    assert "import lightning_ctx" not in out  # never decides "installed?" by importing (the repo root imports)

    stamp = make_dir / ".venv" / ".installed"
    stamp.write_text("")
    os.utime(stamp, (2_000_000_000, 2_000_000_000))
    assert "pip install" not in _dry(make_dir, target)
    for rel in ("pyproject.toml", "Makefile", "requirements/lock.txt"):
        os.utime(make_dir / rel, (3_000_000_000, 3_000_000_000))
        assert "pip install" in _dry(make_dir, target), f"a newer {rel} must re-install"
        os.utime(make_dir / rel, (1_000_000_000, 1_000_000_000))


def test_install_without_the_lock(make_dir):
    out = _dry(make_dir, "install", "LOCK=")
    assert "-c " not in out and "pip install -e '.[dev]'" in out and 'pip install "torch==' in out


# ----------------------------------------------------------------------------------- version tags in runs


def test_runs_record_library_versions_as_tags(mlflow_uri):
    from mlflow import MlflowClient

    from lightning_ctx.tracking import VERSION_PACKAGES, MLflowLogger, installed_versions

    logger = MLflowLogger(experiment_name="versions")
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    tags = MlflowClient(mlflow_uri).get_run(logger.run_id).data.tags
    expected = installed_versions()
    assert expected["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in ("torch", "lightning", "transformers", "mlflow", "torchmetrics", "peft", "bitsandbytes",
                 "lightning-ctx"):
        assert name in VERSION_PACKAGES
        assert tags[f"version/{name}"] == version(name) == expected[name]
    assert tags["version/python"] == expected["python"]


def test_resumed_run_keeps_its_versions_and_records_changed_ones(mlflow_uri):
    from mlflow import MlflowClient

    from lightning_ctx.tracking import MLflowLogger

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("resumed")
    rid = client.create_run(exp, tags={"version/torch": "2.12.0"}).info.run_id
    logger = MLflowLogger(experiment_name="resumed")
    logger.continue_run(rid)
    logger.log_metrics({"x": 1.0}, step=0)
    tags = client.get_run(rid).data.tags
    assert tags["version/torch"] == "2.12.0"  # what the run started with
    assert tags["resumed/version/torch"] == version("torch")
    assert tags["version/transformers"] == version("transformers")  # missing before: added


def test_version_tags_are_rank_zero_only(mlflow_uri, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only
    from mlflow import MlflowClient

    from lightning_ctx.tracking import MLflowLogger

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = MLflowLogger(experiment_name="rank1")
    logger.experiment.set_tag("anything", "x")  # a dummy on rank 1: no run, no tags
    assert MlflowClient(mlflow_uri).get_experiment_by_name("rank1") is None
