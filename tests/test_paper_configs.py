"""The 8 system-prompt paper settings (``experiments/paper/sys_*.yaml``): each parses with its real-model knobs, its
verifier accepts every gold answer of its data under either scoring (the ceiling) while answering blindly scores
chance (the floor), a gold answer the verifier cannot read stops the run, and each runs OPCD's CPU smoke override set
on a tiny stand-in of its architecture family with the shipped samples, ending in an MLflow run that carries the
removability metrics."""

import functools
import json
import math
from collections import Counter
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
    return ["--data.task.train_file", str(DATA / f"sys_{task}_train_sample.jsonl"),
            "--data.task.val_file", str(DATA / f"sys_{task}_test_sample.jsonl"),
            "--data.task.system_prompt_file", str(DATA / f"sys_{task}_prompt.txt")]


def _script(name: str):
    """A file of scripts/ or benchmarks/ as a module (they are scripts, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(name).stem, REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _bounds_script():
    return _script("scripts/sys_answer_bounds.py")


@functools.cache
def _printed(config: Path) -> dict:
    """``lightning-ctx fit --config config --print_config``, parsed (once per config for the whole module)."""
    return _bounds_script().printed_config(config)


def test_eight_settings_exist():
    assert all(c.exists() for c in CONFIGS), [c.name for c in CONFIGS if not c.exists()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_parses_with_the_protocol(config):
    cfg = _printed(config)
    m, t = cfg["model"], cfg["trainer"]
    assert (m["max_new_tokens"], m["scope"], m["topk"], m["divergence"]) == (512, "topk", 256, "reverse_kl")
    # OPCD's README passes --kl_renorm_topk True for one system-prompt setting only: Llama-3.1-8B safety
    assert m["topk_renormalize"] is (config.stem == "sys_safety_llama3.1_8b")
    assert cfg["data"]["task"]["init_args"]["scoring"] == "strict"
    assert (m["lr"], m["lr_schedule"], m["warmup_steps"], m["temperature"]) == (5e-6, "constant", 0, 1.0)
    assert m["anchor_weight"] == 0.5 and m["gradient_checkpointing"] is True and t["precision"] == "bf16-mixed"
    assert t["max_steps"] == 50 and cfg["data"]["batch_size"] * t["accumulate_grad_batches"] == 128
    assert m["student"].startswith("/models/") and (m["teacher"] is not None) == ("from_7b" in config.stem)
    assert (m["lora"] is not None) == any(s in config.stem for s in ("8b", "qwen2.5_7b"))
    (cb,) = [c for c in t["callbacks"] if c["class_path"].endswith("ContextRemovabilityCallback")]
    a = cb["init_args"]
    assert (a["num_samples"], a["temperature"], a["top_p"], a["top_k"]) == (4, 1.0, 0.95, 20)


def _driver():
    return _script("benchmarks/paper.py")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_ceiling_and_floor_of_the_scoring_on_the_shipped_samples(config):
    """Every gold answer, written as the prompt asks, is accepted by both scorings (ceiling 1.0); answering blindly
    scores chance: 1/2 (verdicts) or 1/4 (four options) at random, the majority share as a constant answer."""
    script = _bounds_script()
    result = script.measure(config, printed=_printed(config))
    files = {split: DATA / f"sys_{_task(config)}_{name}_sample.jsonl" for split, name in (("train", "train"),
                                                                                          ("val", "test"))}
    for scoring in ("strict", "opcd"):
        assert set(result[scoring]) == {"verifier", "train", "val"}
        for split, path in files.items():
            golds = [json.loads(line)["answer"] for line in path.read_text().splitlines() if line.strip()]
            majority = Counter(golds).most_common(1)[0][1] / len(golds)
            b = result[scoring][split]
            assert b["items"] == len(golds) and b["ceiling"] == 1.0
            assert b["random"] == pytest.approx(1 / 2 if _task(config) == "safety" else 1 / 4)
            assert b["constant"] == pytest.approx(majority)


def test_bounds_see_a_verifier_that_misses_answers():
    """The ceiling is measured, not assumed: a verifier that reads only some answers lowers it."""
    from lightning_ctx.data.records import TaskRecord

    script = _bounds_script()
    records = [TaskRecord(id=str(i), context="c", prompt="Q?\nA) x\nB) y\nC) z", answer=a)
               for i, a in enumerate("ABCC")]
    only_c = lambda response, answer: "<answer>C</answer>" in response and answer == "C"  # noqa: E731
    b = script.bounds(records, only_c, "medmcqa")
    assert (b["ceiling"], b["random"], b["constant"], b["constant_answer"]) == (0.5, 0.5 / 3, 0.5, "C")


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
    assert params["cfg/model.topk_renormalize"] == str(config.stem == "sys_safety_llama3.1_8b")
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


def _user_error(capsys, argv) -> str:
    """The one ``lightning-ctx: ...`` line a refused run prints (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("lightning-ctx")]
    return line


def test_a_paper_run_stops_on_a_bad_scoring_or_an_unreadable_gold(tiny_dirs, jsonl_file, mlflow_uri, capsys,
                                                                  monkeypatch):
    config = str(PAPER / "sys_medmcqa_qwen2.5_3b_from_7b.yaml")
    models = ["--model.student", tiny_dirs["qwen2"], "--model.teacher", tiny_dirs["qwen2"], *SMOKE]
    import lightning_ctx.models.teachers as teachers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the knobs were checked")

    monkeypatch.setattr(teachers, "load_causal_lm", refuse)
    line = _user_error(capsys, ["fit", "--config", config, *models, *_data_args("medmcqa"),
                                "--data.task.scoring", "lenient"])
    assert "field 'data.task.scoring'" in line and "must be one of strict, opcd, got 'lenient'" in line
    monkeypatch.undo()
    # gold E: an option letter the strict verifier reads, but OPCD's scorer knows A-D only
    bad = jsonl_file([{"content": "Question: Pick one.\nOptions:\nA) a\nB) b\nC) c\nD) d\nE) e", "answer": "E"}])
    line = _user_error(capsys, ["fit", "--config", config, *models, *_data_args("medmcqa"), "--data.task.scoring",
                                "opcd", "--data.task.val_file", bad])
    assert bad in line and "line 1" in line and "'OPCDChoiceVerifier' verifier cannot parse answer 'E'" in line
    assert not mlflow.search_runs(experiment_names=["paper-sys"], output_format="list"), "a run was created"
