"""2-process DDP (gloo, CPU) runs through ``python -m lightning_ctx.cli fit`` with the default MLflow logger.

Three runs of the same config (sampled rollouts, shuffled data, the evaluation callback on a few items): an
uninterrupted one, one stopped at step ``STOP`` and its resumption with ``--ckpt_path last``. 11 records, 2
per rank: each rank gets 6 (one padded) per epoch = 3 steps, so the stop is mid-epoch and the resumption
crosses an epoch boundary. Checked: the run logs once (rank 0 only: one MLflow run, one value per metric and
step, the artifacts), and the resumed run continues the same MLflow run with exactly the uninterrupted
run's per-step losses -- which needs each rank's own data position *and* its own sampling RNG state.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import make_records

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, STOP = 7, 4


def _args(student, train, val, root, max_steps):
    return ["fit", "--seed_everything", "7", "--model.student", student, "--model.max_new_tokens", "4",
            "--model.anchor_weight", "0.5", "--model.rollout_warmup", "false", "--data.task.train_file", train,
            "--data.task.val_file", val, "--data.batch_size", "2", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", str(max_steps), "--checkpoint.every_n_train_steps",
            "2", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0",
            "--trainer.callbacks+=lightning_ctx.eval.ContextRemovabilityCallback",
            "--trainer.callbacks.every_n_steps", "0", "--trainer.callbacks.max_items", "4",
            "--trainer.callbacks.progress", "false"]


def _launch(args, workdir):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlruns/mlflow.db"}
    return subprocess.Popen([sys.executable, "-m", "lightning_ctx.cli", *args], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc, timeout=240) -> str | None:
    """None when the run succeeded, else the end of its stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # rank 0 and the rank it launched
        return f"DDP run hung: {proc.communicate()[1][-3000:]}"
    return None if proc.returncode == 0 else err[-4000:]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_dirs, mlflow_template_db):
    import shutil

    tmp = tmp_path_factory.mktemp("ddp_cli")
    train, val = tmp / "train.jsonl", tmp / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_records(11)))
    val.write_text("".join(json.dumps(r) + "\n" for r in make_records(4, seed=5, prefix="v")))
    dirs = {name: tmp / name for name in ("ref", "resumed")}
    for d in dirs.values():
        (d / "mlruns").mkdir(parents=True)
        shutil.copy(mlflow_template_db, d / "mlruns" / "mlflow.db")
    student = tiny_dirs["qwen2"]

    def args(name, steps):
        return _args(student, str(train), str(val), dirs[name] / "root", steps)
    ref = _launch(args("ref", MAX_STEPS), dirs["ref"])
    errors = {"resumed": _finish(_launch(args("resumed", STOP), dirs["resumed"]))}
    if errors["resumed"] is None:
        errors["resumed"] = _finish(_launch(args("resumed", MAX_STEPS) + ["--ckpt_path", "last"], dirs["resumed"]))
    errors["ref"] = _finish(ref)
    return dirs, errors


def _runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _history(client, run, key):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


@pytest.mark.slow  # fits in subprocesses
def test_ddp_fit_logs_once_to_mlflow(ddp_runs):
    dirs, errors = ddp_runs
    assert errors["ref"] is None, errors["ref"]
    client, runs = _runs(dirs["ref"])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["cfg/trainer.devices"] == "2"
    assert not any(k.startswith("resumed/") for k in run.data.params)
    loss = _history(client, run, "train/loss")
    assert [s for s, _ in loss] == list(range(MAX_STEPS)), "one train/loss per step, from rank 0 only"
    assert [s for s, _ in _history(client, run, "eval/acc_ctx")] == [0, MAX_STEPS]
    assert [s for s, _ in _history(client, run, "ref/initial_acc_no_ctx")] == [0]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval"} <= top and not any(p.startswith("config_resumed") for p in top)
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/step_000000", f"eval/step_{MAX_STEPS:06d}"} <= evals


@pytest.mark.slow  # fits in subprocesses
def test_ddp_resume_matches_uninterrupted(ddp_runs):
    dirs, errors = ddp_runs
    assert errors["ref"] is None and errors["resumed"] is None, errors
    ref_client, ref_runs = _runs(dirs["ref"])
    client, runs = _runs(dirs["resumed"])
    assert len(runs) == 1, "resuming must continue the MLflow run, not create a second one"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert "config.yaml" in artifacts and any(p.startswith("config_resumed_step") for p in artifacts)
    ref_loss = dict(_history(ref_client, ref_runs[0], "train/loss"))
    loss = _history(client, runs[0], "train/loss")
    assert [s for s, _ in loss] == list(range(MAX_STEPS))
    assert len(set(ref_loss.values())) == MAX_STEPS  # the steps differ, so a shifted data position would show
    for step, value in loss:
        assert value == ref_loss[step], (step, value, ref_loss[step])


class PoisonOneRank(pl.Callback):
    """Makes rank 1's anchor term NaN at step 1 only; each rank writes what it skipped and its final weights."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def setup(self, trainer, pl_module, stage):
        real = pl_module.compute_losses

        def poisoned(*args, **kwargs):
            out = real(*args, **kwargs)
            if trainer.global_rank == 1 and trainer.global_step == 1:
                out["anchor"] = out["anchor"] * float("nan")
                out["loss"] = out["opd"] + out["anchor"]
            return out
        pl_module.compute_losses = poisoned

    def on_train_end(self, trainer, pl_module):
        import torch

        weights = torch.cat([p.detach().flatten() for p in pl_module.student.parameters()])
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"skipped": pl_module.skipped_steps, "step": trainer.global_step, "checksum": float(weights.sum()),
             "norm": float(weights.norm())}))


@pytest.mark.slow  # fits in subprocesses
def test_ddp_ranks_skip_nonfinite_steps_together(tmp_path, tiny_dirs, jsonl_file):
    """``on_nonfinite: skip`` where one rank alone sees a NaN: every rank skips that step (no rank waits forever
    in the gradient all-reduce) and the replicas stay identical."""
    train = jsonl_file(make_records(8))
    args = ["fit", "--seed_everything", "0", "--model.student", tiny_dirs["qwen2"], "--model.max_new_tokens", "4",
            "--model.anchor_weight", "0.5", "--model.on_nonfinite", "skip", "--model.rollout_warmup", "false",
            "--data.task.train_file", train, "--data.batch_size", "2", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--trainer.logger",
            "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks+=tests.test_ddp_cli.PoisonOneRank", f"--trainer.callbacks.out_dir={tmp_path}"]
    error = _finish(_launch(args, tmp_path), timeout=150)
    assert error is None, error
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["norm"] == ranks[1]["norm"]
