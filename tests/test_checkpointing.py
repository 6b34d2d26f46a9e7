"""A run killed with SIGKILL and resumed with ``--ckpt_path last`` ends exactly like an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import make_records

MAX_STEPS = 24


def _args(student, train, root):
    return ["fit", "--model.student", student, "--data.task.train_file", train, "--data.batch_size", "3",
            "--model.max_new_tokens", "5", "--trainer.max_steps", str(MAX_STEPS), "--checkpoint.every_n_train_steps",
            "4", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--seed_everything", "7", "--model.anchor_weight", "0.5"]


def _env(workdir):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlruns/mlflow.db")


def _cli(args, workdir, **kw):
    code = "import torch, sys; torch.set_num_threads(1); from lightning_ctx.cli import main; main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=workdir, env=_env(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _final_state(workdir):
    uri = f"sqlite:///{workdir}/mlruns/mlflow.db"
    runs = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    history = MlflowClient(uri).get_metric_history(runs[0].info.run_id, "train/loss")
    ckpt = torch.load(workdir / "root" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    return runs, {m.step: m.value for m in history}, ckpt


@pytest.mark.slow  # fits in subprocesses
def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_dirs, mlflow_template_db):
    import json
    import shutil

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_records(20)))
    student = tiny_dirs["llama"]

    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    for d in (ref_dir, kill_dir):
        (d / "mlruns").mkdir(parents=True)
        shutil.copy(mlflow_template_db, d / "mlruns" / "mlflow.db")
    ref = _cli(_args(student, str(train), ref_dir / "root"), ref_dir)

    victim = _cli(_args(student, str(train), kill_dir / "root"), kill_dir)
    ckpt_dir = kill_dir / "root" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt_dir / "last.ckpt").exists() and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 0 < killed_at < MAX_STEPS

    resumed = _cli(_args(student, str(train), kill_dir / "root") + ["--ckpt_path", "last"], kill_dir)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]

    ref_runs, ref_loss, ref_ckpt = _final_state(ref_dir)
    runs, loss, ckpt = _final_state(kill_dir)
    assert len(runs) == 1, "resuming must continue the MLflow run, not create a second one"
    assert ckpt["global_step"] == ref_ckpt["global_step"] == MAX_STEPS
    assert max(loss) == max(ref_loss)
    for step in range(killed_at, MAX_STEPS):  # every step after the resume point matches exactly
        assert loss[step] == ref_loss[step], step
    for key, value in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=0)


def test_each_rank_restores_its_own_rng_states():
    from lightning_ctx.checkpointing import RNG_KEY, RNG_PER_RANK_KEY, rng_states_for_rank

    ckpt = {RNG_KEY: "r0", RNG_PER_RANK_KEY: ["r0", "r1"]}
    assert [rng_states_for_rank(ckpt, r, 2)[0] for r in (0, 1)] == ["r0", "r1"]
    states, why = rng_states_for_rank(ckpt, 0, 3)  # another number of ranks: none restored, and said so
    assert states is None and "2 rank(s) and 3" in why
    assert rng_states_for_rank({RNG_KEY: "old"}, 0, 1) == ("old", "")  # a checkpoint from before per-rank states
    assert rng_states_for_rank({RNG_KEY: "old"}, 1, 2)[0] is None
