"""FSDP on GPUs (Lightning refuses FSDP on a CPU): the code paths that differ from DDP.

Skipped without CUDA; written for the next time a GPU machine is available. Compared with DDP on the same
devices and records (greedy rollouts, ``accumulate_grad_batches: 2`` so the per-token rescaling of sharded
gradients over micro-batches and ranks is exercised): the same per-step losses, so the same updates. With
several GPUs the evaluation callback must refuse sharded weights with a clear error instead of hanging.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_records
from tests.test_ddp import MAX_NEW, _checkpoint_with_uneven_eos

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA (Lightning refuses it on CPU)")]


def _run(path, train, out, strategy, devices, extra=()):
    out.mkdir()
    args = ["fit", "--seed_everything", "0", "--model.student", path, "--model.greedy_rollout", "true",
            "--model.max_new_tokens", str(MAX_NEW), "--model.anchor_weight", "0.5", "--model.lr", "1e-2",
            "--model.rollout_warmup", "false", "--data.task.train_file", train, "--data.batch_size", "2",
            "--data.shuffle", "false", "--trainer.accelerator", "gpu", "--trainer.devices", str(devices),
            "--trainer.strategy", strategy, "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "2",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.callbacks+=tests.test_ddp.GradProbe",
            f"--trainer.callbacks.out_dir={out}", *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "lightning_ctx.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)


def test_fsdp_steps_match_ddp(tmp_path, jsonl_file):
    devices = min(2, torch.cuda.device_count())
    records = make_records(16, context="ADD2")
    path = _checkpoint_with_uneven_eos(tmp_path, records)
    train = jsonl_file(records)
    losses = {}
    for strategy in ("ddp", "fsdp"):
        proc = _run(path, train, tmp_path / strategy, strategy, devices)
        assert proc.returncode == 0, proc.stderr[-4000:]
        losses[strategy] = [json.loads((tmp_path / strategy / f"loss_step{s}.json").read_text()) for s in (0, 1)]
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sharding needs two GPUs")
def test_evaluation_callback_refuses_sharded_weights(tmp_path, jsonl_file):
    records = make_records(8, context="ADD2")
    path = _checkpoint_with_uneven_eos(tmp_path, records)
    proc = _run(path, jsonl_file(records), tmp_path / "fsdp", "fsdp", 2,
                extra=["--data.task.val_file", jsonl_file(records, "val.jsonl"),
                       "--trainer.callbacks+=lightning_ctx.eval.ContextRemovabilityCallback"])
    assert proc.returncode == 2 and "does not run with weights sharded over ranks" in proc.stderr, proc.stderr[-3000:]
