"""``notebooks/quickstart.ipynb`` runs top to bottom in this environment's kernel and logs what it shows."""

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o:
                out.append(o["data"].get("text/plain", ""))
    return "\n".join(out)


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, mlflow_uri):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from lightning_ctx.tasks.world.model import WORLD_BASE_DIR

    assert (WORLD_BASE_DIR / "config.json").exists(), f"the shipped world base is missing: {WORLD_BASE_DIR}"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment (MLFLOW_TRACKING_URI of the mlflow_uri fixture) and
    # runs in tmp_path, so the notebook's ./mlruns and downloads stay out of the repository.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = _text_outputs(nb)
    # the kernel is this environment's interpreter (the venv), not some other python3 on the machine
    assert f"prefix: {sys.prefix}" in text, text[:500]
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no plot"
    assert "OPD" in text and "anchored" in text

    from mlflow.tracking import MlflowClient

    ml = MlflowClient(mlflow_uri)
    exp = ml.get_experiment_by_name("quickstart")
    runs = ml.search_runs([exp.experiment_id])
    assert sorted(float(r.data.params["anchor_weight"]) for r in runs) == [0.0, 0.5]
    for run in runs:
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        for key in ("eval/acc_no_ctx", "eval/acc_ctx", "ref/teacher_acc_ctx"):
            assert 0.0 <= m[key] <= 1.0, key
        assert math.isfinite(m["train/loss"])
        steps = [p.step for p in ml.get_metric_history(run.info.run_id, "eval/acc_ctx")]
        assert steps[0] == 0 and len(steps) >= 3  # step 0, periodic and final evaluations: the plotted curves
