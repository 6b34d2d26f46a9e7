"""``--ckpt_path`` without a fit: which checkpoint ``last`` means, files that are not checkpoints, ``--model.*`` values
that differ from the checkpoint's, and a failed resume leaving its run's status alone (#26.1, #26.2, #26.6, #26.11)."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lightning_ctx.checkpointing import RUN_INFO, RUN_KEY, find_resumable, load_checkpoint_meta
from lightning_ctx.cli import main
from lightning_ctx.cli.resume import merge_model_config
from lightning_ctx.errors import DataError


def _checkpoint(path: Path, step=3, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": step, **extra}, path)
    return path


def _run_folder(root: Path, run_id: str, run_name, experiment="lightning-ctx", age=0.0, seed=None) -> Path:
    import os

    last = _checkpoint(root / run_id / "last.ckpt", **{RUN_KEY: {"run_id": run_id, "run_name": run_name}})
    (root / run_id / RUN_INFO).write_text(json.dumps({"run_id": run_id, "run_name": run_name,
                                                      "experiment": experiment, "seed": seed}))
    os.utime(last, (1e9 + age, 1e9 + age))
    return last


def test_last_is_the_newest_checkpoint_of_the_same_run_name_and_experiment(tmp_path):
    a_old = _run_folder(tmp_path, "a1", None, age=1)
    a_new = _run_folder(tmp_path, "a2", None, age=2)
    _run_folder(tmp_path, "b", "B", age=3)  # newer, but another run name
    _run_folder(tmp_path, "c", None, experiment="other", age=4)  # newer, but another experiment
    found = find_resumable(tmp_path, None, "lightning-ctx")
    assert found.path == a_new and found.others == [a_old] and found.identity.run_id == "a2"
    assert find_resumable(tmp_path, "B", "lightning-ctx").path == tmp_path / "b" / "last.ckpt"
    assert find_resumable(tmp_path, "nobody", None).path is None
    s1 = _run_folder(tmp_path, "s1", "sweep", seed=1, age=5)  # a seed sweep under one run name: each its own run
    _run_folder(tmp_path, "s2", "sweep", seed=2, age=6)
    assert find_resumable(tmp_path, "sweep", None, seed=1).path == s1
    assert find_resumable(tmp_path, "sweep", None).path == tmp_path / "s2" / "last.ckpt"  # seed unknown: newest
    _checkpoint(tmp_path / "last.ckpt")  # written before per-run folders: not taken, but named
    assert find_resumable(tmp_path, "nobody", None).legacy == tmp_path / "last.ckpt"


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    (lambda p: p.write_bytes(b"\x00\x01junk" * 100), "not a checkpoint file"),
    (lambda p: p.write_text("trainer:\n  max_steps: 3\n"), "not a checkpoint file"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_bytes(_checkpoint(p.with_suffix(".full")).read_bytes()[:1500]), "truncated or damaged"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a Lightning checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_error_naming_it(tmp_path, make, why):
    bad = tmp_path / "last.ckpt"
    make(bad)
    with pytest.raises(DataError) as info:
        load_checkpoint_meta(bad)
    assert str(bad) in str(info.value) and why in str(info.value)


def test_a_damaged_checkpoint_names_the_newest_readable_one_beside_it(tmp_path):
    good = _checkpoint(tmp_path / "step000004.ckpt")
    (tmp_path / "last.ckpt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"--ckpt_path {good}"):
        load_checkpoint_meta(tmp_path / "last.ckpt")


SAVED = {"student": "a", "lr": 1e-4, "anchor_weight": 0.0, "on_nonfinite": "raise", "max_new_tokens": 8,
         "_instantiator": "x"}


def test_resume_applies_the_knobs_that_may_change_and_keeps_the_rest():
    current = dict(SAVED, lr=0.01, anchor_weight=0.5, on_nonfinite="skip", max_new_tokens=99)
    argv = ["fit", "--model.lr", "0.01", "--model.anchor_weight=0.5", "--model.on_nonfinite", "skip"]
    merged, changes = merge_model_config(SAVED, current, argv, Path("x.ckpt"))
    # max_new_tokens differs only because this command's config default differs: the run's own value is kept
    assert merged == {"student": "a", "lr": 0.01, "anchor_weight": 0.5, "on_nonfinite": "skip", "max_new_tokens": 8}
    assert changes == ["model.lr=0.01 (was 0.0001)", "model.anchor_weight=0.5 (was 0.0)",
                       "model.on_nonfinite='skip' (was 'raise')"]


def test_resume_refuses_other_settings_naming_each():
    current = dict(SAVED, student="b", max_new_tokens=99, lr=0.01)
    argv = ["fit", "--model.student", "b", "--model.max_new_tokens", "99", "--model.lr", "0.01"]
    with pytest.raises(DataError) as info:
        merge_model_config(SAVED, current, argv, Path("x.ckpt"))
    text = str(info.value)
    assert "model.student is 'b' here but 'a'" in text and "model.max_new_tokens is 99 here but 8" in text
    assert "model.lr" not in text.split(". Drop")[0]  # an adjustable knob is no conflict


def test_apply_learning_rate_sets_the_schedule_base_and_keeps_its_position():
    from types import SimpleNamespace

    from lightning_ctx.module import OnPolicyDistillation
    from lightning_ctx.optim import build_optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    built = build_optimizer([param], "adamw", 1e-3, 0.0, 4, 20, "cosine", 0.0)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    factor = scheduler.get_last_lr()[0] / 1e-3
    module = SimpleNamespace(hparams=SimpleNamespace(lr=5e-2),
                             trainer=SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)]))
    OnPolicyDistillation._apply_learning_rate(module)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-2 * factor, rel=1e-12)
    scheduler.step()  # the schedule goes on from its position, scaled to the new base
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-2 * scheduler.lr_lambdas[0](7), rel=1e-12)


def test_a_failed_resume_before_its_first_step_leaves_the_run_status(mlflow_uri):
    from lightning_ctx.tracking import MLflowLogger

    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("e"))
    client.set_terminated(run.info.run_id, "FINISHED")
    for progressed, end, status in ((False, "failed", "FINISHED"), (False, "killed", "FINISHED"),
                                    (True, "failed", "FAILED"), (True, "killed", "KILLED")):
        logger = MLflowLogger(experiment_name="e", tracking_uri=mlflow_uri)
        logger.continue_run(run.info.run_id, progressed=lambda p=progressed: p)
        assert logger.experiment.get_run(logger.run_id).info.run_id == run.info.run_id  # opened, as a fit does
        logger.end_killed() if end == "killed" else logger.finalize("failed")
        assert client.get_run(run.info.run_id).info.status == status, (progressed, end)


def _fit(*args):
    main(["fit", "--model.student", "builtin:world", "--trainer.max_steps", "1", *args])


def _one_line(capsys, code=2):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("lightning-ctx")]
    return line


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_text("a: 1\n"), "not a checkpoint file"),
])
def test_fit_with_a_bad_ckpt_path_is_one_line(tmp_path, mlflow_uri, capsys, make, why):
    bad = tmp_path / "x.ckpt"
    make(bad)
    with pytest.raises(SystemExit) as info:
        _fit("--ckpt_path", str(bad))
    line = _one_line(capsys)
    assert info.value.code == 2 and str(bad) in line and why in line


@pytest.mark.parametrize("deleted", [False, True])
def test_a_checkpoint_whose_run_is_not_in_the_store_is_one_line(tmp_path, mlflow_uri, capsys, deleted):
    client = MlflowClient(mlflow_uri)
    run_id = "0123456789abcdef0123456789abcdef"
    if deleted:
        run_id = client.create_run(client.create_experiment("e")).info.run_id
        client.delete_run(run_id)
    ckpt = _checkpoint(tmp_path / "c.ckpt", mlflow_run_id=run_id)
    with pytest.raises(SystemExit) as info:
        _fit("--config", "builtin:world.yaml", "--ckpt_path", str(ckpt))
    line = _one_line(capsys)
    assert info.value.code == 2 and run_id in line
    assert ("was deleted" in line and "mlflow runs restore" in line) if deleted else "is not in the store" in line


@pytest.mark.slow
def test_a_refused_resume_leaves_the_finished_run_alone(tiny_dirs, jsonl_file, mlflow_uri, capsys):
    """The issue's sequence 2: a finished run, then the same command with more steps, --ckpt_path last and a student
    of another shape: one line naming the conflict, exit 2, and the run still FINISHED (compare keeps it)."""
    from tests.helpers import make_records

    args = ["fit", "--model.student", tiny_dirs["qwen2"], "--data.task.train_file", jsonl_file(make_records(6)),
            "--data.batch_size", "2", "--model.max_new_tokens", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--checkpoint.every_n_train_steps", "1"]
    main([*args, "--trainer.max_steps", "2"])
    capsys.readouterr()
    other = list(args)
    other[other.index("--model.student") + 1] = tiny_dirs["llama"]
    with pytest.raises(SystemExit) as info:
        main([*other, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    line = _one_line(capsys)
    assert info.value.code == 2 and f"model.student is '{tiny_dirs['llama']}' here but '{tiny_dirs['qwen2']}'" in line
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] is not None


def test_sigterm_inside_gradient_accumulation_waits_for_the_step_boundary():
    """A SIGTERM during the first of 3 accumulated micro-batches reaches Lightning (which stops after the hook) only
    after the third, so the step's gradients are applied and the checkpoint is a step boundary."""
    from types import SimpleNamespace

    from lightning_ctx.checkpointing import RunCheckpoint

    keeper = RunCheckpoint()
    # the last micro-batch of step 1 (a step boundary), then micro-batches 1-3 of step 2 (the 3rd completes it)
    accumulating = iter([False, True, True, False])
    connector = SimpleNamespace(received_sigterm=False)
    epoch_loop = SimpleNamespace(_should_accumulate=lambda: next(accumulating))
    trainer = SimpleNamespace(_signal_connector=connector, fit_loop=SimpleNamespace(epoch_loop=epoch_loop))
    seen = []
    for signal_now in (False, True, False, False):  # the signal arrives during the 1st micro-batch of step 2
        connector.received_sigterm = connector.received_sigterm or signal_now
        keeper.hold_sigterm_until_step_boundary(trainer)
        seen.append(connector.received_sigterm)
    assert seen == [False, False, False, True]


def test_a_resumed_run_re_logging_its_params_records_only_real_changes(mlflow_uri):
    """Values over MLflow's 250 stored characters (an experience text) compare as stored: no spurious
    ``resumed/`` copy; a changed weight is kept under ``resumed/<name>`` (what compare reads)."""
    from lightning_ctx.tracking import MLflowLogger

    first = MLflowLogger(experiment_name="e", tracking_uri=mlflow_uri)
    long_text = "note " * 100
    first.log_hyperparams({"experience": long_text, "anchor_weight": 0.0})
    resumed = MLflowLogger(experiment_name="e", tracking_uri=mlflow_uri)
    resumed.continue_run(first.run_id)
    resumed.log_hyperparams({"experience": long_text, "anchor_weight": 0.5})
    params = MlflowClient(mlflow_uri).get_run(first.run_id).data.params
    assert params["anchor_weight"] == "0.0" and params["resumed/anchor_weight"] == "0.5"
    assert "resumed/experience" not in params
