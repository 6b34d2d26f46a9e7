"""DDP with 2 CPU processes (gloo) through ``lightning-ctx fit`` vs one process with the same global batch.

What is comparable: sampling is made deterministic (``greedy_rollout``), and the single process is fed,
step by step, the records the DDP ranks were given (Lightning's distributed sampler decides that), so both
setups score the same responses. The loss is a per-token mean over the *global* batch, while DDP averages
per-rank gradients; the two agree only if each rank rescales its per-token mean by
``n_local * world / n_global`` (``OnPolicyDistillation._token_scale``). The checkpoint's EOS set is chosen
so the two ranks get different numbers of response tokens (checked): without the rescaling the DDP
gradient and the logged loss differ from the single-process ones (verified by disabling it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import make_records

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 6


class GradProbe(pl.Callback):
    """Writes, per step, the synced ``train/loss``, each rank's response-token count and (rank 0) the grads."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        rank = trainer.global_rank
        if rank == 0:
            # After the optimizer step the gradients are still there (zeroed at the next step's start): all-reduced
            # by DDP and rescaled to the per-token mean by the module's on_before_optimizer_step, which runs after
            # the callbacks' (so a callback's on_before_optimizer_step sees per-token sums / world size).
            grads = {n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}
            torch.save(grads, self.out / f"grads_step{step}.pt")
        (self.out / f"tokens_step{step}_rank{rank}.json").write_text(json.dumps(pl_module._last_tokens))
        (self.out / f"ids_step{step}_rank{rank}.json").write_text(json.dumps(list(batch.ids)))
        if rank == 0:
            loss = float(trainer.callback_metrics["train/loss"])
            (self.out / f"loss_step{step}.json").write_text(json.dumps(loss))


def _checkpoint_with_uneven_eos(tmp_path, records):
    """A tiny checkpoint with an extra EOS id that makes the greedy response lengths of the records vary.

    Which records land on which rank is the (distributed) sampler's business, so the EOS is chosen to give
    as many distinct lengths as possible; the test then checks that the ranks' token counts really differed.
    """
    from lightning_ctx.data.batches import PairCollator
    from lightning_ctx.data.records import TaskRecord
    from lightning_ctx.data.render import PromptRenderer
    from lightning_ctx.models.tiny import save_tiny_checkpoint
    from lightning_ctx.module import OnPolicyDistillation
    from lightning_ctx.rollout import response_mask_from_ids

    path = save_tiny_checkpoint(tmp_path / "ddp_tiny", "qwen2", seed=1)
    module = OnPolicyDistillation(student=str(path), greedy_rollout=True, max_new_tokens=MAX_NEW)
    batch = PairCollator(PromptRenderer(module.tokenizer), module.pad_token_id)(
        [TaskRecord.from_dict(r) for r in records])
    resp = module.sample(batch.prompt_ids, batch.prompt_mask).response_ids
    eos = module.tokenizer.eos_token_id
    best, best_distinct = None, 1
    for tok in sorted(set(resp.flatten().tolist()) - {eos, module.pad_token_id}):
        _, lengths, _ = response_mask_from_ids(resp, [eos, tok])
        distinct = len(set(lengths.tolist()))
        if distinct > best_distinct:
            best, best_distinct = tok, distinct
    assert best is not None, "no token makes the greedy response lengths differ (tiny model changed?)"
    module.student.generation_config.eos_token_id = [eos, best]
    module.student.generation_config.save_pretrained(path)
    return str(path)


def _fit_args(path, train, out, devices, batch_size):
    args = ["fit", "--seed_everything", "0", "--model.student", path, "--model.greedy_rollout", "true",
            "--model.max_new_tokens", str(MAX_NEW), "--model.anchor_weight", "0.5", "--model.lr", "1e-2",
            "--model.rollout_warmup", "false", "--data.task.train_file", train, "--data.batch_size", str(batch_size),
            "--data.shuffle", "false", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.callbacks+=tests.test_ddp.GradProbe",
            f"--trainer.callbacks.out_dir={out}"]
    return args + (["--trainer.strategy", "ddp"] if devices > 1 else [])


def _read(out, name):
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, jsonl_file):
    from lightning_ctx.cli import main

    records = make_records(8, context="ADD2")
    path = _checkpoint_with_uneven_eos(tmp_path, records)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lightning_ctx.cli",
                           *_fit_args(path, jsonl_file(records), ddp, devices=2, batch_size=2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the precondition that makes the comparison meaningful: the ranks saw different token counts
    counts = [_read(ddp, f"tokens_step0_rank{r}.json") for r in (0, 1)]
    assert counts[0] != counts[1], counts
    # one process, same global batches: the records each DDP step used (rank 0's, then rank 1's)
    order = [i for step in (0, 1) for r in (0, 1) for i in _read(ddp, f"ids_step{step}_rank{r}.json")]
    assert sorted(order) == sorted(r["id"] for r in records)
    by_id = {r["id"]: r for r in records}
    single = tmp_path / "single"
    single.mkdir()
    main(_fit_args(path, jsonl_file([by_id[i] for i in order], "single.jsonl"), single, devices=1, batch_size=4))
    assert _read(single, "ids_step0_rank0.json") == order[:4]
    assert _read(single, "tokens_step0_rank0.json") == sum(counts)

    for step in (0, 1):  # step 1 is scored after one optimizer step: the updates agreed too
        assert _read(ddp, f"loss_step{step}.json") == pytest.approx(_read(single, f"loss_step{step}.json"),
                                                                     rel=1e-5), step
    g1, g2 = torch.load(single / "grads_step0.pt"), torch.load(ddp / "grads_step0.pt")
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:  # float32 rounding: the per-token sums are rescaled once (max |grad| here is ~0.4)
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)
