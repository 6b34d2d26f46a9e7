"""Every shipped config parses; the real-model configs run end to end on tiny stand-ins of their family.

CI cannot download Qwen2.5 / Llama 3.2 weights: each ``experiments/*_medmcqa.yaml`` runs with a tiny randomly
initialised checkpoint of the same architecture family and chat-template style (``save_tiny_checkpoint``)
swapped in through ``--model.student``; everything else (data module, bf16-mixed precision, chunking, static
cache rollouts, the evaluation callback, the MLflow logger) is the config's own. Only the step count and the
generation budget are cut.
"""

import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
CONFIGS = sorted(EXPERIMENTS.rglob("*.yaml"))
MCQA_CONFIGS = sorted(EXPERIMENTS.glob("*_medmcqa.yaml"))
SAMPLE = EXPERIMENTS / "data" / "medmcqa_sample.jsonl"
SYSTEM_PROMPT_FILE = EXPERIMENTS / "data" / "medmcqa_system_prompt.txt"
FAST = ["--trainer.max_steps", "2", "--model.max_new_tokens", "6", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def test_configs_found():
    names = {p.name for p in CONFIGS}
    assert {"qwen2.5_0.5b_medmcqa.yaml", "qwen2.5_1.5b_medmcqa.yaml", "llama3.2_1b_medmcqa.yaml",
            "llama3.2_3b_medmcqa.yaml", "frozenlake_opd.yaml", "frozenlake_anchored.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "model:" in out and "trainer:" in out


def _family(config: Path) -> str:
    return "llama" if config.name.startswith("llama") else "qwen2"


@pytest.fixture(scope="module")
def mcqa_students(tmp_path_factory):
    """Tiny Qwen2 / Llama checkpoints whose word-level vocabulary covers the sample data (no [UNK])."""
    from lightning_ctx.models.tiny import save_tiny_checkpoint
    from lightning_ctx.tasks.mcqa.convert import MEDICAL_SYSTEM_PROMPT, load_mcqa

    words = sorted({w for r in load_mcqa(SAMPLE, MEDICAL_SYSTEM_PROMPT) for w in (r.context + " " + r.prompt).split()})
    root = tmp_path_factory.mktemp("mcqa_students")
    return {fam: str(save_tiny_checkpoint(root / fam, fam, seed=2, extra_words=words)) for fam in ("qwen2", "llama")}


def _single_run(experiment: str):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return runs[0]


def _final_examples(uri: str, run_id: str) -> dict:
    client = MlflowClient(uri)
    steps = sorted(a.path for a in client.list_artifacts(run_id, "eval") if a.is_dir)
    assert steps, "the evaluation callback wrote no per-example table"
    path = client.download_artifacts(run_id, f"{steps[-1]}/examples.json")
    return json.loads(Path(path).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("config", MCQA_CONFIGS, ids=lambda p: p.stem)
def test_real_model_config_runs_on_tiny_stand_in(config, mcqa_students, mlflow_uri):
    from lightning_ctx.tasks.mcqa.convert import MEDICAL_SYSTEM_PROMPT

    family = _family(config)
    student = mcqa_students[family]
    main(["fit", "--config", str(config), "--model.student", student,
          # the config's relative data paths are resolved from the repository root; tests run in a temp dir
          "--data.task.train_file", str(SAMPLE), "--data.task.system_prompt_file", str(SYSTEM_PROMPT_FILE),
          *FAST])
    run = _single_run("medmcqa")
    m, params = run.data.metrics, run.data.params
    for name in ("train/loss", "train/opd", "train/anchor", "train/entropy"):
        assert name in m and math.isfinite(m[name]), name
    assert m["train/loss"] == pytest.approx(m["train/opd"] + 0.5 * m["train/anchor"], rel=1e-3, abs=1e-4)
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 2
    for name in ("eval/acc_no_ctx", "eval/acc_ctx", "ref/teacher_acc_ctx", "ref/initial_acc_no_ctx"):
        assert 0.0 <= m[name] <= 1.0, name
    # the config's own settings reached the run
    assert params["cfg/model.student"] == student and float(params["cfg/model.anchor_weight"]) == 0.5
    assert params["cfg/trainer.precision"] == "bf16-mixed" and params["cfg/model.rollout_engine"] == "hf_static"
    assert int(params["cfg/model.chunk_size"]) > 0
    assert params["cfg/data.task.class_path"] == "lightning_ctx.tasks.mcqa.MCQATask"
    assert run.data.tags["task"] == "medmcqa"
    # the held-out split: 8 sample questions, posed with the system prompt as context, gold answers letters
    examples = _final_examples(mlflow_uri, run.info.run_id)["examples"]
    assert len(examples) == 8
    assert all(e["context"] == MEDICAL_SYSTEM_PROMPT and e["answer"] in "ABCD" for e in examples)
    from lightning_ctx.data.verifiers import ChoiceVerifier

    assert all(e["correct_ctx"] == ChoiceVerifier()(e["response_ctx"], e["answer"]) for e in examples)


@pytest.mark.slow
def test_frozenlake_config_runs_on_tiny_stand_in(tiny_dirs, mlflow_uri):
    from lightning_ctx.tasks.frozenlake.rules import frozenlake_verifier, parse_map

    config = EXPERIMENTS / "frozenlake_anchored.yaml"
    main(["fit", "--config", str(config), "--model.student", tiny_dirs["qwen2"], "--data.task.n_train", "16",
          "--data.task.n_val", "6", "--data.task.n_test", "0", *FAST])
    run = _single_run("frozenlake")
    m = run.data.metrics
    for name in ("train/loss", "train/opd", "train/anchor"):
        assert name in m and math.isfinite(m[name]), name
    assert 0.0 <= m["eval/acc_ctx"] <= 1.0
    examples = _final_examples(mlflow_uri, run.info.run_id)["examples"]
    assert len(examples) == 6
    for e in examples:
        assert parse_map(e["answer"]) is not None and "H" in e["context"]
        assert e["correct_no_ctx"] == frozenlake_verifier(e["response_no_ctx"], e["answer"])


@pytest.mark.slow
def test_frozenlake_jsonl_with_verifier_flag(tiny_dirs, mlflow_uri, tmp_path):
    """The generic path: exported JSONL files + the JSONL task's verifier named by import path."""
    from lightning_ctx.tasks.frozenlake.rules import write_splits

    paths = write_splits(tmp_path / "fl", n_train=8, n_val=0, n_test=0)
    main(["fit", "--model.student", tiny_dirs["qwen2"], "--data.task.train_file", str(paths["train"]),
          "--data.task.verifier", "lightning_ctx.tasks.frozenlake.rules:FrozenLakeVerifier", "--data.batch_size", "4",
          "--model.anchor_weight", "0.5", *FAST])
    m = _single_run("lightning-ctx").data.metrics
    assert all(math.isfinite(m[k]) for k in ("train/loss", "train/opd", "train/anchor"))


BUILTIN = sorted((REPO / "lightning_ctx" / "configs").rglob("*.yaml"))


def _readme_fit_commands() -> list[list[str]]:
    """Every ``lightning-ctx fit ...`` command of the README and docs/ (continuation lines joined), as argv."""
    import shlex

    from tests.helpers import documentation_text

    text = documentation_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if "lightning-ctx fit" in line and "--config" in line:
            cmd = line.split("lightning-ctx fit", 1)[1].split("#", 1)[0].split("`", 1)[0]
            out.append(shlex.split(cmd))
    return out


def test_builtin_method_files_stack_on_the_world_base(capsys):
    from lightning_ctx.cli import expand_configs

    assert {p.relative_to(REPO / "lightning_ctx" / "configs").as_posix() for p in BUILTIN} >= {
        "world.yaml", "tasks/world.yaml", "models/world_base.yaml", "eval/removability.yaml", "methods/opd.yaml",
        "methods/anchored.yaml", "methods/anchored_retain.yaml", "methods/offpolicy_cd.yaml"}
    # the quickstart file names are the same stacks as the builtin files: the world's task, model and evaluation
    argv = expand_configs(["fit", "--config", str(EXPERIMENTS / "world_anchored_retain.yaml")])
    configs = [_where(argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
    assert configs == ["builtin:tasks/world.yaml", "builtin:models/world_base.yaml", "builtin:eval/removability.yaml",
                       "builtin:world.yaml", "builtin:methods/anchored_retain.yaml", "world_anchored_retain.yaml"]
    for method, weights in (("opd", ("0.0", "0.0")), ("anchored", ("0.5", "0.0")), ("anchored_retain", ("0.5", "0.5"))):
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", "builtin:world.yaml", "--config", f"builtin:methods/{method}.yaml",
                  "--print_config"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert f"anchor_weight: {weights[0]}" in out and f"retain_weight: {weights[1]}" in out
        assert ("retain_others: true" in out) == (method == "anchored_retain")
        assert "class_path: lightning_ctx.tasks.world.WorldTask" in out
        assert out.count("class_path: lightning_ctx.eval.ContextRemovabilityCallback") == 1


def test_every_config_combination_the_readme_shows_parses(capsys):
    commands = _readme_fit_commands()
    assert len(commands) >= 6
    for argv in commands:
        with pytest.raises(SystemExit) as info:
            main(["fit", *argv, "--print_config"])
        assert info.value.code == 0, (argv, capsys.readouterr().err)
        capsys.readouterr()


def test_defaults_errors_name_the_file(tmp_path, capsys):
    from lightning_ctx.cli import expand_configs
    from lightning_ctx.errors import ConfigError

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b.yaml]\n")
    b.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        expand_configs(["fit", "--config", str(a)])
    b.write_text("defaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match=r"missing.yaml.*does not exist \(from the defaults of"):
        expand_configs(["fit", "--config", str(a)])
    b.write_text("defaults: builtin:world.yaml\n")
    with pytest.raises(ConfigError, match="field 'defaults': must be a list"):
        expand_configs(["fit", "--config", str(a)])
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "builtin:nope.yaml"])
    assert info.value.code == 2 and "nope.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------ one config convention (docs/design.md, "Configs")

BUILTIN_DIR = REPO / "lightning_ctx" / "configs"
GROUPS = ("tasks", "models", "eval", "methods")
#: Settings: the files users run (each a ``defaults:`` list of one file per group, plus its own run name).
SETTINGS = sorted([*EXPERIMENTS.glob("*.yaml"), *(EXPERIMENTS / "paper").glob("*.yaml")])
#: The names the README's quickstart and settings tables give.
README_NAMES = ("world_opd.yaml", "world_anchored.yaml", "world_anchored_retain.yaml", "world_opd_add2.yaml",
                "frozenlake_opd.yaml", "frozenlake_anchored.yaml", "qwen2.5_0.5b_medmcqa.yaml",
                *(f"paper/sys_{task}_{model}.yaml" for task in ("medmcqa", "safety")
                  for model in ("llama3.1_8b", "llama3.2_3b", "qwen2.5_7b", "qwen2.5_3b_from_7b")),
                "paper/game_sokoban_qwen3_4b.yaml", "paper/game_sokoban_qwen3_1.7b.yaml",
                "paper/game_frozenlake_qwen3_1.7b.yaml", "paper/game_frozenlake_qwen3_1.7b_from_4b.yaml")


def _where(path: str) -> str:
    """A config path as ``builtin:<group>/<name>`` or relative to experiments/."""
    p = Path(path).resolve()
    if p.is_relative_to(BUILTIN_DIR):
        return f"builtin:{p.relative_to(BUILTIN_DIR).as_posix()}"
    return p.relative_to(EXPERIMENTS).as_posix()


def test_builtins_and_experiments_share_one_layout():
    """The same groups in both places; one models/ folder; every other config is a setting at the top level or in
    paper/ (plus the data files' folder)."""
    builtin_groups = {p.parent.relative_to(BUILTIN_DIR).as_posix() for p in BUILTIN} - {"."}
    assert builtin_groups == set(GROUPS)
    folders = {p.parent.relative_to(EXPERIMENTS).as_posix() for p in CONFIGS}
    assert folders == {".", "paper", "tasks", "models", "eval"}  # methods are the package's (builtin:methods/)
    assert not list(EXPERIMENTS.rglob("models/**/models")) and len(list(REPO.glob("experiments/**/models"))) == 1


def _group_files(config: Path) -> list[str]:
    """The group files a setting names, through the settings it builds on (a group file's own defaults, such as a
    task's shared protocol, belong to it)."""
    import yaml

    from lightning_ctx.cli.compose import resolve_config

    out = []
    for ref in (yaml.safe_load(config.read_text()) or {}).get("defaults") or []:
        path = resolve_config(ref, config.parent)
        where = _where(str(path))
        group = where.removeprefix("builtin:").removeprefix("paper/").split("/")
        out += [where] if len(group) == 2 else _group_files(path)
    return out


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_setting_stacks_one_task_model_evaluation_and_method(setting):
    files = _group_files(setting)
    groups = [f.removeprefix("builtin:").split("/")[0] for f in files]
    assert sorted(groups) == sorted(GROUPS), files


def test_the_readme_names_exist_and_parse(capsys):
    from tests.helpers import documentation_text

    readme = documentation_text()
    for name in README_NAMES:
        assert (EXPERIMENTS / name).is_file() and Path(name).name in readme, name
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(EXPERIMENTS / name), "--print_config"])
        assert info.value.code == 0, (name, capsys.readouterr().err)
        capsys.readouterr()


def test_an_evaluation_file_adds_its_callback_without_restating_the_others(capsys, tmp_path):
    """``callbacks+`` (jsonargparse's list append, in config files too): evaluation files stack; a later plain
    ``callbacks:`` list replaces them all."""
    def callbacks(*configs):
        with pytest.raises(SystemExit) as info:
            main(["fit", *[a for c in configs for a in ("--config", c)], "--print_config"])
        assert info.value.code == 0, capsys.readouterr().err
        import yaml

        return [(c["class_path"].rsplit(".", 1)[1], c.get("init_args", {}).get("every_n_steps"))
                for c in yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"] or []]

    assert callbacks("builtin:world.yaml") == [("ContextRemovabilityCallback", 50)]
    assert callbacks("builtin:world.yaml", str(EXPERIMENTS / "eval" / "opcd_sampled.yaml"),
                     "builtin:eval/games.yaml") == [("ContextRemovabilityCallback", 50),
                                                    ("ContextRemovabilityCallback", 10), ("GameEvalCallback", 25)]
    replace = tmp_path / "replace.yaml"
    replace.write_text("trainer:\n  callbacks:\n    - class_path: lightning_ctx.tasks.games.GameEvalCallback\n")
    assert callbacks("builtin:world.yaml", "builtin:eval/games.yaml", str(replace)) == [("GameEvalCallback", 25)]


def test_a_knob_error_in_an_appended_callback_names_its_file_and_line(tmp_path, capsys, mlflow_uri):
    bad = tmp_path / "eval.yaml"
    bad.write_text("trainer:\n  callbacks+:\n    - class_path: lightning_ctx.eval.ContextRemovabilityCallback\n"
                   "      init_args:\n        every_n_steps: -3\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "builtin:world.yaml", "--config", str(bad)])
    assert info.value.code == 2
    assert f"{bad}, line 5, field 'trainer.callbacks.every_n_steps'" in capsys.readouterr().err
