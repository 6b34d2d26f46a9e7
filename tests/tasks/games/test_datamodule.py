"""``GamesDataModule``: seeds per split, the experience, episode batches; a 2-step fit on episodes."""

import math

import pytest
import torch

from lightning_ctx.errors import ConfigError, DataError
from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import EpisodeBatch
from lightning_ctx.tasks.games import GameEvalCallback, GamesDataModule


def _dm(tiny_qwen3, **kw):
    args = dict(env_id="FrozenLake-v0-raw", n_train=6, n_val=3, n_test=2, experience="Experience: PLAN",
                batch_size=4, max_turns=3)
    dm = GamesDataModule(**{**args, **kw})
    dm.connect(load_tokenizer(tiny_qwen3))
    return dm


def test_splits_are_disjoint_seed_ranges_and_batches_are_games(tiny_qwen3):
    dm = _dm(tiny_qwen3)
    seeds = {s: [r.meta["seed"] for r in dm.records(s)] for s in ("train", "val", "test")}
    assert [len(v) for v in seeds.values()] == [6, 3, 2]
    assert not set(seeds["train"]) & set(seeds["val"]) and not set(seeds["val"]) & set(seeds["test"])
    assert seeds == {s: [r.meta["seed"] for r in _dm(tiny_qwen3).records(s)] for s in seeds}  # reproducible
    assert seeds["val"] != [r.meta["seed"] for r in _dm(tiny_qwen3, data_seed=1).records("val")]
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, EpisodeBatch) and len(batch) == 4 and set(batch.seeds) <= set(seeds["train"])
    assert batch.context == "Experience: PLAN" and dm.longest_first_prompt() > 50
    # episodes are sized whole: the first prompt and max_turns - 1 turns with their feedback; per_turn with a history
    # of actions: an action line per earlier turn, not a whole reply
    assert 20 < dm.feedback_tokens() < 200
    assert dm.episodes.name == "per_turn" and dm.history == "actions"
    assert dm.longest_prompt() == dm.longest_first_prompt() + 2 * (16 + dm.feedback_tokens())
    for kw in (dict(episode_format="single_sequence"), dict(history="replies")):
        other = _dm(tiny_qwen3, **kw)
        assert other.longest_prompt() == other.longest_first_prompt() + 2 * (256 + other.feedback_tokens())


def test_experience_from_a_file_and_the_errors(tiny_qwen3, tmp_path):
    path = tmp_path / "exp.txt"
    path.write_text("Experience: plan\n")
    assert _dm(tiny_qwen3, experience_file=str(path)).experience == "Experience: plan"
    with pytest.raises(DataError, match="no experience text"):
        GamesDataModule(experience="  ")
    with pytest.raises(ConfigError, match="-raw"):
        GamesDataModule(env_id="FrozenLake-v0", experience="x")
    with pytest.raises(ConfigError, match="data.max_turns"):
        GamesDataModule(max_turns=0, experience="x")
    with pytest.raises(ConfigError, match="data.episode_format"):
        GamesDataModule(episode_format="per_game", experience="x")
    with pytest.raises(ConfigError, match="data.history"):
        GamesDataModule(history="all", experience="x")
    with pytest.raises(DataError, match="max_prompt_length"):
        _dm(tiny_qwen3, max_prompt_length=10)


@pytest.mark.slow
def test_two_steps_on_episodes_train_the_student_and_evaluate(tiny_qwen3):
    import lightning.pytorch as pl

    from lightning_ctx.module import OnPolicyDistillation

    torch.manual_seed(0)
    module = OnPolicyDistillation(student=tiny_qwen3, anchor_weight=0.5, max_new_tokens=6, temperature=0.7,
                                  lr=1e-3, rollout_engine="loop")
    before = [p.detach().clone() for p in module.student.parameters()]
    dm = GamesDataModule(env_id="FrozenLake-v0-raw", n_train=4, n_val=2, experience="Experience: PLAN", batch_size=2,
                         max_turns=3)
    dm.connect(module.tokenizer)  # as the CLI does before fit
    callback = GameEvalCallback(every_n_steps=0, log_artifacts=False)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert math.isfinite(float(m["train/loss"])) and float(m["train/opd"]) >= 0 and "train/anchor" in m
    assert 1 <= float(m["train/episode_turns"]) <= 3
    assert [h["step"] for h in callback.history] == [0, 2]  # at the start and at the end
    for key in ("eval/pass_no_ctx", "eval/pass_ctx", "eval/turns_no_ctx", "eval/invalid_rate_ctx"):
        assert key in m
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
