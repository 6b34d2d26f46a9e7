"""Bootstrap intervals over items: time and Monte-Carlo error per resample count, and coverage per item count.

    python benchmarks/bench_intervals.py                       # both parts
    python benchmarks/bench_intervals.py --part speed --reps 7
    python benchmarks/bench_intervals.py --part coverage --sims 1000
    python benchmarks/bench_intervals.py --part evaluation    # what one logged evaluation pays

Part 1 (speed). ``bootstrap`` of the five greedy removability metrics (``removability_items``) and of the eleven
sampled ones (``sampled_items``, k = 4 samples per item), for 100 / 1,000 / 10,000 items and 500 ... 10,000
resamples; per cell the median over ``--reps`` seeds of the wall and CPU time (``time.process_time``: the work
done, fairer on a shared machine), the time relative to the default resample count, and the Monte-Carlo error
of the interval: the standard deviation of ``harm``'s lower and upper endpoints over those seeds (same data),
as a fraction of the interval's width. Numpy's BLAS threads do not matter: the resample weights are multiplied
by numpy's own loop.

Part 2 (coverage). ``--sims`` simulated evaluations per item count with a known truth, at the default resample
count: the greedy ``harm`` (60% right without the context, a right item harmed with probability 0.25) and the
sampled ``harm_excess`` of a context with no effect (p ~ Beta(2, 2), q = p, k = 4: true value 0). Printed: how
often the 95% interval covers the truth, and how often it exists (enough resamples define the ratio).

Part 3 (evaluation). What one evaluation pays for its intervals: ``REMOVABILITY.measure`` (every registered metric
with its interval, as the evaluator logs them) on the world's tables (100 val items, 8 x 25 = 200 retention
items), greedy and with k = 4 samples per item, and ``GAMES.measure`` on 128 games; median wall and CPU time
over ``--reps`` runs at the default resample count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_ctx.eval.intervals import DEFAULT_RESAMPLES, bootstrap  # noqa: E402
from lightning_ctx.eval.item_metrics import removability_items, sampled_items  # noqa: E402


def greedy_eval(g: np.random.Generator, n: int):
    right0 = g.random(n) < 0.6
    u = g.random(n)
    return removability_items(right0, np.where(right0, u >= 0.25, u < 0.3))


def no_effect_sampled(g: np.random.Generator, n: int, k: int = 4):
    p = g.beta(2, 2, size=n)
    return sampled_items(g.random((n, k)) < p[:, None], g.random((n, k)) < p[:, None])


def speed(args) -> None:
    print(f"{'metrics':8} {'items':>6} {'resamples':>9} {'wall ms':>8} {'CPU ms':>8} {'x default':>9} "
          f"{'sd(lo)/width':>12} {'sd(hi)/width':>12}")
    for kind, make in (("greedy", greedy_eval), ("sampled", no_effect_sampled)):
        for n in args.items:
            metrics = make(np.random.default_rng(0), n)
            rows = []
            for b in args.resamples:
                wall, cpu, los, his, widths = [], [], [], [], []
                for seed in range(args.reps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    iv = bootstrap(metrics, n_resamples=b, seed=seed)["harm"]
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                    los.append(iv.lo)
                    his.append(iv.hi)
                    widths.append(iv.hi - iv.lo)
                width = statistics.mean(widths)
                rows.append((b, statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3,
                             statistics.stdev(los) / width, statistics.stdev(his) / width))
            ref = {b: c for b, _, c, _, _ in rows}.get(DEFAULT_RESAMPLES)
            for b, w, c, slo, shi in rows:
                rel = f"{c / ref:.2f}" if ref else "-"
                print(f"{kind:8} {n:>6} {b:>9} {w:>8.1f} {c:>8.1f} {rel:>9} {slo:>12.3f} {shi:>12.3f}")


def coverage(args) -> None:
    print(f"{'items':>6} {'harm covers 0.25':>16} {'has interval':>12} {'harm_excess covers 0':>20} "
          f"{'has interval':>12}   (of {args.sims} simulations, {DEFAULT_RESAMPLES} resamples)")
    for n in args.coverage_items:
        g = np.random.default_rng(n)
        hit_h = has_h = hit_x = has_x = 0
        for sim in range(args.sims):
            h = bootstrap({"harm": greedy_eval(g, n)["harm"]}, seed=sim)["harm"]
            x = bootstrap({"harm_excess": no_effect_sampled(g, n)["harm_excess"]}, seed=sim)["harm_excess"]
            has_h += np.isfinite(h.lo)
            hit_h += bool(h.lo <= 0.25 <= h.hi)
            has_x += np.isfinite(x.lo)
            hit_x += bool(x.lo <= 0.0 <= x.hi)
        print(f"{n:>6} {hit_h / args.sims:>16.3f} {has_h / args.sims:>12.3f} {hit_x / args.sims:>20.3f} "
              f"{has_x / args.sims:>12.3f}")


def world_rows(g: np.random.Generator, n: int = 100, n_ret: int = 200, k: int = 0):
    """Per-example rows shaped as the evaluator writes them (random flags and lengths)."""
    from lightning_ctx.eval.registry import ItemRows

    rows = []
    for i in range(n):
        row = {"index": i, "correct_no_ctx": bool(g.random() < 0.9), "correct_ctx": bool(g.random() < 0.6),
               "len_no_ctx": int(g.integers(2, 8)), "len_ctx": int(g.integers(2, 8)), "truncated_no_ctx": False,
               "truncated_ctx": bool(g.random() < 0.05)}
        for tag in ("no_ctx", "ctx") if k else ():
            row[f"sampled_correct_{tag}"] = (g.random(k) < 0.7).tolist()
            row[f"sampled_len_{tag}"] = g.integers(2, 8, k).tolist()
            row[f"sampled_truncated_{tag}"] = [False] * k
        rows.append(row)
    ret = [{"index": i, "correct": bool(g.random() < 0.8), "reference_correct": bool(g.random() < 0.95)}
           for i in range(n_ret)]
    return ItemRows(rows, ret)


def game_rows(g: np.random.Generator, n: int = 128):
    from lightning_ctx.eval.registry import ItemRows

    return ItemRows([{f"{c}_{tag}": v for tag in ("no_ctx", "ctx") for c, v in (
        ("passed", bool(g.random() < 0.4)), ("reward", float(g.random())), ("turns", int(g.integers(1, 9))),
        ("invalid_moves", int(g.integers(0, 3))), ("tokens", int(g.integers(20, 200))))} for _ in range(n)])


def evaluation(args) -> None:
    from lightning_ctx.eval.registry import REMOVABILITY
    from lightning_ctx.tasks.games.metrics import GAMES

    print(f"{'evaluation':34} {'metrics':>7} {'wall ms':>8} {'CPU ms':>8}   ({DEFAULT_RESAMPLES} resamples, "
          f"median of {args.reps})")
    cases = (("world greedy (100 + 200 retention)", REMOVABILITY, world_rows(np.random.default_rng(0))),
             ("world k=4 samples (100 + 200)", REMOVABILITY, world_rows(np.random.default_rng(0), k=4)),
             ("games (128 games)", GAMES, game_rows(np.random.default_rng(0))))
    for name, registry, rows in cases:
        wall, cpu = [], []
        for seed in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            out = registry.measure(rows, seed=seed)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        n_metrics = sum(1 for k in out if f"{k}_lo" in out)
        print(f"{name:34} {n_metrics:>7} {statistics.median(wall) * 1e3:>8.1f} {statistics.median(cpu) * 1e3:>8.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("speed", "coverage", "evaluation", "both"), default="both",
                   help="both = speed and coverage")
    p.add_argument("--items", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--resamples", type=int, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    p.add_argument("--reps", type=int, default=7, help="seeds per speed cell (time median, endpoint spread)")
    p.add_argument("--coverage-items", type=int, nargs="+", default=[20, 50, 100, 200, 500])
    p.add_argument("--sims", type=int, default=1000)
    args = p.parse_args(argv)
    if args.part in ("speed", "both"):
        speed(args)
    if args.part in ("coverage", "both"):
        coverage(args)
    if args.part == "evaluation":
        evaluation(args)


if __name__ == "__main__":
    main()
