"""``notebooks/quickstart.ipynb`` runs top to bottom in this environment's kernel, in the README's regime and store, and
states nothing it does not compute: its markdown cites no number that its outputs or the shipped config do not show,
and its printed verdicts agree with the runs as MLflow has them."""

import math
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def regime():
    """The regime of ``builtin:world.yaml`` as the command builds it (whatever the config's layout)."""
    from lightning_ctx.cli import ContextCLI

    cli = ContextCLI(args=["--config", "builtin:world.yaml", "--trainer.logger", "false"], run=False)
    return {"max_steps": cli.trainer.max_steps, "batch_size": cli.datamodule.batch_size,
            "lr": cli.model.hparams.lr,
            "every": next(cb.every_n_steps for cb in cli.trainer.callbacks if hasattr(cb, "every_n_steps"))}


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o:
                out.append(o["data"].get("text/plain", ""))
    return "\n".join(out)


def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def check_markdown_numbers(markdown: str, outputs: str, regime: dict) -> list[str]:
    """What the markdown claims that neither the outputs nor the regime of ``builtin:world.yaml`` back. Numbers in
    backticks are settings the code uses (``anchor_weight=0.5``), not results."""
    prose = re.sub(r"`[^`]*`", "", markdown)
    wrong = [f"{x} (not in the outputs)" for x in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose)
             if x not in outputs]
    claims = {r"\b(\d+) steps\b": regime["max_steps"], r"\bbatch (?:of )?(\d+)\b": regime["batch_size"],
              r"\blr (\d[\d.e-]*)": regime["lr"]}
    for pattern, value in claims.items():
        wrong += [f"{m.group(0)} (the config says {value})" for m in re.finditer(pattern, markdown)
                  if float(m.group(1)) != float(value)]
    return wrong


def test_the_markdown_check_catches_what_the_old_notebook_said():
    regime = {"max_steps": 100, "batch_size": 64, "lr": 1e-4}
    old = ("`make demo`: 150 steps of batch 64 per run; the design prototype saw harm 0.33 and 0.19; "
           "lr 1e-3 for a short run")
    assert check_markdown_numbers(old, outputs="harm 0.780", regime=regime) == [
        "0.33 (not in the outputs)", "0.19 (not in the outputs)", "150 steps (the config says 100)",
        "lr 1e-3 (the config says 0.0001)"]
    assert check_markdown_numbers("100 steps of batch 64, lr 1e-4; harm 0.780; `anchor_weight=0.5`",
                                  outputs="harm 0.780", regime=regime) == []


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch, mlflow_template_db, regime):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from mlflow.tracking import MlflowClient

    from lightning_ctx.tasks.world.model import WORLD_BASE_DIR

    assert (WORLD_BASE_DIR / "config.json").exists(), f"the shipped world base is missing: {WORLD_BASE_DIR}"
    # A checkout stand-in: the notebook runs in <root>/notebooks and must track into <root>/mlruns, the store of the
    # README's commands (no MLFLOW_TRACKING_URI), and export into <root>/exports.
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "mlruns").mkdir()
    shutil.copy(mlflow_template_db, root / "mlruns" / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=1200,
                                     resources={"metadata": {"path": str(root / "notebooks")}})
    client.execute()

    text = _text_outputs(nb)
    # the kernel is this environment's interpreter (the venv), not some other python3 on the machine
    assert f"prefix: {sys.prefix}" in text, text[:500]
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no plot"
    assert f"{regime['max_steps']} steps of batch {regime['batch_size']}, lr {regime['lr']}" in text
    wrong = check_markdown_numbers(_markdown(nb), text, regime)
    assert not wrong, wrong
    assert not [line for line in text.splitlines() if "Warning" in line], text[:2000]  # no notices in the outputs
    assert not (root / "notebooks" / "mlruns").exists()

    ml = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = ml.search_runs([ml.get_experiment_by_name("quickstart").experiment_id])
    by_weight = {float(r.data.params["cfg/model.anchor_weight"]): r for r in runs}
    assert sorted(by_weight) == [0.0, 0.5]
    for run in runs:
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert float(run.data.params["cfg/model.lr"]) == regime["lr"]
        for key in ("eval/acc_no_ctx", "eval/acc_ctx", "ref/teacher_acc_ctx"):
            assert 0.0 <= m[key] <= 1.0, key
        assert math.isfinite(m["train/loss"])
        steps = [p.step for p in ml.get_metric_history(run.info.run_id, "eval/acc_ctx")]
        assert steps == list(range(0, regime["max_steps"] + 1, regime["every"]))  # step 0, every N, the end
    # the printed statements are the runs' own numbers
    for label, weight in (("OPD", 0.0), ("anchored", 0.5)):
        m = by_weight[weight].data.metrics
        assert (f"{label}: acc_no_ctx {m['eval/acc_no_ctx']:.3f}, acc_ctx {m['eval/acc_ctx']:.3f}, "
                f"harm {m['eval/harm']:.3f}") in text, label
    opd, anchored = by_weight[0.0].data.metrics["eval/harm"], by_weight[0.5].data.metrics["eval/harm"]
    verdict = "removed" if opd > 0 and anchored == 0 else "reduced" if anchored < opd else "did not reduce"
    assert f"The anchored term {verdict}" in text
    assert (root / "exports" / "quickstart-anchored-SHOW" / "model.safetensors").exists()
