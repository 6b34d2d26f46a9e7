"""The paper's 8 system-prompt settings (``experiments/paper/sys_{medmcqa,safety}_*.yaml``) in one command.

For each setting whose model folders exist (and that this machine can hold: a CUDA GPU with ~80 GB) it runs
``lightning-ctx fit`` twice -- anchored OPD (the config) and the OPD baseline (``+ builtin:methods/opd.yaml``) --,
one after the other, into the MLflow experiment ``paper-sys``; settings it cannot run are listed with the reason.
Then it prints the paper-style table: ``lightning-ctx compare`` over OPCD's sampled evaluation
(``eval/sampled/*``), each run reduced to the mean of its 3 best evaluation steps chosen by ``acc_no_ctx`` (OPCD
reports the mean of the 3 best checkpoints; its student is evaluated without the system prompt).

    python benchmarks/paper.py --dry-run                       # what would run, what is skipped and why
    python benchmarks/paper.py --models-root /models           # real runs (folders /models/Llama-3.1-8B-Instruct, ...)
    python benchmarks/paper.py --smoke                          # CPU: every setting on tiny stand-ins, 2 steps
    python benchmarks/paper.py --only sys_safety_qwen2.5_7b -- --data.max_eval_items 200

``--smoke`` replaces each model by a tiny random checkpoint of its architecture family (Llama / Qwen2; a deeper
Qwen2 as the cross-size teacher) and applies the CPU smoke overrides (2 steps, 8 new tokens, batch 2, fp32);
its runs go to the experiment ``paper-sys-smoke``. Its numbers mean nothing (8 tokens cannot close an
``<answer>`` tag): it checks that all 16 runs go through and the table is produced. Arguments after ``--`` go
to every fit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "experiments" / "paper"
DATA = REPO / "experiments" / "data"
TASKS = ("medmcqa", "safety")
MODELS = ("llama3.1_8b", "llama3.2_3b", "qwen2.5_7b", "qwen2.5_3b_from_7b")
SETTINGS = [f"sys_{t}_{m}" for t in TASKS for m in MODELS]
METHODS = {"anchored": [], "opd": ["--config", "builtin:methods/opd.yaml"]}
SMOKE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.max_steps", "2", "--model.max_new_tokens", "8", "--data.batch_size", "2"]
GPU_GB = 75  # "one 80 GB GPU" (an H100 reports ~79 GiB)
COMPARE = ["--group-by", "tags.task,tags.model", "--metric-prefix", "eval/sampled/", "--best-k", "3",
           "--best-by", "acc_no_ctx", "--metrics", "acc_no_ctx,acc_ctx,harm,help,len_inflation"]


def cli_prefix() -> list[str]:
    exe = Path(sys.executable).parent / "lightning-ctx"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_ctx.cli"]


def model_paths(setting: str, models_root: Optional[str]) -> dict[str, str]:
    """``student`` (and ``teacher``) of a setting: its model file's paths, re-rooted under ``models_root``."""
    model_key = setting.split("_", 2)[2]
    cfg = yaml.safe_load((PAPER.parent / "models" / f"{model_key}.yaml").read_text())["model"]
    out = {k: cfg[k] for k in ("student", "teacher") if cfg.get(k)}
    if models_root:
        out = {k: str(Path(models_root) / Path(v).name) for k, v in out.items()}
    return out


def gpu_memory_gb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1e9
    except Exception:
        pass
    return 0.0


def why_not(paths: dict[str, str], gpu_gb: float) -> Optional[str]:
    """Why a real setting cannot run here (None = it can)."""
    missing = [f"{k} {v}" for k, v in paths.items() if not (Path(v) / "config.json").exists()]
    if missing:
        return "model folder missing: " + ", ".join(missing)
    if gpu_gb < GPU_GB:
        return f"needs one ~80 GB GPU (found {'none' if gpu_gb == 0 else f'{gpu_gb:.0f} GB'})"
    return None


