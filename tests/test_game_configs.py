"""The paper's text-game settings (experiments/paper/game_*.yaml): their boards can be won within their turn limit
(the oracle, on the held-out seeds), TextArena's registered boards are refused before any model loads, and each
fits 2 steps on tiny Qwen3 stand-ins on a CPU, leaving an MLflow run with the episode-level metrics.

The smoke override set of the configs' headers, plus a 4-game validation split and no gradient accumulation to keep
the suite's time down (with the configs' own 64 games and accumulation a smoke run takes ~2.5 min on 2 cores).
"""

import importlib.util
import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main
from lightning_ctx.tasks.games.oracle import playability
from lightning_ctx.tasks.games.task import PAPER_ENV_KWARGS, playability_report, split_seeds

REPO = Path(__file__).resolve().parent.parent
GAME_CONFIGS = sorted((REPO / "experiments" / "paper").glob("game_*.yaml"))
SMOKE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.max_steps", "2", "--model.max_new_tokens", "8", "--data.batch_size", "2"]
FASTER = ["--data.task.n_val", "4", "--trainer.accumulate_grad_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]


def test_the_four_game_settings_exist():
    assert {p.stem for p in GAME_CONFIGS} == {"game_sokoban_qwen3_4b", "game_sokoban_qwen3_1.7b",
                                              "game_frozenlake_qwen3_1.7b", "game_frozenlake_qwen3_1.7b_from_4b"}


#: the least fraction of a config's validation games the oracle must win within its turn limit
WINNABLE = {"frozenlake": 0.9, "sokoban": 0.6}


def data_args(config: Path) -> dict:
    """The task's arguments as the config stack sets them (scripts/game_playability.py reads them)."""
    spec = importlib.util.spec_from_file_location("playability", REPO / "scripts" / "game_playability.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.data_args(config)


@pytest.mark.parametrize("config", GAME_CONFIGS, ids=lambda p: p.stem)
def test_game_config_boards_can_be_won_within_its_turn_limit(config):
    args = data_args(config)
    game = "sokoban" if "sokoban" in config.stem else "frozenlake"
    assert args["env_kwargs"] == PAPER_ENV_KWARGS[args["env_id"]]  # OPCD's values, spelled out in the config
    report = playability_report(args)
    assert report["val"].checked == args["n_val"] == 128 and report["val"].fraction >= WINNABLE[game]
    assert report["val"].random_pass < report["val"].fraction / 2  # the floor far below the ceiling
    assert report["train"].fraction >= WINNABLE[game] - 0.1


@pytest.mark.parametrize("config, env_kwargs, extra", [
    ("game_frozenlake_qwen3_1.7b.yaml", "{size: 4, num_holes: 3}", []),  # TextArena's registered FrozenLake
    ("game_sokoban_qwen3_1.7b.yaml", "{num_boxes: 3}", ["--data.task.n_val", "12"]),  # and Sokoban
])
def test_unwinnable_boards_are_refused_before_any_model_loads(config, env_kwargs, extra, capsys, mlflow_uri):
    game = "sokoban" if "sokoban" in config else "frozenlake"
    args = ["fit", "--config", str(REPO / "experiments" / "paper" / config), "--model.student", "/no/such/model",
            "--data.task.env_kwargs", env_kwargs, *extra,
            "--data.task.experience_file", str(REPO / "experiments" / "data" / f"{game}_experience.txt")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1  # one line, and about the boards: the model was never loaded
    assert "field 'data.task.max_turns'" in err[0] and "of the val games can be won within 5 moves" in err[0]
    # located in the task file, at the task's max_turns line
    task_file = REPO / "experiments" / "tasks" / f"game_{game}.yaml"
    line = int(err[0].split(f"tasks/game_{game}.yaml, line ", 1)[1].split(",", 1)[0])
    assert task_file.read_text().splitlines()[line - 1].strip().startswith("max_turns:")
    assert "below the 10%" in err[0] and "/no/such/model" not in err[0]
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


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
            "--data.task.experience_file", str(REPO / "experiments" / "data" / f"{game}_experience.txt")]
    if config.stem.endswith("_from_4b"):
        args += ["--model.teacher", tiny_teacher]
    main(args)
    (run,) = mlflow.search_runs(experiment_names=["games"], output_format="list")
    m, params = run.data.metrics, run.data.params
    for name in ("eval/pass_no_ctx", "eval/pass_ctx", "train/episode_pass", "train/episode_turns", "eval/ctx_kl",
                 "eval/hidden_cos/mean"):
        assert 0 <= m[name] <= 5, name
    # the ceiling and the floor on exactly the 4 evaluated games (Sokoban's first ones are mostly one-push wins)
    env_id = params["cfg/data.task.init_args.env_id"]
    found = playability(env_id, PAPER_ENV_KWARGS[env_id], split_seeds(0, "val", 4), 5)
    assert m["eval/pass_oracle"] == pytest.approx(found.fraction) and m["eval/pass_oracle"] >= WINNABLE[game]
    assert m["eval/pass_random"] == pytest.approx(found.random_pass) and found.random_pass < found.fraction
    assert game == "sokoban" or m["eval/pass_random"] < 0.2
    assert "eval/harm" in m or "eval/help" in m  # NaN harm (nothing won without) may be dropped by the store
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/anchor"])
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "eval/pass_ctx")
    assert sorted(h.step for h in history) == [0, 2]
    assert env_id == ("Sokoban-v0-raw" if game == "sokoban" else "FrozenLake-v0-raw")
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
