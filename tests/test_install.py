"""Installation: the Makefile's install stamp, the lock, the lower-bounds constraints and the version tags."""

from __future__ import annotations

import json
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


def _fake_uv(tmp_path, resolution: str, rc: int = 0, fail_with_pyproject: bool = False) -> Path:
    """A stand-in for uv: logs its arguments and the contents of its ``-c`` files, prints ``resolution``."""
    uv = tmp_path / "uv"
    uv.write_text(f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[1:]
constraints = [pathlib.Path(args[i + 1]).read_text() for i, a in enumerate(args) if a in ("-c", "--constraint")]
ins = [pathlib.Path(a).read_text() for a in args if a.endswith(".in")]
with open({str(tmp_path / "uv.log")!r}, "a") as fh:
    fh.write(json.dumps({{"args": args, "constraints": constraints, "ins": ins}}) + "\\n")
if {fail_with_pyproject!r} and any(a.endswith("pyproject.toml") for a in args):
    sys.stderr.write("No solution found when resolving dependencies")
    sys.exit(1)
sys.stdout.write({resolution!r})
sys.exit({rc})
""")
    uv.chmod(0o755)
    return uv


def _uv_calls(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "uv.log").read_text().splitlines()]


def _run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True)


def _floors(extras=("dev",)) -> dict[str, str]:
    out = {}
    for req in _declared(extras):
        if _norm(req.name) != "torch":
            (spec,) = [s for s in req.specifier if s.operator == ">="]
            out[_norm(req.name)] = spec.version
    return out


# ------------------------------------------------------------------------------------------- lower bounds


def test_min_constraints_are_uvs_lowest_direct_resolution_with_the_installed_torch(tmp_path):
    resolution = "".join(f"{name}=={v}\n" for name, v in _floors(("dev", "lora")).items())
    resolution += "torch==2.13.0+cpu\nnumpy==2.4.6\n"  # + what the floors pull in
    uv = _fake_uv(tmp_path, resolution)
    proc = _run_script("min_constraints.py", "--uv", str(uv), "--extras", "dev,lora", "--torch", "2.13.0+cpu",
                       "--find-links", "/wheels")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("#") and proc.stdout.endswith(resolution)
    (call,) = _uv_calls(tmp_path)
    args = " ".join(call["args"])
    assert args.startswith("pip compile ") and str(ROOT / "pyproject.toml") in args
    assert "--resolution lowest-direct" in args and "--extra dev --extra lora" in args
    assert "--find-links /wheels" in args and call["constraints"] == ["torch==2.13.0+cpu\n"]


def test_min_constraints_fail_when_a_declared_floor_does_not_resolve(tmp_path):
    floors = _floors()
    floors["matplotlib"] = "3.8.4.post1"  # uv reached a higher matplotlib than the floor pyproject.toml declares
    uv = _fake_uv(tmp_path, "".join(f"{n}=={v}\n" for n, v in floors.items() if n != "mlflow"))
    proc = _run_script("min_constraints.py", "--uv", str(uv), "--torch", "2.13.0")
    assert proc.returncode == 1 and proc.stdout == ""
    declared = _floors()["matplotlib"]
    assert f"matplotlib: declared >={declared}, lowest that resolves with the other floors: 3.8.4.post1" in proc.stderr
    assert f"mlflow: declared >={_floors()['mlflow']}, lowest that resolves with the other floors: none" in proc.stderr
    assert "lightning:" not in proc.stderr  # at its floor


def test_min_constraints_pass_on_uvs_error_and_refuse_a_dependency_without_lower_bound(tmp_path):
    proc = _run_script("min_constraints.py", "--uv", str(_fake_uv(tmp_path, "", rc=2)), "--torch", "2.13.0")
    assert proc.returncode == 1 and "uv pip compile failed" in proc.stderr
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.13", "numpy"]\n')
    proc = _run_script("min_constraints.py", "--pyproject", str(bad), "--extras", "", "--torch", "2.13.0",
                       "--uv", str(_fake_uv(tmp_path, "numpy==2.0.0\n")))
    assert proc.returncode == 1 and "'numpy' declares no lower bound" in proc.stderr


def test_every_dependency_declares_a_lower_bound_and_torch_matches_the_makefile_pin():
    for req in _declared(("dev", "lora", "quant")):
        assert any(s.operator == ">=" for s in req.specifier), f"{req} has no lower bound"
    makefile = (ROOT / "Makefile").read_text()
    (torch_pin,) = re.findall(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    (torch_req,) = [r for r in _declared(()) if r.name == "torch"]
    assert torch_req.specifier.contains(torch_pin)


# ------------------------------------------------------------------------------------------ co-install


def test_coinstall_passes_when_adding_us_moves_nothing_the_stack_chose(tmp_path):
    resolution = "vllm==0.33.0\ntorch==2.14.0\ntransformers==5.20.2\nnumpy==2.3.5\n"
    proc = _run_script("coinstall.py", "--uv", str(_fake_uv(tmp_path, resolution)), "vllm==0.33.0", "trl[vllm]")
    assert proc.returncode == 0, proc.stderr
    assert "vllm==0.33.0 + lightning-ctx: ok (vllm 0.33.0, torch 2.14.0, transformers 5.20.2)" in proc.stdout
    calls = _uv_calls(tmp_path)
    assert [c["ins"] for c in calls] == [["vllm==0.33.0\n"]] * 2 + [["trl[vllm]\n"]] * 2
    with_us = [c for c in calls if str(ROOT / "pyproject.toml") in c["args"]]
    assert len(with_us) == 2 and all(c["args"][:2] == ["pip", "compile"] for c in calls)


def test_coinstall_fails_without_a_solution_or_when_the_stack_moves(tmp_path):
    proc = _run_script("coinstall.py", "--uv", str(_fake_uv(tmp_path, "vllm==0.33.0\n", fail_with_pyproject=True)),
                       "vllm==0.33.0")
    assert proc.returncode == 1 and "vllm==0.33.0 + lightning-ctx: no solution" in proc.stderr

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import coinstall
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    alone = {"trl": "1.16.0", "vllm": "0.31.0", "transformers": "5.17.0", "torch": "2.13.0", "numpy": "2.3.5"}
    fallback = {**alone, "vllm": "0.30.0", "transformers": "5.24.0", "numpy": "2.4.6"}  # numpy may move
    assert coinstall.check("trl[vllm]", alone, fallback) == ["transformers 5.17.0 -> 5.24.0", "vllm 0.31.0 -> 0.30.0"]
    assert coinstall.check("trl[vllm]", alone, {**alone, "numpy": "2.4.6", "mlflow": "3.17.2"}) == []
    assert coinstall.check("trl[vllm]", alone, {k: v for k, v in alone.items() if k != "trl"}) == [
        "trl 1.16.0 -> absent"]


# ------------------------------------------------------------------------------------------------- lock


def test_lock_satisfies_pyproject_and_pins_torch_like_the_makefile():
    pins = _lock()
    for req in _declared(("dev",)):
        name = _norm(req.name)
        assert name in pins, f"{name} missing from {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} outside {req}"
    assert "lightning-ctx" not in pins
    cuda_only = sorted(n for n in pins if n.startswith("nvidia-") or n == "triton")
    assert not cuda_only, f"the lock was resolved against a CUDA torch build: {cuda_only}"
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
    # The Makefile's defaults, not an outer make's flags or overrides (`make test-min VENV=...` exports VENV)
    overridable = set(re.findall(r"^(\w+) \?=", (ROOT / "Makefile").read_text(), re.M))
    env = {k: v for k, v in os.environ.items() if k not in overridable | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    proc = subprocess.run(["make", "-n", *args], cwd=make_dir, capture_output=True, text=True, env=env)
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


@pytest.mark.parametrize("target", ["test-min", "test-compat"])
def test_scratch_venvs_take_torch_from_pip_and_pin_it_for_uv(make_dir, target):
    (make_dir / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "min_constraints.py", make_dir / "scripts")
    venv = {"test-min": ".venv-min", "test-compat": ".venv-compat"}[target]
    lines = _dry(make_dir, target).splitlines()
    torch_by_pip = lines.index(f'{venv}/bin/python -m pip install "torch==2.13.0"')
    (uv_install,) = [i for i, line in enumerate(lines) if " pip install --python " in line]
    assert torch_by_pip < uv_install and f"-c {venv}/constraints.txt -e '.[dev]'" in lines[uv_install]
    (writes_constraints,) = [line for line in lines if f"> {venv}/constraints.txt" in line]
    if target == "test-min":  # uv resolves around the torch pip installed, exactly (local label included)
        assert f"--torch \"$({venv}/bin/python -c 'from importlib.metadata import version" in writes_constraints
    else:  # the lock (torch pinned in it), transformers replaced
        assert "grep -v -i '^transformers==' requirements/lock.txt" in writes_constraints
        assert re.search(r'echo "transformers==5\.20\.\d+"', writes_constraints)


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
