"""The paper's text-game settings (experiments/paper/game_*.yaml) fit 2 steps on tiny Qwen3 stand-ins on a CPU and
leave an MLflow run with the episode-level metrics.

The smoke override set of the configs' headers, plus a 4-game validation split and no gradient accumulation to keep
the suite's time down (with the configs' own 64 games and accumulation a smoke run takes ~2.5 min on 2 cores).
"""

import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main

REPO = Path(__file__).resolve().parent.parent
GAME_CONFIGS = sorted((REPO / "experiments" / "paper").glob("game_*.yaml"))
SMOKE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.max_steps", "2", "--model.max_new_tokens", "8", "--data.batch_size", "2"]
FASTER = ["--data.init_args.n_val", "4", "--trainer.accumulate_grad_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]


def test_the_four_game_settings_exist():
    assert {p.stem for p in GAME_CONFIGS} == {"game_sokoban_qwen3_4b", "game_sokoban_qwen3_1.7b",
                                              "game_frozenlake_qwen3_1.7b", "game_frozenlake_qwen3_1.7b_from_4b"}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A second tiny Qwen3 with the same tokenizer (another seed): the cross-size teacher's stand-in."""
    from lightning_ctx.models.tiny import save_tiny_checkpoint
    from lightning_ctx.tasks.games.env import GAME_WORDS

    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "q", "qwen3", seed=9, extra_words=GAME_WORDS,
                                    max_positions=16384))


@pytest.mark.slow
@pytest.mark.parametrize("config", GAME_CONFIGS, ids=lambda p: p.stem)
def test_game_config_fits_on_a_tiny_qwen3(config, tiny_qwen3, tiny_teacher, mlflow_uri):
    game = "sokoban" if "sokoban" in config.stem else "frozenlake"
    args = ["fit", "--config", str(config), "--model.student", tiny_qwen3, *SMOKE, *FASTER,
            # relative to the repository root in the config; the test runs in a temporary folder
            "--data.init_args.experience_file", str(REPO / "experiments" / "games" / f"{game}_experience.txt")]
    if config.stem.endswith("_from_4b"):
        args += ["--model.teacher", tiny_teacher]
    main(args)
    (run,) = mlflow.search_runs(experiment_names=["games"], output_format="list")
    m, params = run.data.metrics, run.data.params
    for name in ("eval/pass_no_ctx", "eval/pass_ctx", "train/episode_pass", "train/episode_turns", "eval/ctx_kl",
                 "eval/hidden_cos/mean"):
        assert 0 <= m[name] <= 5, name
    assert "eval/harm" in m or "eval/help" in m  # NaN harm (nothing won without) may be dropped by the store
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/anchor"])
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "eval/pass_ctx")
    assert sorted(h.step for h in history) == [0, 2]
    assert params["cfg/data.init_args.env_id"] == ("Sokoban-v0-raw" if game == "sokoban" else "FrozenLake-v0-raw")
    assert run.data.tags["setting"] == config.stem
    if config.stem.endswith("_from_4b"):
        assert params["cfg/model.teacher"] == tiny_teacher and "ref/teacher_pass_ctx" in m
    # transcripts: every validation game both ways, the experience only in the with-context one
    client = MlflowClient(mlflow_uri)
    steps = sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval") if a.is_dir)
    data = json.loads(Path(client.download_artifacts(run.info.run_id, f"{steps[-1]}/transcripts.json")).read_text())
    assert len(data["games"]) == 4
    for g in data["games"]:
        assert g["transcript_ctx"][0]["role"] == "context" and g["transcript_no_ctx"][0]["role"] == "user"
        assert g["turns_no_ctx"] >= 1 and isinstance(g["reason_ctx"], str)
