"""One CLI: ``lightning-ctx --help`` lists every command; every command the README uses answers ``--help`` with its
flags, defaults and plain-text descriptions; and neither that nor a short fit prints a warning or third-party noise.

The commands run in a subprocess exactly as from a shell (``sys.argv`` set, ``main()`` without arguments), which is
how LightningCLI's "args parameter" warning used to appear on every call.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ctx.cli.app import DESCRIPTIONS, EXTRA_COMMANDS, ContextCLI, top_level_help
from lightning_ctx.console import plain_text

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("fit", "validate", "test", "compare", "export", "extract", "pretrain-world")
# what used to come with every call (issue #22): our warning, Lightning's and torch's notices, tqdm redraws
NOISE = ("LightningCLI's args parameter", "litlogger", "module(s) in eval mode", "LeafSpec", "Total FLOPs",
         "Loading weights", "Creating initial MLflow database")

# a warning as Python (file.py:N: ...Warning), logging (WARNING ...) or we (warning: ...) print one
WARNING_LINE = re.compile(r"\.py:\d+: |\bWARNING\b|^\s*\w*(Warning|warning):")

# Runs each command line (a JSON list of argv lists) as a shell would, printing a marker, the exit code and the output.
RUNNER = """
import contextlib, io, json, sys
from lightning_ctx.cli import main
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = ["lightning-ctx", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
    print("@@@", json.dumps(argv), code)
    print(out.getvalue())
"""


def _run(commands, cwd, env=None):
    import os

    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = re.split(r"^@@@ (.*) (\d+)$", proc.stdout, flags=re.M)
    results = {tuple(json.loads(parts[i])): (int(parts[i + 1]), parts[i + 2]) for i in range(1, len(parts), 3)}
    return results, proc.stderr


def _readme_commands() -> list[str]:
    """The subcommands the README and docs/ run: in ```bash blocks and in `inline code` (not in prose or printed
    errors)."""
    from tests.helpers import documentation_text

    text = documentation_text()
    code = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    code += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    # (?!...): `docker run ... lightning-ctx lightning-ctx ui` names the image first
    return sorted(set(re.findall(r"lightning-ctx (?!lightning-ctx)([a-z][a-z-]*)", "\n".join(code))))


def test_top_level_help_lists_every_command_once():
    text = top_level_help()
    registered = [*ContextCLI.subcommands(), *EXTRA_COMMANDS]
    assert "predict" not in registered
    for name in (*REQUIRED, *registered):
        line = next((ln for ln in text.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None, name
        assert DESCRIPTIONS.get(name), f"{name} has no one-line description"
    assert {"fit", "compare", "export", "ui"} <= set(_readme_commands()) <= set(registered)  # none that is missing


def test_plain_text_removes_markup():
    assert plain_text("the ``save_pretrained`` folder of :class:`~lightning_ctx.export.ModelExport`") == \
        "the save_pretrained folder of ModelExport"
    assert plain_text(":func:`lightning_ctx.tracking.open_store` see `docs <https://x.y>`_ .. warning:: careful") == \
        "lightning_ctx.tracking.open_store see docs careful"


def test_every_readme_command_answers_help_without_noise(tmp_path):
    commands = [["--help"]] + [[c, "--help"] for c in _readme_commands() + ["export", "ui"]]
    results, stderr = _run(commands, tmp_path)
    assert not stderr.strip(), stderr
    for argv, (code, out) in results.items():
        assert code == 0, (argv, out[-2000:])
        assert "usage: lightning-ctx" in out, argv
        assert not [ln for ln in out.splitlines() if WARNING_LINE.search(ln)], argv
        assert not any(n in out for n in NOISE), argv
        assert "``" not in out and ":class:" not in out and ".. warning::" not in out, argv
    for name in (*_readme_commands(), "export"):
        out = results[(name, "--help")][1]
        assert "default" in out, name  # flags show their defaults
    assert not list(tmp_path.iterdir())  # --help writes nothing (no ./mlruns)


@pytest.mark.slow  # fits in a subprocess
def test_short_fit_prints_progress_lines_and_a_summary_without_warnings(tmp_path, mlflow_template_db):
    import shutil

    from mlflow.tracking import MlflowClient

    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_template_db, tmp_path / "mlruns" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    fit = ["fit", "--config", str(REPO / "experiments" / "world_opd.yaml"), "--trainer.max_steps", "4",
           "--data.batch_size", "8", "--data.task.n_val", "20",
           "--data.task.eval_other_contexts", "2", "--data.task.eval_other_items", "5"]
    results, stderr = _run([fit], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    code, out = results[tuple(fit)]
    assert code == 0, out[-3000:]
    text = out + stderr
    assert not [ln for ln in text.splitlines() if re.search(r"warn", ln, re.I)], text[-3000:]
    assert not any(n in text for n in NOISE) and "\r" not in text, text[-3000:]
    # the progress: one short line per step here (4 steps), with the loss and an ETA until the last
    steps = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/4", "2/4", "3/4", "4/4"] and "ETA" in steps[0], steps
    assert "epoch" not in "\n".join(steps)
    # the summary names the run that holds these results and shows its final metrics as MLflow has them
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("world").experiment_id])[0]
    summary = text[text.index("fit done"):]
    assert f"MLflow run   {run.info.run_id} (world-opd), experiment 'world'" in summary
    assert f"harm {run.data.metrics['eval/harm']:.3f}" in summary or "harm nan" in summary
    assert f"acc_ctx {run.data.metrics['eval/acc_ctx']:.3f}" in summary
    assert f"ctx_kl {run.data.metrics['eval/ctx_kl']:.3f}" in summary
    assert "lightning-ctx compare --experiment world" in summary and "lightning-ctx ui" in summary
    assert f"lightning-ctx export --run-id {run.info.run_id}" in summary
