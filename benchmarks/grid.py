"""Reproduce the paper-style table on the embedded rule world: OPD, anchored OPD, anchored OPD + retention and
OPCD's off-policy context-distillation baseline.

For every target context x seed it runs ``lightning-ctx fit`` once per method -- the world's task and model
(``builtin:tasks/world.yaml``, ``builtin:models/world_base.yaml``), the grid's evaluation and each method file
(``builtin:methods/{opd,anchored,anchored_retain,offpolicy_cd}.yaml``) -- all logged to one MLflow experiment, then
``lightning-ctx compare`` twice: averaged over seeds per target
(the paper table) and per (target, seed) (the "harm reduced in N of 12 configurations" and "retention >= 0.9
in N of 12" counts: 4 targets x 3 seeds). Both print every value with its 95% interval over items and every
difference to OPD with its paired interval (from each run's final per-example table), and each count twice: by the
point estimates and by the intervals.

    python benchmarks/grid.py --dry-run                      # print the commands
    python benchmarks/grid.py --jobs 2                       # run the grid, then compare
    python benchmarks/grid.py --targets SHOW ADD2 --seeds 0 1 --methods opd anchored -- --model.lr 1e-3

Every run gets the tags ``grid``, ``task``, ``target_context``, ``seed`` and ``method`` (``compare`` groups by
them; it tells the methods apart by the logged anchor, retain and OPD weights and the extra terms) and the run name
``<target>-<method>-s<seed>``. The config must log to MLflow (the CLI default);
``experiments/eval/grid.yaml`` (``--eval-config``) adds ``lightning_ctx.eval.ContextRemovabilityCallback``,
whose final ``eval/*`` metrics ``compare`` reads. ``--extra-config`` adds more YAML overlays; arguments
after ``--`` go to every fit.
With ``--skip-existing`` runs already FINISHED in the experiment (same run name) are not redone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ("builtin:tasks/world.yaml", "builtin:models/world_base.yaml")  # task and model, no evaluation
DEFAULT_EVAL_CONFIG = "experiments/eval/grid.yaml"  # adds ContextRemovabilityCallback (the eval/* metrics)
DEFAULT_TARGETS = ("SHOW", "ADD2", "REV", "ADD1 SHOW")
DEFAULT_SEEDS = (0, 1, 2)
METHODS = ("opd", "anchored", "anchored_retain", "offpolicy_cd")  # builtin:methods/<name>.yaml


@dataclass
class Job:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def cli_prefix() -> list[str]:
    """``lightning-ctx`` next to this interpreter (a venv), else ``python -m lightning_ctx.cli``."""
    exe = Path(sys.executable).parent / "lightning-ctx"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_ctx.cli"]


def resolve_config(path: str) -> str:
    """As given when it exists from the current directory (or is ``builtin:``), else relative to the repo root."""
    if path.startswith("builtin:") or Path(path).exists() or Path(path).is_absolute() or not (REPO / path).exists():
        return path
    return str(REPO / path)


def run_name(target: str, method: str, seed: int) -> str:
    return f"{target.replace(' ', '_')}-{method}-s{seed}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="base fit configs: the task and the model (default: %(default)s)")
    p.add_argument("--eval-config", default=DEFAULT_EVAL_CONFIG,
                   help="overlay that configures the evaluation callback ('' = none: the config has it; "
                        "default: %(default)s)")
    p.add_argument("--extra-config", action="append", default=[], metavar="YAML",
                   help="additional config overlays, applied after --config (repeatable)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help="target contexts (quote multi-word ones; default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="default: %(default)s")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="method files (builtin:methods/<name>.yaml); opd is the baseline (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the config's)")
    p.add_argument("--experiment", default="world-grid", help="MLflow experiment name (default: %(default)s)")
    p.add_argument("--grid-tag", default=None, help="value of the runs' 'grid' tag (default: the experiment name)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    p.add_argument("--threads-per-job", type=int, default=1,
                   help="OMP/MKL threads per run (default: %(default)s; 2 cores: 2 jobs x 1 thread)")
    p.add_argument("--out-dir", default="compare/world-grid", help="compare outputs (default: %(default)s)")
    p.add_argument("--log-dir", default=None, help="one log file per run (default: <out-dir>/logs)")
    p.add_argument("--skip-existing", action="store_true", help="skip runs already FINISHED in the experiment")
    p.add_argument("--skip-compare", action="store_true", help="only train")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra arguments for every fit")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.extra and args.extra[0] == "--":
        args.extra = args.extra[1:]
    if args.jobs < 1 or args.threads_per_job < 1:
        raise SystemExit("grid.py: --jobs and --threads-per-job must be >= 1")
    if "opd" not in args.methods or len(args.methods) < 2:
        raise SystemExit("grid.py: --methods needs opd (the baseline) and at least one other method")
    return args


def fit_jobs(args: argparse.Namespace) -> list[Job]:
    """One ``fit`` per (target, seed, method), targets outermost (a partial grid is still comparable)."""
    env = {"OMP_NUM_THREADS": str(args.threads_per_job), "MKL_NUM_THREADS": str(args.threads_per_job)}
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    grid = args.grid_tag or args.experiment
    jobs = []
    for target in args.targets:
        for seed in args.seeds:
            for method in args.methods:
                name = run_name(target, method, seed)
                tags = {"grid": grid, "task": "world", "target_context": target, "seed": str(seed), "method": method}
                argv = cli_prefix() + ["fit"]
                for config in [*args.config, *([args.eval_config] if args.eval_config else []),
                               f"builtin:methods/{method}.yaml", *args.extra_config]:
                    argv += ["--config", resolve_config(config)]
                argv += ["--data.task.target_context", target, "--seed_everything", str(seed),
                         "--trainer.logger.init_args.experiment_name", args.experiment,
                         "--trainer.logger.init_args.run_name", name,
                         "--trainer.logger.init_args.tags", _json(tags)]
                if args.steps is not None:
                    argv += ["--trainer.max_steps", str(args.steps)]
                argv += list(args.extra)
                jobs.append(Job(name, argv, dict(env)))
    return jobs


def compare_jobs(args: argparse.Namespace) -> list[Job]:
    """Seed-averaged table per target, then one configuration per (target, seed)."""
    base = cli_prefix() + ["compare", "--experiment", args.experiment, "--filter",
                           f"tags.grid = '{args.grid_tag or args.experiment}'"]
    if args.tracking_uri:
        base += ["--tracking-uri", args.tracking_uri]
    return [Job("compare", base + ["--out-dir", args.out_dir]),
            Job("compare-per-seed", base + ["--group-by", "task,target,model,seed",
                                            "--out-dir", str(Path(args.out_dir) / "per_seed")])]


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def finished_run_names(args: argparse.Namespace) -> set[str]:
    from mlflow import MlflowClient

    from lightning_ctx.tracking import default_tracking_uri

    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        return set()
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=10000)
    return {r.data.tags.get("mlflow.runName", "") for r in runs}


def prepare_store(args: argparse.Namespace) -> None:
    """Create the SQLite store and the experiment once, before parallel fits race to create them
    (two processes migrating one new SQLite file fail with 'duplicate column name')."""
    from mlflow import MlflowClient

    from lightning_ctx.tracking import MLflowLogger, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    if client.get_experiment_by_name(args.experiment) is None:
        location = MLflowLogger(experiment_name=args.experiment, tracking_uri=uri)._artifact_location
        client.create_experiment(args.experiment, artifact_location=location)


def _run(job: Job, log_dir: Path) -> tuple[Job, int, float]:
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with (log_dir / f"{job.name}.log").open("w") as fh:
        fh.write(job.shell() + "\n\n")
        fh.flush()
        rc = subprocess.run(job.argv, env={**os.environ, **job.env}, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    return job, rc, time.time() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    jobs = fit_jobs(args)
    compares = [] if args.skip_compare else compare_jobs(args)
    n_cfg = len(args.targets) * len(args.seeds)
    if args.dry_run:
        print(f"# {len(jobs)} fits: {len(args.targets)} targets x {len(args.seeds)} seeds "
              f"({n_cfg} configurations) x methods {args.methods}; {args.jobs} in parallel")
        for job in jobs + compares:
            print(job.shell())
        return 0
    for config in args.config:
        if not config.startswith("builtin:") and not Path(resolve_config(config)).exists():
            print(f"grid.py: config {config} not found", file=sys.stderr)
            return 2
    if args.skip_existing:
        done = finished_run_names(args)
        skipped = [j.name for j in jobs if j.name in done]
        jobs = [j for j in jobs if j.name not in done]
        if skipped:
            print(f"skipping {len(skipped)} finished runs: {', '.join(skipped)}")
    prepare_store(args)
    log_dir = Path(args.log_dir or Path(args.out_dir) / "logs")
    failed = []
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for i, (job, rc, secs) in enumerate(pool.map(lambda j: _run(j, log_dir), jobs), start=1):
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {log_dir / (job.name + '.log')})"
            print(f"[{i}/{len(jobs)}] {job.name}: {status} in {secs:.0f}s", flush=True)
            if rc != 0:
                failed.append(job.name)
    print(f"{len(jobs) - len(failed)} of {len(jobs)} fits succeeded in {time.time() - t0:.0f}s")
    rc = 1 if failed else 0
    for job in compares:
        print(f"\n$ {job.shell()}", flush=True)
        result = subprocess.run(job.argv, env={**os.environ, **job.env})
        rc = rc or result.returncode
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
