"""``GamesTask`` in the DataModule: seeds per split, the experience, episode batches; a 2-step fit on episodes."""

import math

import pytest
import torch

from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.errors import ConfigError, DataError
from lightning_ctx.knobs import check_class_args
from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import EpisodeBatch
from lightning_ctx.tasks.games import GameEvalCallback, GamesTask, oracle
from lightning_ctx.tasks.games.task import PAPER_ENV_KWARGS, TRAIN_CHECK_GAMES, checked_seeds


def _dm(tiny_qwen3, batch_size=4, max_prompt_length=8192, max_eval_items=None, **kw):
    args = dict(env_id="FrozenLake-v0-raw", n_train=6, n_val=3, n_test=2, experience="Experience: PLAN", max_turns=4)
    dm = TaskDataModule(GamesTask(**{**args, **kw}), batch_size=batch_size, max_prompt_length=max_prompt_length,
                        max_eval_items=max_eval_items)
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
    task = dm.task
    assert batch.context == "Experience: PLAN" and task.longest_first_prompt() > 50
    # episodes are sized whole: the first prompt and max_turns - 1 turns with their feedback; per_turn with a history
    # of actions: an action line per earlier turn, not a whole reply
    assert 20 < task.feedback_tokens() < 200
    assert task.episodes.name == "per_turn" and task.history == "actions"
    assert dm.longest_prompt() == task.longest_first_prompt() + 3 * (16 + task.feedback_tokens())
    for kw in (dict(episode_format="single_sequence"), dict(history="replies")):
        other = _dm(tiny_qwen3, **kw)
        assert other.longest_prompt() == other.task.longest_first_prompt() + 3 * (256 + other.task.feedback_tokens())


def test_experience_from_a_file_and_the_errors(tiny_qwen3, tmp_path):
    path = tmp_path / "exp.txt"
    path.write_text("Experience: plan\n")
    assert _dm(tiny_qwen3, experience_file=str(path)).task.experience == "Experience: plan"
    with pytest.raises(DataError, match="no experience text"):
        GamesTask(experience="  ")
    with pytest.raises(ConfigError, match="-raw"):
        GamesTask(env_id="FrozenLake-v0", experience="x")
    with pytest.raises(ConfigError, match="data.task.max_turns"):
        GamesTask(max_turns=0, experience="x")
    with pytest.raises(ConfigError, match="data.task.episode_format"):
        GamesTask(episode_format="per_game", experience="x")
    with pytest.raises(ConfigError, match="data.task.history"):
        GamesTask(history="all", experience="x")
    with pytest.raises(DataError, match="max_prompt_length"):
        _dm(tiny_qwen3, max_prompt_length=10)


def test_env_kwargs_default_to_opcd_and_reach_the_games(tiny_qwen3):
    task = _dm(tiny_qwen3).task
    assert task.env_kwargs == PAPER_ENV_KWARGS["FrozenLake-v0-raw"] == {"size": 3, "num_holes": 2,
                                                                       "randomize_start_goal": False}
    (game,) = task.factory([task.seeds("val")[0]])
    game.reset()
    assert game.env.size == 3 and game.env.num_holes == 2
    sokoban = GamesTask(env_id="Sokoban-v0-raw", n_train=4, n_val=4, experience="x",
                        env_kwargs={"num_boxes": 1, "dim_room": [6, 6], "max_turns": 40})
    (game,) = sokoban.factory([3])
    game.reset()
    assert game.env.max_turns == 40 and game.env.dim_room == (6, 6)


def test_env_kwargs_errors_name_the_key():
    with pytest.raises(ConfigError, match="not an argument of FrozenLakeEnv") as err:
        GamesTask(experience="x", env_kwargs={"holes": 2})
    assert err.value.field == "data.task.env_kwargs.holes"
    with pytest.raises(ConfigError, match="like its default 3") as err:
        GamesTask(env_id="Sokoban-v0-raw", experience="x", env_kwargs={"num_boxes": "one"})
    assert err.value.field == "data.task.env_kwargs.num_boxes"


