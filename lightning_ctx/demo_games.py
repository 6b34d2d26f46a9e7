"""``make demo-games``: distill the built-in experience into the built-in game base, plain OPD and anchored.

Arms: the game world's task base (``builtin:games_world.yaml``: TextArena FrozenLake on OPCD's boards, the shipped
game base ``builtin:games``, the built-in experience) stacked with each method file (the same stacks as
``experiments/games_world_{opd,anchored}.yaml``). Each run is a normal ``lightning-ctx fit`` in this process
(:func:`lightning_ctx.demo.fit_run`), tracked in ``./mlruns``; the table is read back from MLflow: the base at step 0
(the OPD run's first evaluation) and every arm at its last step, on the same held-out games.

    python -m lightning_ctx.demo_games [--seeds 0] [--steps 40] [--lr 1e-3] [--arms opd anchored]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lightning_ctx.demo import final_metrics, fit_run, format_table, plot_runs, print_run_pointers

TASK = "builtin:games_world.yaml"
ARMS = {"opd": "builtin:methods/opd.yaml", "anchored": "builtin:methods/anchored.yaml"}
LABELS = {"opd": "OPD", "anchored": "anchored"}
#: reply_* = student tokens per reply (len_* / turns_*); invalid = invalid moves per move, without the experience
COLUMNS = ("pass_no_ctx", "pass_ctx", "harm", "help", "turns_no_ctx", "invalid_no_ctx", "reply_no_ctx", "reply_ctx",
           "pass_oracle", "pass_random")
CURVES = ("pass_no_ctx", "pass_ctx", "harm")


def table_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation metrics of one step with the table's derived columns."""
    out = dict(metrics)
    for tag in ("no_ctx", "ctx"):
        turns = metrics.get(f"turns_{tag}", math.nan)
        out[f"reply_{tag}"] = metrics.get(f"len_{tag}", math.nan) / turns if turns else math.nan
    out["invalid_no_ctx"] = metrics.get("invalid_rate_no_ctx", math.nan)
    return out


def metrics_at(run_id: str, step: int) -> dict[str, float]:
    """Every ``eval/`` metric of a run at ``step`` (MLflow's history)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("eval/"):
            values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
            if values:
                out[key.split("/", 1)[1]] = values[-1]
    return out


def demo_rows(run_ids: dict[str, str], seed: int) -> list[tuple[str, int, dict[str, float]]]:
    """The base (step 0 of the first run) and every arm's last evaluation, read back from MLflow."""
    first = next(iter(run_ids.values()))
    rows = [("base", seed, table_metrics(metrics_at(first, 0)))]
    rows += [(LABELS[arm], seed, table_metrics(final_metrics(rid))) for arm, rid in run_ids.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the config's)")
    p.add_argument("--lr", type=float, default=None, help="model.lr (default: the config's)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="demo_runs", help="per-run files and plots")
    p.add_argument("--experiment", default="games-world-demo", help="MLflow experiment name")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves a core for the rest
    start = time.time()
    rows, plots = [], []
    for seed in args.seeds:
        run_ids = {}
        for arm in args.arms:
            t0 = time.time()
            print(f"\n=== {arm} | game world | seed {seed} ===", flush=True)
            run_ids[arm] = fit_run([TASK, ARMS[arm]], seed, args.steps, Path(args.out) / f"games-{arm}-s{seed}",
                                   args.experiment, f"games-world-{arm}-s{seed}", args.lr)
            print(f"--- {arm} done in {time.time() - t0:.0f} s (MLflow run {run_ids[arm]})", flush=True)
        rows += demo_rows(run_ids, seed)
        plots.append(plot_runs({LABELS[a]: rid for a, rid in run_ids.items()},
                               Path(args.out) / f"games-pass-s{seed}.png", CURVES,
                               f"FrozenLake game world, seed {seed}: pass rates and harm over steps", "pass_rates"))
    print(f"\nBuilt-in experience into the built-in game base; sampled evaluation (temperature 0.7, top-p 0.8, "
          f"top-k 20) on the same held-out games at every row; total {time.time() - start:.0f} s\n")
    print(format_table(rows, COLUMNS, width=15))
    print("\nharm = share of games won without the experience that are lost when it is given back; turns = moves per "
          "game; invalid = invalid moves per move; reply = student tokens per move, without / with the experience; "
          "pass_oracle / pass_random = the exact solver / a random legal player on the same games. No retention "
          "column: the game world has one context, the experience.")
    for seed in args.seeds:
        base = next(m for label, s, m in rows if label == "base" and s == seed)
        for label, s, m in rows:
            if s == seed and label != "base":
                print(f"seed {seed}, {label}: pass_no_ctx {base['pass_no_ctx']:.3f} -> {m['pass_no_ctx']:.3f} "
                      f"({m['pass_no_ctx'] - base['pass_no_ctx']:+.3f})")
    print(f"Pass rates and harm over steps, all methods on one plot: {', '.join(map(str, plots))} (also in each run)")
    print_run_pointers(args.experiment)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
