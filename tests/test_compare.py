"""``lightning-ctx compare`` on runs written directly with MlflowClient."""

from __future__ import annotations

import json
import math

import pytest

from lightning_ctx.compare import key_sources, method_labels, short_label
from lightning_ctx.compare_report import compare_main

# (target, anchor weight, seed) -> final metrics; SHOW: anchored harm lower, ADD2: not lower
FINAL = {
    ("SHOW", "0.0", 0): dict(acc_no_ctx=0.9, acc_ctx=0.60, harm=0.40, len_inflation=1.2, retention=0.95),
    ("SHOW", "0.0", 1): dict(acc_no_ctx=0.8, acc_ctx=0.70, harm=0.20, len_inflation=1.0, retention=0.90),
    ("SHOW", "0.5", 0): dict(acc_no_ctx=0.9, acc_ctx=0.95, harm=0.00, len_inflation=0.1, retention=0.70),
    ("SHOW", "0.5", 1): dict(acc_no_ctx=0.8, acc_ctx=0.85, harm=0.10, len_inflation=0.0, retention=0.60),
    ("ADD2", "0.0", 0): dict(acc_no_ctx=0.7, acc_ctx=0.80, harm=0.10, len_inflation=0.0, retention=0.99),
    ("ADD2", "0.0", 1): dict(acc_no_ctx=0.6, acc_ctx=0.75, harm=0.10, len_inflation=0.0, retention=0.97),
    ("ADD2", "0.5", 0): dict(acc_no_ctx=0.7, acc_ctx=0.70, harm=0.20, len_inflation=0.0, retention=0.50),
    ("ADD2", "0.5", 1): dict(acc_no_ctx=0.6, acc_ctx=0.80, harm=0.10, len_inflation=0.0, retention=float("nan")),
}