def test_playability_is_measured_per_split_and_kept(tiny_qwen3, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        task = _dm(tiny_qwen3, n_train=6, n_val=5, n_test=0, max_turns=5).task
    assert set(task.playability) == {"train", "val"}  # no test split
    for split in ("train", "val"):
        found = task.playability[split]
        seeds = task.seeds(split)
        assert found.checked == len(seeds) and found.fraction == 1.0  # 3x3: every board won in 4 moves
        exact = [oracle.analyse("FrozenLake-v0-raw", task.env_kwargs, s, 5).random_pass for s in seeds]
        assert found.random_pass == pytest.approx(sum(exact) / len(exact))
    lines = [r.getMessage() for r in caplog.records if "can be won within 5 moves" in r.getMessage()]
    assert len(lines) == 2 and "100.0% of the train games" in lines[0] and "100.0% of the val games" in lines[1]
    # the evaluated games only: data.max_eval_items caps the val split the oracle checks
    capped = _dm(tiny_qwen3, n_train=6, n_val=5, n_test=0, max_turns=5, max_eval_items=2).task
    assert capped.playability["val"].checked == 2 and capped.playability["train"].checked == 6


def test_a_large_train_split_is_checked_on_an_even_sample():
    seeds = list(range(5000, 8200))
    sample = checked_seeds(seeds, "train")
    assert len(sample) == TRAIN_CHECK_GAMES == len(set(sample)) and sample[0] == 5000 and sample[-1] > 8100
    assert checked_seeds(seeds, "val") == seeds and checked_seeds(seeds[:100], "train") == seeds[:100]


@pytest.mark.parametrize("env_id, env_kwargs, max_turns, field, fraction", [
    ("FrozenLake-v0-raw", {}, 5, "data.task.max_turns", "0.0% of the val games"),  # the registry's 4x4: 6 moves
    ("FrozenLake-v0-raw", None, 3, "data.task.max_turns", "0.0% of the val games"),  # OPCD's 3x3 needs 4
    ("Sokoban-v0-raw", {"num_boxes": 3}, 5, "data.task.max_turns", "of the val games"),
])
def test_unwinnable_settings_are_refused_with_the_measured_fraction(env_id, env_kwargs, max_turns, field, fraction):
    args = dict(env_id=env_id, env_kwargs=env_kwargs, max_turns=max_turns, n_val=12, experience="x")
    task = GamesTask(**args)
    # the CLI's knob check (before any model loads) and a Python user's DataModule on connect refuse alike
    for refuse in (lambda: check_class_args(GamesTask, args, "data.task."), task.measure_playability):
        with pytest.raises(ConfigError, match="below the 10%") as err:
            refuse()
        assert err.value.field == field and fraction in err.value.message
        assert "raise data.task.max_turns to" in str(err.value) and "\n" not in str(err.value)


def test_repeated_checks_reuse_the_solved_seeds():
    GamesTask(n_train=8, n_val=4, experience="x").measure_playability()
    before = oracle._analyse.cache_info()
    task = GamesTask(n_train=8, n_val=4, experience="x")
    task.measure_playability()
    after = oracle._analyse.cache_info()
    assert after.misses == before.misses and after.hits >= before.hits + 12  # 8 train + 4 val games, all cached


@pytest.mark.slow
def test_two_steps_on_episodes_train_the_student_and_evaluate(tiny_qwen3):
    import lightning.pytorch as pl

    from lightning_ctx.module import OnPolicyDistillation

    torch.manual_seed(0)
    module = OnPolicyDistillation(student=tiny_qwen3, anchor_weight=0.5, max_new_tokens=6, temperature=0.7,
                                  lr=1e-3, rollout_engine="loop")
    before = [p.detach().clone() for p in module.student.parameters()]
    dm = TaskDataModule(GamesTask(env_id="FrozenLake-v0-raw", n_train=4, n_val=2, experience="Experience: PLAN",
                                  max_turns=4), batch_size=2, max_prompt_length=8192)
    dm.connect(module.tokenizer)  # as the CLI does before fit
    callback = GameEvalCallback(every_n_steps=0, log_artifacts=False)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert math.isfinite(float(m["train/loss"])) and float(m["train/opd"]) >= 0 and "train/anchor" in m
    assert 1 <= float(m["train/episode_turns"]) <= 4
    assert [h["step"] for h in callback.history] == [0, 2]  # at the start and at the end
    for key in ("eval/pass_no_ctx", "eval/pass_ctx", "eval/turns_no_ctx", "eval/invalid_rate_ctx"):
        assert key in m
    # the ceiling and floor on the evaluated seeds: every 3x3 board is won in 4 moves; the random player's exact odds
    expected = [oracle.analyse("FrozenLake-v0-raw", dm.task.env_kwargs, s, 4).random_pass for s in dm.task.seeds("val")]
    assert float(m["eval/pass_oracle"]) == 1.0
    assert float(m["eval/pass_random"]) == pytest.approx(sum(expected) / 2) and float(m["eval/pass_random"]) < 0.2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