def build_stand_ins(root: Path) -> dict[str, str]:
    """Tiny Llama / Qwen2 checkpoints whose vocabulary covers the shipped samples and prompts."""
    from lightning_ctx.models.tiny import save_tiny_checkpoint
    from lightning_ctx.tasks.mcqa import SysMCQATask
    from lightning_ctx.tasks.safety import SafetyTask

    words: set[str] = set()
    for task, cls in (("medmcqa", SysMCQATask), ("safety", SafetyTask)):
        data = cls(train_file=str(DATA / f"sys_{task}_train_sample.jsonl"),
                   val_file=str(DATA / f"sys_{task}_test_sample.jsonl"),
                   system_prompt_file=str(DATA / f"sys_{task}_prompt.txt"))
        for split in ("train", "val"):
            words |= {w for r in data.load(split) for w in (r.context + " " + r.prompt).split()}
    extra = sorted(words)
    return {"llama": str(save_tiny_checkpoint(root / "llama", "llama", seed=2, extra_words=extra)),
            "qwen2": str(save_tiny_checkpoint(root / "qwen2", "qwen2", seed=2, extra_words=extra)),
            "qwen2_teacher": str(save_tiny_checkpoint(root / "qwen2_teacher", "qwen2", layers=3, seed=5,
                                                      extra_words=extra))}


def smoke_paths(setting: str, stand_ins: dict[str, str]) -> dict[str, str]:
    out = {"student": stand_ins["llama" if "llama" in setting else "qwen2"]}
    if "from_7b" in setting:
        out["teacher"] = stand_ins["qwen2_teacher"]
    return out


def fit_argv(setting: str, method: str, paths: dict[str, str], experiment: str, extra: Sequence[str],
             smoke: bool) -> list[str]:
    argv = [*cli_prefix(), "fit", "--config", str(PAPER / f"{setting}.yaml"), *METHODS[method]]
    for k, v in paths.items():
        argv += [f"--model.{k}", v]
    argv += ["--trainer.logger.init_args.experiment_name", experiment,
             "--trainer.logger.init_args.run_name", f"{setting}-{method}"]
    return argv + (SMOKE if smoke else []) + list(extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/paper.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-root", default=None,
                   help="folder holding the model folders (default: the paths written in experiments/models)")
    p.add_argument("--smoke", action="store_true", help="every setting on tiny CPU stand-ins, 2 steps")
    p.add_argument("--only", nargs="+", default=None, choices=SETTINGS, metavar="SETTING", help="these settings only")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--dry-run", action="store_true", help="print what would run and what is skipped")
    p.add_argument("--no-compare", action="store_true", help="skip the table")
    p.add_argument("extra", nargs="*", help="after --: arguments for every fit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = args.only or SETTINGS
    experiment = "paper-sys-smoke" if args.smoke else "paper-sys"
    jobs, skipped = [], []
    workdir = tempfile.TemporaryDirectory(prefix="paper-stand-ins-") if args.smoke and not args.dry_run else None
    stand_ins = build_stand_ins(Path(workdir.name)) if workdir else {
        "llama": "<tiny-llama>", "qwen2": "<tiny-qwen2>", "qwen2_teacher": "<tiny-qwen2-teacher>"}
    gpu_gb = gpu_memory_gb()
    for setting in settings:
        if args.smoke:
            paths = smoke_paths(setting, stand_ins)
        else:
            paths = model_paths(setting, args.models_root)
            reason = why_not(paths, gpu_gb)
            if reason:
                skipped.append((setting, reason))
                continue
        jobs += [(f"{setting}-{m}", fit_argv(setting, m, paths, experiment, args.extra, args.smoke))
                 for m in args.methods]
    for setting, reason in skipped:
        print(f"skipped {setting}: {reason}")
    print(f"{len(jobs)} run(s) to do ({len(skipped)} of {len(settings)} setting(s) skipped)"
          + ("; CPU smoke on tiny stand-ins" if args.smoke else ""))
    compare = [*cli_prefix(), "compare", "--experiment", experiment, *COMPARE, "--out-dir", f"compare/{experiment}"]
    if args.dry_run:
        for name, job in jobs:
            print(f"[{name}] " + " ".join(job))
        print("[compare] " + " ".join(compare))
        return 0
    failed = []
    for name, job in jobs:
        t0 = time.perf_counter()
        rc = subprocess.run(job, cwd=REPO).returncode
        print(f"[{name}] exit {rc} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if workdir is not None:
        workdir.cleanup()
    if jobs and not args.no_compare:
        subprocess.run(compare, cwd=REPO)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
