"""Interrupted runs resume exactly, from their own checkpoints (#26.1, #26.3).

One uninterrupted reference fit; against it: a run killed with SIGKILL while another run (other name, other loss
weights) is started from the same folder, then resumed with ``--ckpt_path last``; and a run stopped by SIGTERM
(preemption), which must save a checkpoint of the step it stopped at, exit 143 and resume exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import make_records

MAX_STEPS = 24


def _args(student, train, root, *extra):
    return ["fit", "--model.student", student, "--data.task.train_file", train, "--data.batch_size", "3",
            "--model.max_new_tokens", "5", "--trainer.max_steps", str(MAX_STEPS), "--checkpoint.every_n_train_steps",
            "4", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--seed_everything", "7", "--model.anchor_weight", "0.5",
            *extra]


def _uri(workdir):
    return f"sqlite:///{workdir}/mlruns/mlflow.db"


def _cli(args, workdir):
    code = "import torch, sys; torch.set_num_threads(1); from lightning_ctx.cli import main; main(sys.argv[1:])"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MLFLOW_TRACKING_URI=_uri(workdir))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    err = proc.communicate(timeout=timeout)[1]
    return proc.returncode, err


def _runs(workdir):
    client = MlflowClient(_uri(workdir))
    return {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def _losses(workdir, run):
    return {m.step: m.value for m in MlflowClient(_uri(workdir)).get_metric_history(run.info.run_id, "train/loss")}


def _load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _wait_for(pattern_dir: Path, proc, what="last.ckpt"):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(pattern_dir.glob(f"*/{what}")) if pattern_dir.is_dir() else []
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {what} under {pattern_dir} before the run ended (exit {proc.poll()})")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dirs, mlflow_template_db):
    """Training data, a fresh store per work folder, and the uninterrupted reference run (started in the
    background; ``reference()`` waits for it)."""
    import shutil

    tmp = tmp_path_factory.mktemp("resume")
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_records(20)))

    def workdir(name):
        d = tmp / name
        (d / "mlruns").mkdir(parents=True)
        shutil.copy(mlflow_template_db, d / "mlruns" / "mlflow.db")
        return d

    ref_dir = workdir("ref")
    ref = _cli(_args(tiny_dirs["llama"], str(train), ref_dir / "root"), ref_dir)
    result = {}

    def reference():
        if not result:
            code, err = _finish(ref)
            assert code == 0, err[-3000:]
            (run,) = _runs(ref_dir).values()
            (folder,) = (ref_dir / "root" / "checkpoints").iterdir()
            result.update(loss=_losses(ref_dir, run), ckpt=_load(folder / "last.ckpt"))
        return result
    return lambda *extra, root: _args(tiny_dirs["llama"], str(train), root, *extra), workdir, reference


def _assert_matches_reference(loss, ckpt, ref, resumed_from, every_step_logged=True):
    """``every_step_logged``: False after a SIGKILL, which can land between a step's checkpoint and its metrics."""
    assert ckpt["global_step"] == ref["ckpt"]["global_step"] == MAX_STEPS
    assert sorted(ref["loss"]) == list(range(MAX_STEPS))
    expected = set(range(MAX_STEPS)) if every_step_logged else set(range(resumed_from, MAX_STEPS))
    assert expected <= set(loss) <= set(range(MAX_STEPS))
    assert len(set(ref["loss"].values())) == MAX_STEPS  # the steps differ, so a shifted data position would show
    for step in range(resumed_from, MAX_STEPS):  # every step after the resume point matches exactly
        assert loss[step] == ref["loss"][step], step
    for key, value in ref["ckpt"]["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=0)


@pytest.mark.slow  # fits in subprocesses
def test_killed_run_resumes_from_its_own_checkpoint_beside_another_run(setup):
    """The issue's sequence: run A killed (SIGKILL) after its first checkpoint; run B (another name, another anchor
    weight) trains in the same folder; ``--ckpt_path last`` with A's command resumes A from A's weights, into A's
    MLflow run, and leaves B's files alone."""
    args, workdir, reference = setup
    work = workdir("killed")
    root, ckpts = work / "root", work / "root" / "checkpoints"

    victim = _cli(args(root=root), work)
    last_a = _wait_for(ckpts, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _load(last_a)["global_step"]
    assert 0 < killed_at < MAX_STEPS

    code, err = _finish(_cli(args("--trainer.max_steps", "6", "--model.anchor_weight", "0.0",
                                  "--trainer.logger.init_args.run_name", "B", root=root), work))
    assert code == 0, err[-3000:]
    (folder_b,) = [p for p in ckpts.iterdir() if p != last_a.parent]
    files_b = {p.name: p.read_bytes() for p in folder_b.iterdir()}

    code, err = _finish(_cli(args("--ckpt_path", "last", root=root), work))
    assert code == 0, err[-3000:]
    runs = _runs(work)
    assert len(runs) == 2, "resuming must continue run A's MLflow run, not create a third one"
    run_a = next(r for name, r in runs.items() if name != "B")
    assert last_a.parent.name == run_a.info.run_id and folder_b.name == runs["B"].info.run_id
    weights = {k: v for k, v in run_a.data.params.items() if k.endswith("anchor_weight")}
    assert weights and set(weights.values()) == {"0.5"}, weights  # B's 0.0 never reached run A
    assert {p.name: p.read_bytes() for p in folder_b.iterdir()} == files_b, "run B's checkpoints were touched"
    _assert_matches_reference(_losses(work, run_a), _load(last_a), reference(), killed_at, False)


@pytest.mark.slow  # fits in subprocesses
def test_sigterm_saves_the_step_it_stopped_at_exits_143_and_resumes_exactly(setup):
    args, workdir, reference = setup
    work = workdir("sigterm")
    root, ckpts = work / "root", work / "root" / "checkpoints"

    victim = _cli(args(root=root), work)
    last = _wait_for(ckpts, victim)
    victim.send_signal(signal.SIGTERM)
    code, err = _finish(victim)
    assert code == 143, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("lightning-ctx")]
    assert "SIGTERM" in line and str(last) in line and "--ckpt_path last" in line and "Traceback" not in err
    (run,) = _runs(work).values()
    assert run.info.status == "KILLED"
    stopped_at = _load(last)["global_step"]
    assert 0 < stopped_at < MAX_STEPS
    # the checkpoint holds every step the run trained: nothing logged after it
    assert max(_losses(work, run)) == stopped_at - 1

    code, err = _finish(_cli(args("--ckpt_path", "last", root=root), work))
    assert code == 0, err[-3000:]
    (run,) = _runs(work).values()
    assert run.info.status == "FINISHED"
    _assert_matches_reference(_losses(work, run), _load(last), reference(), stopped_at)


def test_each_rank_restores_its_own_rng_states():
    from lightning_ctx.checkpointing import RNG_KEY, RNG_PER_RANK_KEY, rng_states_for_rank

    ckpt = {RNG_KEY: "r0", RNG_PER_RANK_KEY: ["r0", "r1"]}
    assert [rng_states_for_rank(ckpt, r, 2)[0] for r in (0, 1)] == ["r0", "r1"]
    states, why = rng_states_for_rank(ckpt, 0, 3)  # another number of ranks: none restored, and said so
    assert states is None and "2 rank(s) and 3" in why
    assert rng_states_for_rank({RNG_KEY: "old"}, 0, 1) == ("old", "")  # a checkpoint from before per-rank states
    assert rng_states_for_rank({RNG_KEY: "old"}, 1, 2)[0] is None
