"""The training data position: ``ResumableSampler`` sharded over ranks and ``_draws_done`` from the global step.

A run resumed at any optimizer step must see, on every rank, exactly the batches the uninterrupted run saw
from that step on (same number of ranks, batch size and accumulation).
"""

from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

from lightning_ctx.data.datamodule import ResumableSampler, TaskDataModule
from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.task import Task


def _batches(sampler, batch_size, epochs):
    """Per epoch, this rank's batches of draw numbers (the DataLoader's grouping, drop_last=False)."""
    out = []
    for _ in range(epochs):
        draws = list(sampler)
        out.append([draws[i:i + batch_size] for i in range(0, len(draws), batch_size)])
    return out


def _dm(n, batch_size, world, global_step, accumulate=1):
    dm = TaskDataModule(Task(), batch_size=batch_size)
    dm.splits["train"] = [TaskRecord(str(i), "C", "p", "a") for i in range(n)]
    trainer = SimpleNamespace(global_step=global_step, accumulate_grad_batches=accumulate, world_size=world,
                              global_rank=0)
    dm.trainer = trainer
    return dm, trainer


@pytest.mark.parametrize("n,batch_size,world,accumulate", [(11, 2, 2, 1), (40, 4, 2, 1), (10, 3, 1, 1),
                                                            (11, 2, 2, 2), (9, 2, 3, 1)])
def test_resume_at_every_step_continues_each_ranks_stream(n, batch_size, world, accumulate):
    # the uninterrupted stream of optimizer steps: step s = accumulate batches on every rank
    epochs = 3
    per_rank = [_batches(ResumableSampler(n, seed=3, num_replicas=world, rank=r), batch_size, epochs)
                for r in range(world)]
    steps = []  # steps[s][r] = the batches rank r uses in step s
    for e in range(epochs):
        chunks = [per_rank[r][e] for r in range(world)]
        for i in range(0, len(chunks[0]), accumulate):
            steps.append([c[i:i + accumulate] for c in chunks])
    # each epoch covers every record (padding repeats a few), ranks differ
    first_epoch = {d for r in range(world) for b in per_rank[r][0] for d in b}
    assert first_epoch == set(range(n))
    for step in range(1, len(steps) - 1):
        dm, trainer = _dm(n, batch_size, world, step, accumulate)
        done = dm._draws_done()
        for r in range(world):
            trainer.global_rank = r
            sampler = ResumableSampler(n, seed=3, num_replicas=world, rank=r)
            sampler.start_at(done)
            resumed = _batches(sampler, batch_size, 2)
            flat = [b for epoch in resumed for b in epoch]
            expected = [b for s in steps[step:] for b in s[r]]
            assert flat[:len(expected)] == expected[:len(flat)], (step, r)
            assert len(flat) >= min(len(expected), 2)


def test_lightning_does_not_wrap_it():
    # Lightning wraps any sampler that is not a DistributedSampler in DistributedSamplerWrapper, which sizes
    # itself from __len__ once and indexes past the end of a resumed (shorter) epoch.
    sampler = ResumableSampler(11, num_replicas=2, rank=1)
    assert isinstance(sampler, DistributedSampler)
    assert len(sampler) == 6 and len(list(sampler)) == 6
    sampler.start_at(11 + 4)  # epoch 1, 4 draws (2 per rank) done
    assert len(list(sampler)) == 4
    with pytest.raises(ValueError):
        ResumableSampler(5, num_replicas=2, rank=2)
