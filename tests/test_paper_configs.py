"""The 8 system-prompt paper settings (``experiments/paper/sys_*.yaml``): each parses with its real-model knobs,
and each runs OPCD's CPU smoke override set on a tiny stand-in of its architecture family with the shipped samples,
ending in an MLflow run that carries the removability metrics."""

import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_ctx.cli import main

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "experiments" / "paper"
DATA = REPO / "experiments" / "data"
MODELS = ("llama3.1_8b", "llama3.2_3b", "qwen2.5_7b", "qwen2.5_3b_from_7b")
TASKS = ("medmcqa", "safety")
CONFIGS = [PAPER / f"sys_{t}_{m}.yaml" for t in TASKS for m in MODELS]
SMOKE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.max_steps", "2", "--model.max_new_tokens", "8", "--data.batch_size", "2"]


def _task(config: Path) -> str:
    return config.stem.split("_")[1]


def _family(config: Path) -> str:
    return "llama" if "llama" in config.stem else "qwen2"


def _data_args(task: str) -> list[str]:
    """The configs name their data relative to the repository root; tests run in a temp dir."""
    return ["--data.init_args.train_file", str(DATA / f"sys_{task}_train_sample.jsonl"),
            "--data.init_args.val_file", str(DATA / f"sys_{task}_test_sample.jsonl"),
            "--data.init_args.system_prompt_file", str(DATA / f"sys_{task}_prompt.txt")]


def test_eight_settings_exist():
    assert all(c.exists() for c in CONFIGS), [c.name for c in CONFIGS if not c.exists()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_parses_with_the_protocol(config, capsys):
    import yaml

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err
    cfg = yaml.safe_load(capsys.readouterr().out)
    m, t = cfg["model"], cfg["trainer"]
    assert (m["max_new_tokens"], m["scope"], m["topk"], m["divergence"]) == (512, "topk", 256, "reverse_kl")
    assert m["topk_renormalize"] is (_task(config) == "safety")
    assert (m["lr"], m["lr_schedule"], m["warmup_steps"], m["temperature"]) == (5e-6, "constant", 0, 1.0)
    assert m["anchor_weight"] == 0.5 and m["gradient_checkpointing"] is True and t["precision"] == "bf16-mixed"
    assert t["max_steps"] == 50 and cfg["data"]["init_args"]["batch_size"] * t["accumulate_grad_batches"] == 128
    assert m["student"].startswith("/models/") and (m["teacher"] is not None) == ("from_7b" in config.stem)
    assert (m["lora"] is not None) == any(s in config.stem for s in ("8b", "qwen2.5_7b"))
    (cb,) = [c for c in t["callbacks"] if c["class_path"].endswith("ContextRemovabilityCallback")]
    a = cb["init_args"]
    assert (a["num_samples"], a["temperature"], a["top_p"], a["top_k"]) == (4, 1.0, 0.95, 20)


def _driver():
    """benchmarks/paper.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_driver", REPO / "benchmarks" / "paper.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    return driver


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """The driver's tiny Llama / Qwen2 stand-ins (vocabulary covering both tasks' samples and prompts) and a
    deeper Qwen2 with the same tokenizer as the cross-size teacher."""
    return _driver().build_stand_ins(tmp_path_factory.mktemp("paper_stand_ins"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_smoke_on_tiny_stand_in(config, stand_ins, mlflow_uri):
    task, family = _task(config), _family(config)
    models = ["--model.student", stand_ins[family]]
    if "from_7b" in config.stem:
        models += ["--model.teacher", stand_ins["qwen2_teacher"]]
    main(["fit", "--config", str(config), *models, *SMOKE, *_data_args(task)])
    (run,) = mlflow.search_runs(experiment_names=["paper-sys"], output_format="list")
    m, params, tags = run.data.metrics, run.data.params, run.data.tags
    for name in ("eval/harm", "eval/acc_no_ctx", "eval/acc_ctx", "eval/sampled/acc_ctx", "eval/sampled/harm"):
        assert name in m, name  # 8 new tokens cannot close an <answer> tag: 0 accuracy, harm NaN, but logged
    assert 0.0 <= m["eval/acc_ctx"] <= 1.0 and 0.0 <= m["eval/acc_no_ctx"] <= 1.0
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/anchor"])
    assert len(MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train/loss")) == 2
    assert params["cfg/model.topk_renormalize"] == str(task == "safety")
    assert params["cfg/model.scope"] == "topk" and params["cfg/model.max_new_tokens"] == "8"
    assert params["cfg/trainer.precision"] == "32-true" and params["cfg/model.student"] == stand_ins[family]
    assert tags["setting"] == config.stem and tags["task"] == f"sys_{task}"


def test_paper_driver_says_what_it_skips_and_why(capsys):
    """On a machine without the model folders (this one) nothing real runs, and each setting says why."""
    driver = _driver()
    assert driver.SETTINGS == [c.stem for c in CONFIGS]
    assert driver.main(["--dry-run", "--models-root", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    for config in CONFIGS:
        assert f"skipped {config.stem}: model folder missing: student /nonexistent/" in out
    assert "0 run(s) to do (8 of 8 setting(s) skipped)" in out and "--best-k 3" in out
    assert driver.main(["--dry-run", "--smoke", "--only", "sys_safety_qwen2.5_3b_from_7b"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) to do" in out and "builtin:methods/opd.yaml" in out and "--model.teacher" in out
    assert all(a in out for a in driver.SMOKE)