def _log_run(client, exp_id, target, weight, seed, metrics, finish=True):
    from mlflow.entities import Metric, Param

    rid = client.create_run(exp_id, tags={"grid": "paper"}).info.run_id
    params = {"cfg/data.task.class_path": "lightning_ctx.tasks.world.WorldTask",
              "cfg/data.task.init_args.target_context": target,
              "cfg/model.student": "builtin:world", "cfg/model.anchor_weight": weight,
              "cfg/seed_everything": str(seed), "anchor_weight": weight}
    # an earlier evaluation (step 10) that must be ignored, then the final one (step 150)
    logged = [Metric(f"eval/{k}", 0.99, 1, 10) for k in metrics] + [Metric(f"eval/{k}", v, 2, 150)
                                                                   for k, v in metrics.items()]
    client.log_batch(rid, metrics=logged, params=[Param(k, v) for k, v in params.items()])
    if finish:
        client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating a store and its runs takes seconds on this machine)."""
    return f"sqlite:///{tmp_path_factory.mktemp('cmp_store') / 'mlflow.db'}"


@pytest.fixture
def mlflow_uri(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    return store


@pytest.fixture(scope="module")
def runs(store):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.create_experiment("grid")
    ids = {key: _log_run(client, exp, *key, metrics) for key, metrics in FINAL.items()}
    # noise that must not be selected: an unfinished run in the experiment, a run in another experiment
    _log_run(client, exp, "SHOW", "0.5", 2, dict(harm=0.99, acc_ctx=0.0), finish=False)
    _log_run(client, client.create_experiment("other"), "SHOW", "0.5", 3, dict(harm=0.99, acc_ctx=0.0))
    return ids


def _expected(keys, metric):
    vals = [FINAL[k][metric] for k in keys if not math.isnan(FINAL[k][metric])]
    return sum(vals) / len(vals)


def _count_harm_reduced(group_fn):
    groups = {}
    for key in FINAL:
        groups.setdefault(group_fn(key), {}).setdefault(key[1], []).append(key)
    reduced = sum(_expected(g["0.5"], "harm") < _expected(g["0.0"], "harm") for g in groups.values())
    return reduced, len(groups)


def test_compare_table_means_and_harm_line(runs, mlflow_uri, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "grid", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    n, m = _count_harm_reduced(lambda k: k[0])
    assert (n, m) == (1, 2)
    assert f"harm reduced in {n} of {m} configurations" in text
    assert "acc_ctx improved in 1 of 2 configurations" in text  # SHOW +0.25, ADD2 -0.025

    result = json.loads((out / "compare.json").read_text())
    assert result["n_runs"] == 8  # the RUNNING run and the other experiment are excluded
    by_target = {c["key"]["target"]: c for c in result["configs"]}
    assert set(by_target) == {"SHOW", "ADD2"}
    assert by_target["SHOW"]["key"]["task"] == "lightning_ctx.tasks.world.WorldTask"
    assert by_target["SHOW"]["key"]["model"] == "builtin:world"
    for target, c in by_target.items():
        for method, weight in (("OPD", "0.0"), ("anchored", "0.5")):
            keys = [k for k in FINAL if k[0] == target and k[1] == weight]
            stats = c["methods"][method]["metrics"]
            assert sorted(c["methods"][method]["seeds"]) == ["0", "1"]
            for metric in ("acc_no_ctx", "acc_ctx", "harm", "len_inflation", "retention"):
                assert stats[metric]["mean"] == pytest.approx(_expected(keys, metric)), (target, method, metric)
        assert c["deltas"]["anchored"]["harm"] == pytest.approx(
            _expected([k for k in FINAL if k[:2] == (target, "0.5")], "harm")
            - _expected([k for k in FINAL if k[:2] == (target, "0.0")], "harm"))
    assert by_target["ADD2"]["methods"]["anchored"]["metrics"]["retention"]["n"] == 1  # the NaN seed is skipped

    md = (out / "compare.md").read_text()
    assert "| target" in md and "Δ anchored − OPD" in md and "-0.250" in md  # SHOW harm: 0.05 - 0.30
    assert f"harm reduced in {n} of {m} configurations" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "compare.csv").read_text().count("\n") == 5  # header + 2 configs x 2 methods


def test_group_by_seed_and_run_ids_and_filter(runs, mlflow_uri, tmp_path, capsys):
    n, m = _count_harm_reduced(lambda k: (k[0], k[2]))
    assert compare_main(["--tracking-uri", mlflow_uri, "--filter", "tags.grid = 'paper'", "--experiment", "grid",
                         "--group-by", "task,target,model,seed", "--out-dir", str(tmp_path / "a")]) == 0
    assert f"harm reduced in {n} of {m} configurations" in capsys.readouterr().out
    assert (n, m) == (2, 4)

    show = [rid for key, rid in runs.items() if key[0] == "SHOW"]
    assert compare_main(["--tracking-uri", mlflow_uri, "--run-ids", *show, "--out-dir", str(tmp_path / "b")]) == 0
    assert "harm reduced in 1 of 1 configurations" in capsys.readouterr().out


def test_no_match_is_a_clear_error(runs, mlflow_uri, tmp_path, capsys):
    from lightning_ctx.cli import main

    assert compare_main(["--tracking-uri", mlflow_uri, "--filter", "tags.grid = 'nope'",
                         "--out-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "no runs matched" in err and "tags.grid = 'nope'" in err
    assert not (tmp_path / "c").exists()

    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "missing"]) == 1
    assert "no experiment named 'missing'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:  # through the CLI dispatcher, default URI from the environment
        main(["compare", "--filter", "tags.grid = 'nope'"])
    assert exc.value.code == 1


def test_key_helpers():
    assert key_sources("target")[0] == "tags.target_context"
    assert key_sources("params.cfg/x|foo") == ("params.cfg/x", "params.foo", "tags.foo")
    assert method_labels(["0.0", "0.5", None]) == {"0.0": "OPD", "0.5": "anchored", None: "?"}
    assert method_labels(["0", "0.1", "1.0"]) == {"0": "OPD", "0.1": "anchored(0.1)", "1.0": "anchored(1)"}
    assert short_label("lightning_ctx.tasks.world.WorldTask") == "WorldTask"
    assert short_label("/data/gsm8k/train.jsonl") == "gsm8k/train.jsonl"
    assert short_label("0.5") == "0.5" and short_label(None) == "-"


def _load_grid():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "grid.py"
    spec = importlib.util.spec_from_file_location("grid_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_grid_builds_one_fit_per_target_seed_method_and_compare_reads_its_tags(capsys):
    import shlex
    from types import SimpleNamespace

    from lightning_ctx.compare import run_value

    grid = _load_grid()
    args = grid.parse_args(["--targets", "SHOW", "ADD1 REV", "--seeds", "0", "1", "--steps", "7",
                            "--experiment", "E", "--", "--data.task.n_train", "64"])
    jobs = grid.fit_jobs(args)
    assert len(jobs) == 16 and len({j.name for j in jobs}) == 16
    job = next(j for j in jobs if j.name == "ADD1_REV-anchored_retain-s1")
    argv = job.argv
    opt = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert argv[argv.index("fit") - 1].endswith(("lightning-ctx", "lightning_ctx.cli"))
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert configs[:2] == ["builtin:tasks/world.yaml", "builtin:models/world_base.yaml"]  # the world without an eval
    assert configs[2].endswith("experiments/eval/grid.yaml") and configs[3] == "builtin:methods/anchored_retain.yaml"
    assert (opt("--data.task.target_context"), opt("--seed_everything")) == ("ADD1 REV", "1")
    assert opt("--trainer.max_steps") == "7" and opt("--trainer.logger.init_args.experiment_name") == "E"
    assert argv[-2:] == ["--data.task.n_train", "64"] and job.env["OMP_NUM_THREADS"] == "1"
    # the four methods for every (target, seed)
    pairs = {(opt_of(j, "--data.task.target_context"), opt_of(j, "--seed_everything")): set() for j in jobs}
    for j in jobs:
        key = (opt_of(j, "--data.task.target_context"), opt_of(j, "--seed_everything"))
        pairs[key].add(json.loads(opt_of(j, "--trainer.logger.init_args.tags"))["method"])
    assert all(v == {"opd", "anchored", "anchored_retain", "offpolicy_cd"} for v in pairs.values()) and len(pairs) == 4

    # the tags it sets are what compare groups by
    tags = json.loads(opt("--trainer.logger.init_args.tags"))
    fake = SimpleNamespace(data=SimpleNamespace(tags=tags, params={}))
    assert (run_value(fake, "target"), run_value(fake, "seed"), run_value(fake, "task")) == ("ADD1 REV", "1", "world")
    cmp_avg, cmp_seed = grid.compare_jobs(args)
    assert cmp_avg.argv[cmp_avg.argv.index("--filter") + 1] == f"tags.grid = '{tags['grid']}'"
    assert "seed" in cmp_seed.argv[cmp_seed.argv.index("--group-by") + 1].split(",")

    assert grid.main(["--dry-run", "--targets", "SHOW", "--seeds", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 4 + 2  # four fits (one per method), two compares
    assert shlex.split(lines[1])[2:] == grid.fit_jobs(grid.parse_args(["--targets", "SHOW", "--seeds", "3"]))[1].argv


def opt_of(job, name):
    return job.argv[job.argv.index(name) + 1]


def test_compare_warns_when_runs_differ_in_library_versions(store, mlflow_uri, tmp_path, capsys):
    """Runs record ``version/<library>`` tags; comparing runs made with different versions says so."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.create_experiment("versions")
    metrics = FINAL[("SHOW", "0.0", 0)]
    old = _log_run(client, exp, "SHOW", "0.0", 0, metrics)
    new = _log_run(client, exp, "SHOW", "0.5", 0, metrics)
    for rid, torch_version in ((old, "2.12.0+cpu"), (new, "2.13.0+cpu")):
        client.set_tag(rid, "version/torch", torch_version)
        client.set_tag(rid, "version/transformers", "5.24.0")  # equal: not reported
    out = tmp_path / "cmp"
    assert compare_main(["--tracking-uri", store, "--experiment", "versions", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    line = [ln for ln in text.splitlines() if "differ in library versions" in ln]
    assert line == ["warning: the compared runs differ in library versions: "
                    "torch 2.12.0+cpu (1 run) / 2.13.0+cpu (1 run)"]
    assert line[0] in (out / "compare.md").read_text()
    result = json.loads((out / "compare.json").read_text())
    assert result["version_differences"] == {"torch": {"2.12.0+cpu": [old], "2.13.0+cpu": [new]}}

    # Same versions everywhere: no warning.
    client.set_tag(old, "version/torch", "2.13.0+cpu")
    assert compare_main(["--tracking-uri", store, "--experiment", "versions", "--out-dir", str(out)]) == 0
    assert "differ in library versions" not in capsys.readouterr().out


def test_three_methods_and_retention_kept_counts(store):
    """OPD, anchored and anchored + retain (the retain weight tells the last two apart); the retention line
    counts configurations whose seed-mean retention is >= 0.9, per method."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from lightning_ctx.compare import compare_runs, summary_lines

    client = MlflowClient(store)
    exp = client.create_experiment("three-methods")
    # (target, anchor, retain) -> (harm, retention) for seeds 0 and 1
    plan = {("SHOW", "0.0", "0.0"): [(0.3, 0.95), (0.1, 0.91)], ("SHOW", "0.5", "0.0"): [(0.0, 0.7), (0.0, 0.8)],
            ("SHOW", "0.5", "0.5"): [(0.0, 1.0), (0.0, 0.98)], ("ADD2", "0.0", "0.0"): [(0.2, 0.8), (0.2, 0.9)],
            ("ADD2", "0.5", "0.0"): [(0.0, 0.5), (0.1, 0.4)], ("ADD2", "0.5", "0.5"): [(0.3, 0.9), (0.3, 0.92)]}
    for (target, anchor, retain), per_seed in plan.items():
        for seed, (harm, retention) in enumerate(per_seed):
            rid = _log_run(client, exp, target, anchor, seed, dict(harm=harm, retention=retention, acc_ctx=0.5))
            client.log_batch(rid, params=[Param("cfg/model.retain_weight", retain)])
    result = compare_runs(client.search_runs([exp]))
    assert result["methods"] == ["OPD", "anchored", "anchored + retain"]
    lines = summary_lines(result)
    assert "anchored: harm reduced in 2 of 2 configurations" in lines
    assert "anchored + retain: harm reduced in 1 of 2 configurations" in lines  # ADD2: 0.3 vs OPD's 0.2
    # seed means: OPD SHOW 0.93, ADD2 0.85; anchored 0.75, 0.45; anchored + retain 0.99, 0.91
    assert "OPD: retention >= 0.9 in 1 of 2 configurations" in lines
    assert "anchored: retention >= 0.9 in 0 of 2 configurations" in lines
    assert "anchored + retain: retention >= 0.9 in 2 of 2 configurations" in lines


# Evaluation histories for the best-k view: step -> (acc_ctx, harm); step 0 is the initial model.
HISTORY = {
    "0.0": {0: (0.95, 0.00), 10: (0.50, 0.40), 20: (0.70, 0.30), 30: (0.60, 0.20), 40: (0.80, 0.50),
            50: (0.40, float("nan"))},
    "0.5": {0: (0.95, 0.00), 10: (0.60, 0.10), 20: (0.90, 0.05), 30: (0.85, 0.00), 40: (0.65, 0.20),
            50: (0.88, 0.10)},
}


def test_best_k_values_by_one_metric_or_each_its_own():
    from lightning_ctx.compare import best_k_values

    hist = {f"eval/{m}": [(st, v[i]) for st, v in HISTORY["0.0"].items()] for i, m in enumerate(("acc_ctx", "harm"))}
    # by acc_ctx: steps 40, 20, 30 (step 0 excluded); harm read at those steps
    got = best_k_values(hist, 3, ["acc_ctx", "harm"], by="acc_ctx")
    assert got["eval/acc_ctx"] == pytest.approx((0.8 + 0.7 + 0.6) / 3)
    assert got["eval/harm"] == pytest.approx((0.5 + 0.3 + 0.2) / 3)
    # each metric its own best: harm lower is better, NaN skipped
    own = best_k_values(hist, 2, ["acc_ctx", "harm"])
    assert own["eval/acc_ctx"] == pytest.approx(0.75) and own["eval/harm"] == pytest.approx(0.25)
    # more k than steps: the mean over all trained steps; step 0 counts only when asked
    assert best_k_values(hist, 10, ["acc_ctx"], by="acc_ctx")["eval/acc_ctx"] == pytest.approx(3.0 / 5)
    assert best_k_values(hist, 1, ["acc_ctx"], by="acc_ctx", min_step=0)["eval/acc_ctx"] == pytest.approx(0.95)
    # a later value logged at the same step wins; a metric never logged is NaN
    hist["eval/acc_ctx"].append((40, 0.1))
    assert best_k_values(hist, 1, ["acc_ctx", "retention"], by="acc_ctx")["eval/acc_ctx"] == pytest.approx(0.7)
    assert math.isnan(best_k_values(hist, 1, ["retention"])["eval/retention"])


def test_compare_best_k_reads_metric_histories(store, mlflow_uri, tmp_path, capsys):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(store)
    exp = client.create_experiment("bestk")
    for weight, steps in HISTORY.items():
        rid = client.create_run(exp).info.run_id
        logged = [Metric(f"eval/{m}", v[i], 1000 + st, st) for st, v in steps.items()
                  for i, m in enumerate(("acc_ctx", "harm"))]
        params = {"cfg/model.anchor_weight": weight, "cfg/model.student": "/models/Qwen2.5-7B-Instruct",
                  "cfg/seed_everything": "0"}
        client.log_batch(rid, metrics=logged, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(rid)
    out = tmp_path / "best"
    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "bestk", "--metrics", "acc_ctx,harm",
                         "--best-k", "3", "--best-by", "acc_ctx", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean of the 3 best evaluation steps (from step 1, chosen by acc_ctx)" in text
    (config,) = json.loads((out / "compare.json").read_text())["configs"]
    opd, anchored = config["methods"]["OPD"]["metrics"], config["methods"]["anchored"]["metrics"]
    assert opd["acc_ctx"]["mean"] == pytest.approx((0.8 + 0.7 + 0.6) / 3)
    assert opd["harm"]["mean"] == pytest.approx((0.5 + 0.3 + 0.2) / 3)
    assert anchored["acc_ctx"]["mean"] == pytest.approx((0.9 + 0.88 + 0.85) / 3)  # steps 20, 50, 30
    assert anchored["harm"]["mean"] == pytest.approx((0.05 + 0.10 + 0.0) / 3)
    # the final values (step 50) differ: the default view is unchanged
    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "bestk", "--metrics", "acc_ctx,harm",
                         "--out-dir", str(tmp_path / "final")]) == 0
    (config,) = json.loads((tmp_path / "final" / "compare.json").read_text())["configs"]
    assert config["methods"]["OPD"]["metrics"]["acc_ctx"]["mean"] == pytest.approx(0.4)
    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "bestk", "--best-by", "acc_ctx"]) == 1
    assert "--best-by needs --best-k" in capsys.readouterr().err


# ---------------------------------------------------------------- intervals from the runs' per-example tables

N_ITEMS, N_RET = 60, 20
# (target, anchor weight) -> (harmed item indices, retention items right of 20); every item is right without c
TABLE_PLAN = {("SHOW", "0.0"): (range(24), 19), ("SHOW", "0.5"): (range(0), 10),
              ("ADD2", "0.0"): (range(6), 20), ("ADD2", "0.5"): (range(5), 12)}


def _table_rows(target, weight, seed):
    harmed, ret_right = TABLE_PLAN[(target, weight)]
    rows = [{"index": i, "id": f"{target}-{i}", "context": target, "prompt": str(i), "answer": "a",
             "response_no_ctx": "a", "correct_no_ctx": True, "len_no_ctx": 3 + i % 2, "truncated_no_ctx": False,
             "response_ctx": "b" if i in harmed else "a", "correct_ctx": i not in harmed,
             "len_ctx": 2 if weight == "0.5" else 3 + (i + seed) % 3,  # anchored: shorter with c (negative)
             "truncated_ctx": False} for i in range(N_ITEMS)]
    ret = [{"index": i, "id": f"o{i}", "context": "REV", "prompt": str(i), "answer": "a", "response": "a",
            "correct": i < ret_right, "reference_correct": True, "len": 2} for i in range(N_RET)]
    return rows, ret


def _log_table_run(client, exp, target, weight, seed, tmp_path, shuffle=False):
    import random

    from mlflow.entities import Metric

    from lightning_ctx.eval.artifacts import write_examples
    from lightning_ctx.eval.registry import REMOVABILITY, ItemRows

    rows, ret = _table_rows(target, weight, seed)
    metrics = REMOVABILITY.measure(ItemRows(rows, ret), n_resamples=0)
    rid = _log_run(client, exp, target, weight, seed, {k: metrics[k] for k in FINAL[("SHOW", "0.0", 0)]})
    client.log_batch(rid, metrics=[Metric("eval/help", 0.0, 2, 150)])
    if shuffle:
        random.Random(seed).shuffle(rows)
    for step, table in ((10, _table_rows(target, "0.0" if weight == "0.5" else "0.5", seed)), (150, (rows, ret))):
        folder = tmp_path / f"{rid}-{step}"
        folder.mkdir()
        for path in write_examples(folder, title="t", stage="fit", step=step, split="val", metrics=metrics,
                                   references={}, rows=table[0], retention_rows=table[1]):
            client.log_artifact(rid, str(path), f"eval/step_{step:06d}")
    return rid


def test_compare_prints_both_counts_and_paired_intervals_from_the_tables(store, mlflow_uri, tmp_path, capsys):
    """Synthetic runs with their final per-example tables (an earlier step's table must be ignored, rows in another
    order are aligned by id): each value with its interval over items, each difference with its paired interval
    (checked against paired_bootstrap on the same items), the counts by point and by interval, and a configuration
    without tables counted by its point estimates only."""
    from mlflow import MlflowClient

    from lightning_ctx.eval.intervals import bootstrap, format_interval, paired_bootstrap
    from lightning_ctx.eval.item_metrics import removability_items, retention_items, stack_runs

    client = MlflowClient(store)
    exp = client.create_experiment("tables")
    for (target, weight) in TABLE_PLAN:
        for seed in (0, 1):
            _log_table_run(client, exp, target, weight, seed, tmp_path, shuffle=(weight, seed) == ("0.0", 1))
    for weight, harm in (("0.0", 0.3), ("0.5", 0.1)):  # REV: logged without tables
        _log_run(client, exp, "REV", weight, 0, dict(acc_no_ctx=1.0, acc_ctx=1 - harm, harm=harm, len_inflation=0.0,
                                                     retention=0.95))
    out = tmp_path / "cmp"
    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "tables", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "harm reduced in 3 of 3 configurations" in text  # point estimates: SHOW, ADD2 (5 vs 6 items), REV
    # by the paired interval: SHOW only (ADD2's one item fewer is within the noise); REV has no tables
    assert ("harm reduced in 1 of 2 configurations with the paired 95% interval excluding 0 (1 without per-example "
            "tables: not counted)") in text
    assert "OPD: retention >= 0.9 in 3 of 3 configurations" in text
    assert "OPD: retention >= 0.9 in 1 of 2 configurations with the whole 95% interval" in text  # ADD2: 20 of 20
    assert "anchored: retention >= 0.9 in 0 of 2 configurations with the whole 95% interval" in text

    def items(target, weight, seed):
        rows, ret = _table_rows(target, weight, seed)
        col = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        return {**removability_items(*(col(rows, k) for k in ("correct_no_ctx", "correct_ctx", "len_no_ctx",
                                                               "len_ctx"))),
                "retention": retention_items(col(ret, "correct"), col(ret, "reference_correct"))["retention"]}

    result = json.loads((out / "compare.json").read_text())
    show = next(c for c in result["configs"] if c["key"]["target"] == "SHOW")
    treated = stack_runs([items("SHOW", "0.5", s) for s in (0, 1)])
    baseline = stack_runs([items("SHOW", "0.0", s) for s in (0, 1)])
    expected = paired_bootstrap({k: treated[k] for k in ("harm",)}, {k: baseline[k] for k in ("harm",)})["harm"]
    paired = show["paired"]["anchored"]["harm"]
    assert (paired["diff"], paired["lo"], paired["hi"]) == pytest.approx((expected.diff, expected.lo, expected.hi))
    assert paired["diff"] == pytest.approx(-0.4) and paired["hi"] < 0
    # len_inflation compares magnitudes (closer to zero is better): anchored's -0.43 is worse than OPD's +0.14
    lens = [{"len_inflation": x["len_inflation"]} for x in (treated, baseline)]
    exp_len = paired_bootstrap(*lens, absolute=["len_inflation"])["len_inflation"]
    got_len = show["paired"]["anchored"]["len_inflation"]
    assert (got_len["diff"], got_len["lo"]) == pytest.approx((exp_len.diff, exp_len.lo)) and got_len["lo"] > 0
    ret_iv = bootstrap({"retention": baseline["retention"]})["retention"]
    opd = show["methods"]["OPD"]["metrics"]["retention"]
    assert (opd["mean"], opd["lo"], opd["hi"], opd["n_items"]) == pytest.approx((0.95, ret_iv.lo, ret_iv.hi, 20))
    assert opd["lo"] < 0.9
    # the printed table: the value with its interval, the paired difference with its interval
    assert f"| {format_interval(expected, signed=True)} " in text
    assert f"0.950 ± 0.000 [{ret_iv.lo:.3f}, {ret_iv.hi:.3f}]" in text
    assert "[lo, hi]: 95% bootstrap interval over items (8 of 10 runs" in text
    rev = next(c for c in result["configs"] if c["key"]["target"] == "REV")
    assert rev["paired"] == {} and "lo" not in rev["methods"]["OPD"]["metrics"]["harm"]

    # the same runs without tables (--n-resamples 0): point counts only, and the note says so
    assert compare_main(["--tracking-uri", mlflow_uri, "--experiment", "tables", "--n-resamples", "0",
                         "--out-dir", str(tmp_path / "plain")]) == 0
    plain = capsys.readouterr().out
    assert "harm reduced in 3 of 3 configurations" in plain and "interval excluding 0" not in plain
    assert "note: no run has a per-example table" in plain


def test_run_table_of_the_sampled_namespace():
    """``--metric-prefix eval/sampled/`` compares the sampled metrics of the same tables under their plain names."""
    import numpy as np

    from lightning_ctx.compare import RunTable
    from lightning_ctx.eval.item_metrics import sampled_items, values
    from lightning_ctx.eval.registry import REMOVABILITY, ItemRows

    g = np.random.default_rng(2)
    c0, c1 = g.random((30, 4)) < 0.6, g.random((30, 4)) < 0.5
    rows = [{"index": i, "id": f"r{i}", "correct_no_ctx": True, "correct_ctx": True, "len_no_ctx": 2, "len_ctx": 2,
             "truncated_no_ctx": False, "truncated_ctx": False, "sampled_correct_no_ctx": c0[i].tolist(),
             "sampled_correct_ctx": c1[i].tolist(), "sampled_len_no_ctx": [2] * 4, "sampled_len_ctx": [3] * 4,
             "sampled_truncated_no_ctx": [False] * 4, "sampled_truncated_ctx": [False] * 4} for i in range(30)]
    table = RunTable.of(REMOVABILITY, ItemRows(rows), "sampled/")
    got = {k: m.value() for k, m in table.metrics["examples"].items()}
    expected = values(sampled_items(c0, c1))
    assert {k: got[k] for k in expected} == pytest.approx(expected) and got["len_inflation"] == pytest.approx(0.5)
    assert table.ids["examples"] == [f"r{i}" for i in range(30)] and "harm_excess" in got


def test_a_run_without_the_on_policy_term_is_named_by_its_extra_terms(tmp_path):
    """The off-policy baseline has anchor and retain weights 0 like OPD: compare tells it apart by model.opd_weight
    0 and its extra term's class; a run whose weights changed at a resume is a row of its own."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from lightning_ctx.compare import compare_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("offp")
    base = {"cfg/data.task.class_path": "lightning_ctx.tasks.world.WorldTask",
            "cfg/data.task.init_args.target_context": "SHOW", "cfg/model.student": "builtin:world",
            "cfg/model.anchor_weight": "0.0", "cfg/model.retain_weight": "0.0"}
    methods = {"opd": {"cfg/model.opd_weight": "1.0"},
               "offp": {"cfg/model.opd_weight": "0.0",
                        "cfg/model.extra_terms.0.class_path": "lightning_ctx.loss.OffPolicyContextDistillation",
                        "cfg/model.extra_terms.0.init_args.weight": "1.0"},
               # OPD resumed with the anchor on (its params stay OPD's; the resume logs resumed/<name>)
               "delayed": {"cfg/model.opd_weight": "1.0", "resumed/anchor_weight": "0.5"}}
    harms = {"opd": 0.5, "offp": 0.25, "delayed": 0.125}
    for seed in (0, 1):
        for name, extra in methods.items():
            rid = client.create_run(exp).info.run_id
            params = {**base, **extra, "cfg/seed_everything": str(seed)}
            harm = harms[name]
            client.log_batch(rid, metrics=[Metric("eval/harm", harm, 1, 10)],
                             params=[Param(k, v) for k, v in params.items()])
            client.set_terminated(rid)
    runs = client.search_runs([exp])
    result = compare_runs(runs, metrics=["harm"])
    (config,) = result["configs"]
    assert set(config["methods"]) == {"OPD", "off-policy CD", "OPD (resumed with anchor_weight 0.5)"}
    assert config["methods"]["off-policy CD"]["metrics"]["harm"]["mean"] == 0.25
    assert config["deltas"]["off-policy CD"]["harm"] == pytest.approx(-0.25)
    assert config["methods"]["OPD"]["metrics"]["harm"]["mean"] == 0.5  # not pooled with the resumed runs
    assert config["deltas"]["OPD (resumed with anchor_weight 0.5)"]["harm"] == pytest.approx(-0.375)
