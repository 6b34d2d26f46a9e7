"""A task plugs in at one place: a ``Task`` subclass in a package of its own, named by class path in the config.

The task below lives in a temporary package outside ``lightning_ctx`` (nothing of ours is edited or registered): its
records, its own verifier (with ``parse_answer``), other contexts for the retention metric and for the retention
term, and a knob with its range. It fits through the CLI on a tiny model; the run's metrics are read from MLflow.
"""

import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main

TOY = '''
"""Reverse the digits when the context says REV; the answer is checked ignoring spaces."""

from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import Task
from lightning_ctx.knobs import at_least, check_class_args


JUDGED = []  # (response, answer) of every call: which verifier judged the evaluation


class SpacelessVerifier:
    def parse_answer(self, answer):
        digits = "".join(answer.split())
        return digits if digits.isdigit() else None

    def __call__(self, response, answer):
        JUDGED.append((response, answer))
        return "".join(response.split()) == self.parse_answer(answer)


class ReverseTask(Task):
    """Args:
        n_items: records per split.
        bad_line: 1-based train line whose answer the verifier cannot read (0 = none).
    """

    KNOB_CHECKS = (at_least("n_items", 1),)

    def __init__(self, n_items: int = 8, bad_line: int = 0):
        check_class_args(ReverseTask, locals(), "data.task.")
        self.n_items, self.bad_line = n_items, bad_line
        self.verifier = SpacelessVerifier()

    def _records(self, split, context):
        out = []
        for i in range(self.n_items):
            digits = [str((7 * i + 3 * k + len(split)) % 10) for k in range(3)]
            answer = " ".join(reversed(digits)) if context == "REV" else " ".join(digits)
            if split == "train" and i + 1 == self.bad_line:
                answer = "not digits"
            out.append(TaskRecord(f"{split}-{context}-{i}", context, " ".join(digits), answer))
        return out

    def load(self, split):
        return self._records(split, "REV") if split in ("train", "val") else None

    def source(self, split):
        return f"reverse:{split}"

    def eval_other_records(self, split):
        return self._records(split, "SHOW")

    def retain_others(self, train):
        return ["SHOW", "ADD1"]
'''

FAST = ["--model.max_new_tokens", "4", "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def toy_package(outside_package):
    return outside_package("toytasks", TOY) + ".ReverseTask"


def _config(tmp_path, class_path: str) -> Path:
    path = tmp_path / "reverse.yaml"
    path.write_text(f"data:\n  task:\n    class_path: {class_path}\n    init_args:\n      n_items: 8\n"
                    "  batch_size: 4\n"
                    "trainer:\n  callbacks+:\n    - class_path: lightning_ctx.eval.ContextRemovabilityCallback\n"
                    "      init_args: {every_n_steps: 0, eval_at_start: false, progress: false}\n")
    return path


@pytest.mark.slow
def test_a_task_from_outside_the_package_fits_through_the_cli(toy_package, tiny_dirs, tmp_path, mlflow_uri):
    config = _config(tmp_path, toy_package)
    main(["fit", "--config", str(config), "--model.student", tiny_dirs["qwen2"], "--model.anchor_weight", "0.5",
          "--model.retain_weight", "0.5", "--data.retain_others", "true", *FAST])
    (run,) = mlflow.search_runs(experiment_names=["lightning-ctx"], output_format="list")
    m, params = run.data.metrics, run.data.params
    assert params["cfg/data.task.class_path"] == toy_package and params["cfg/data.task.init_args.n_items"] == "8"
    for name in ("train/loss", "train/opd", "train/anchor", "train/retain"):  # retain: the task's other contexts
        assert name in m and math.isfinite(m[name]), name
    client = MlflowClient(mlflow_uri)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    for name in ("eval/acc_no_ctx", "eval/acc_ctx", "eval/other_ctx_acc"):  # other_ctx_acc: eval_other_records
        assert 0.0 <= m[name] <= 1.0, name
    # the evaluation read the answers with the task's own verifier: every item without and with the context, and
    # the other contexts' items
    from toytasks import JUDGED, ReverseTask, SpacelessVerifier

    judged = {answer for _, answer in JUDGED}
    task = ReverseTask(n_items=8)
    assert {r.answer for r in task.load("val") + task.eval_other_records("val")} <= judged

    steps = sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval") if a.is_dir)
    table = json.loads(Path(client.download_artifacts(run.info.run_id, f"{steps[-1]}/examples.json")).read_text())
    examples = table["examples"]
    assert len(examples) == 8 and all(e["context"] == "REV" for e in examples)
    verify = SpacelessVerifier()  # the table's flags are its verdicts
    assert all(e["correct_ctx"] == verify(e["response_ctx"], e["answer"]) for e in examples)


def test_a_task_from_outside_the_package_is_checked_like_ours(toy_package, tiny_dirs, tmp_path, mlflow_uri,
                                                              capsys):
    """Its knob ranges before any model loads (file and line, or the command line), its records against its verifier
    before training (source, line and field)."""
    config = _config(tmp_path, toy_package)

    def error(*extra) -> str:
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(config), "--model.student", tiny_dirs["qwen2"], *FAST, *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("lightning-ctx")]
        return line

    assert "command line, field 'data.task.n_items': must be >= 1, got 0" in error("--data.task.n_items", "0")
    config.write_text(config.read_text().replace("n_items: 8", "n_items: -1"))
    assert f"{config}, line 5, field 'data.task.n_items'" in error()
    config.write_text(config.read_text().replace("n_items: -1", "n_items: 8"))
    line = error("--data.task.bad_line", "3")
    assert "reverse:train, line 3, field 'answer'" in line and "cannot parse answer 'not digits'" in line
    assert not mlflow.search_runs(experiment_names=["lightning-ctx"], output_format="list")
