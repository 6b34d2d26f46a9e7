"""``make demo``: distill the SHOW context into the built-in rule-world base, three ways, and compare.

Arms: the world's task, model and evaluation stacked with each method file shipped in the package
(``builtin:world.yaml`` + ``builtin:methods/{opd,anchored,anchored_retain}.yaml``, the same stacks as
``experiments/world_*.yaml``):
plain OPD (anchor 0), anchored OPD (anchor 0.5), anchored OPD plus the retention term. Each run is a normal
``lightning-ctx fit`` (in this process, to pay the import cost once), tracked in ``./mlruns``; the table is
read back from MLflow.

    python -m lightning_ctx.demo [--target SHOW] [--seeds 0] [--steps 100] [--lr 1e-4] [--arms opd anchored retain]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

TASK = "builtin:world.yaml"
ARMS = {
    "opd": "builtin:methods/opd.yaml",
    "anchored": "builtin:methods/anchored.yaml",
    "retain": "builtin:methods/anchored_retain.yaml",
}
LABELS = {"opd": "OPD", "anchored": "anchored", "retain": "anchored + retain"}
COLUMNS = ("acc_no_ctx", "acc_ctx", "harm", "help", "len_no_ctx", "len_ctx", "retention")


def fit_run(configs: list[str], seed: int, steps: int | None, root: Path, experiment: str, run_name: str,
            lr: float | None = None, extra: tuple[str, ...] = ()) -> str:
    """One ``lightning-ctx fit`` of the stacked ``configs`` in this process (``steps`` None: the configs'
    ``trainer.max_steps``); returns the MLflow run id."""
    from lightning_ctx.cli import ContextCLI

    args = ["fit"] + [a for c in configs for a in ("--config", c)]
    args += ["--trainer.max_steps", str(steps)] if steps is not None else []
    cli = ContextCLI(args=[*args, "--seed_everything", str(seed),
                           "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false",
                           "--trainer.logger.init_args.experiment_name", experiment,
                           "--trainer.logger.init_args.run_name", run_name,
                           *(["--model.lr", str(lr)] if lr is not None else []), *extra],
                     print_summary=False)  # the demo prints one table for all arms instead
    return cli.trainer.logger.run_id


def run_arm(arm: str, target: str, seed: int, steps: int, root: Path, experiment: str,
            lr: float | None = None) -> str:
    """One ``fit`` of the world task with ``arm``'s method config; returns the MLflow run id."""
    return fit_run([TASK, ARMS[arm]], seed, steps, root, experiment, f"world-{arm}-{target}-s{seed}", lr,
                   ("--data.task.target_context", target))


def final_metrics(run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient().get_run(run_id).data.metrics
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/")}


def metric_curves(run_id: str, metrics=("harm", "retention")) -> dict[str, list[tuple]]:
    """``{metric: [(step, value, lo, hi), ...]}`` (``(step, value)`` for a run logged without intervals)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    for m in metrics:
        hist = {name: {h.step: h.value for h in client.get_metric_history(run_id, f"eval/{name}")}
                for name in (m, f"{m}_lo", f"{m}_hi")}
        lo, hi = hist[f"{m}_lo"], hist[f"{m}_hi"]
        out[m] = [(s, v, lo[s], hi[s]) if s in lo and s in hi else (s, v) for s, v in sorted(hist[m].items())]
    return out


def plot_runs(run_ids: dict[str, str], path: Path, metrics: tuple[str, ...], title: str,
              artifact_dir: str = "tradeoff") -> Path:
    """``metrics`` over steps of every run (``{label: run id}``) on one figure, one panel per metric; saved to
    ``path`` and logged to each run under ``artifact_dir``."""
    from mlflow.tracking import MlflowClient

    from lightning_ctx.eval.artifacts import plot_method_curves

    path = plot_method_curves(path, {label: metric_curves(rid, metrics) for label, rid in run_ids.items()},
                              metrics=metrics, title=title)
    for run_id in run_ids.values():
        MlflowClient().log_artifact(run_id, str(path), artifact_dir)
    return path


def plot_tradeoff(run_ids: dict[str, str], target: str, seed: int, out_dir: Path) -> Path:
    """Harm and retention over steps of every arm on one figure; saved under ``out_dir`` and logged to each run."""
    return plot_runs({LABELS[arm]: rid for arm, rid in run_ids.items()},
                     out_dir / f"tradeoff-{target.replace(' ', '_')}-s{seed}.png", ("harm", "retention"),
                     f"{target}, seed {seed}: harm and retention over steps")


def format_table(rows: list[tuple[str, int, dict[str, float]]], columns: tuple[str, ...] = COLUMNS,
                 width: int = 12, label_width: int = 10) -> str:
    head = f"{'arm':<{label_width}}{'seed':>5}" + "".join(f"{c:>{width}}" for c in columns)
    lines = [head, "-" * len(head)]
    for arm, seed, m in rows:
        cells = "".join(f"{m.get(c, math.nan):>{width}.3f}" for c in columns)
        lines.append(f"{arm:<{label_width}}{seed:>5}{cells}")
    return "\n".join(lines)


def print_run_pointers(experiment: str) -> None:
    """Where a demo's runs are and the commands that read them."""
    print(f"\nRuns are in ./mlruns, experiment {experiment!r}; each holds its student as the artifact model/.")
    print("  .venv/bin/lightning-ctx ui                                   # browse them at http://127.0.0.1:5000")
    print(f"  .venv/bin/lightning-ctx compare --experiment {experiment}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="SHOW", help="context to internalize (default SHOW)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=None, help="model.lr (default: the world config's, 1e-4)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="demo_runs", help="checkpoints and per-run files")
    p.add_argument("--experiment", default="world-demo", help="MLflow experiment name")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves a core for the rest
    rows = []
    start = time.time()
    plots = []
    for seed in args.seeds:
        run_ids = {}
        for arm in args.arms:
            t0 = time.time()
            print(f"\n=== {arm} | target {args.target} | seed {seed} ===", flush=True)
            run_ids[arm] = run_arm(arm, args.target, seed, args.steps,
                                   Path(args.out) / f"{arm}-{args.target}-s{seed}", args.experiment, args.lr)
            rows.append((arm, seed, final_metrics(run_ids[arm])))
            print(f"--- {arm} done in {time.time() - t0:.0f} s (MLflow run {run_ids[arm]})", flush=True)
        plots.append(plot_tradeoff(run_ids, args.target, seed, Path(args.out)))
    print(f"\nTarget context {args.target}, {args.steps} steps, greedy evaluation on held-out items "
          f"(retention = accuracy on other contexts / the base model's); total {time.time() - start:.0f} s\n")
    print(format_table(rows))
    print("\nharm = share of items right without the context that turn wrong when it is given back.")
    print(f"Harm and retention over steps, all arms on one plot: {', '.join(map(str, plots))} (also in each run)")
    print_run_pointers(args.experiment)
    print(f"  .venv/bin/lightning-ctx export --run-id {run_ids[args.arms[-1]]} --out exports/{args.arms[-1]}"
          f"   # the {LABELS[args.arms[-1]]} student as a save_pretrained folder")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
