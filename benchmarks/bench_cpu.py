"""CPU benchmark: our OPD step vs TRL's on-policy ``DistillationTrainer``, and the loss's peak memory.

    python benchmarks/bench_cpu.py                 # both parts (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --part speed --reps 5 --steps 12
    python benchmarks/bench_cpu.py --part memory

Part 1 (speed). One tiny random Qwen2-architecture checkpoint (``save_tiny_checkpoint``), the same workload
through both trainers, alternating, ``--reps`` fresh runs each: batch ``--batch`` prompts, exactly
``--new`` sampled tokens per prompt (``min_new_tokens`` in our sampling settings and in TRL's
``generation_kwargs``: no early stop on either side), ours once per rollout engine in ``--engines``
(``hf`` = ``generate``, as TRL uses; ``loop`` = our lean decode loop), fully on-policy (TRL 1.16's
``DistillationTrainer`` always samples from the student, i.e. GKD's lmbda = 1), reverse KL (TRL
``beta=1``, ours ``divergence=reverse_kl``), full vocabulary, fp32, AdamW at the same lr, no gradient
clipping, no gradient checkpointing (TRL defaults it on; turned off for parity), one thread each. A step is
timed from the trainer's step-begin to step-end hook (rollout + teacher + student forward/backward +
optimizer), in wall time and in CPU time of the process (``time.process_time``; one thread, so CPU time
is the work done and does not count time spent waiting for a core that another process holds: on a shared
machine it is the fairer measure). The first ``--skip`` steps of each run are dropped. Differences that
remain: our teacher
scores with the one-token context (the point of context distillation; TRL's teacher sees the prompt
only) and ours runs under a Lightning ``Trainer``, TRL's under an HF ``Trainer``.

Part 2 (memory). The full loss (reverse-KL OPD + anchored consistency) on random logits with V = 32768,
forward + backward, unchunked vs chunked, each in a fresh subprocess. Measured as RSS growth over the RSS
just before the loss (``/proc/self/statm``) and peak RSS (``VmHWM``, reset just before the loss by writing
5 to ``/proc/self/clear_refs``; Linux only), with ``MALLOC_MMAP_THRESHOLD_``
lowered so every freed block goes back to the OS and RSS tracks live tensor memory (``tracemalloc`` does not
see torch's allocations; ``saved_tensors_hooks`` are blind inside the chunks' checkpoint regions, whose own
hooks take precedence, so they would report 0 for any chunked setting). Reported: memory the graph holds
after the forward, the forward peak, the forward + backward peak, and that peak minus the two
``[B, T, V]`` gradients w.r.t. the input logits, which any method that returns logit gradients must hold.

``trl`` is the ``bench`` extra (``pip install -e '.[bench]'``); without it part 1 runs ours only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------ speed


def make_checkpoint(root: Path, width: int, layers: int) -> str:
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint(root / "tiny", "qwen2", layers=layers, width=width, seed=0))


def make_prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(str(int(d)) for d in torch.randint(10, (3,), generator=g)) for _ in range(n)]


def run_ours(path: str, prompts: list[str], args, workdir: Path, engine: str) -> tuple[list[float], float]:
    import lightning.pytorch as pl

    from lightning_ctx.data.datamodule import TaskDataModule
    from lightning_ctx.data.task import JSONLTask
    from lightning_ctx.module import OnPolicyDistillation

    train = workdir / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"r{i}", "context": "ADD2", "prompt": p, "answer": p}) + "\n"
                             for i, p in enumerate(prompts)))
    times: list[tuple[float, float]] = []
    lengths: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append((time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]))
            lengths.append(pl_module._last_tokens / len(batch))

    module = OnPolicyDistillation(student=path, anchor_weight=args.anchor, max_new_tokens=args.new, lr=1e-4,
                                  rollout_engine=engine)
    module.sampling.min_new_tokens = args.new  # no early stop: every row decodes exactly `new` tokens
    dm = TaskDataModule(JSONLTask(train_file=str(train)), tokenizer=path, batch_size=args.batch, shuffle=True, seed=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.skip + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(module, datamodule=dm)
    return times[args.skip:], statistics.mean(lengths[args.skip:])


def run_trl(path: str, prompts: list[str], args, workdir: Path, engine: str = "") -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from lightning_ctx.models.loading import load_causal_lm, load_tokenizer

    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = (time.perf_counter(), time.process_time())

        def on_step_end(self, a, state, control, **kw):
            times.append((time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]))

    tok = load_tokenizer(path)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    config = DistillationConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch, max_steps=args.skip + args.steps,
        learning_rate=1e-4, beta=1.0, temperature=1.0, max_completion_length=args.new,
        generation_kwargs={"min_new_tokens": args.new}, bf16=False, gradient_checkpointing=False, use_cpu=True,
        max_grad_norm=0.0, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=load_causal_lm(path), teacher_model=load_causal_lm(path), args=config,
                                  train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return times[args.skip:], statistics.mean(lengths[args.skip:]) if lengths else float("nan")


def speed(args) -> dict:
    torch.set_num_threads(1)
    try:
        import trl  # noqa: F401

        have_trl = True
    except ImportError:
        have_trl = False
        print("trl is not installed (pip install -e '.[bench]'): timing ours only")
    names = [f"ours-{e}" for e in args.engines.split(",")] + (["trl"] if have_trl else [])
    results: dict[str, list] = {n: [] for n in names}
    lens: dict[str, list] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = make_checkpoint(tmp, args.width, args.layers)
        prompts = make_prompts(args.batch * (args.skip + args.steps))
        for rep in range(args.reps):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                fn = run_trl if name == "trl" else run_ours
                t, mean_len = fn(path, prompts, args, tmp, name.split("-", 1)[-1])
                results[name].append(t)
                lens[name].append(mean_len)
                print(f"rep {rep} {name:>10}: median step {statistics.median(x[0] for x in t):.4f} s wall, "
                      f"{statistics.median(x[1] for x in t):.4f} s CPU over {len(t)} steps "
                      f"(response length {mean_len:.1f})", flush=True)
    summary = {"config": vars(args), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    for name in names:
        wall = [x[0] for run in results[name] for x in run]
        cpu = [x[1] for run in results[name] for x in run]
        summary[name] = {"median_step_wall_s": statistics.median(wall), "median_step_cpu_s": statistics.median(cpu),
                         "rep_medians_wall_s": [statistics.median(x[0] for x in run) for run in results[name]],
                         "rep_medians_cpu_s": [statistics.median(x[1] for x in run) for run in results[name]],
                         "tokens_per_cpu_s": args.batch * args.new / statistics.median(cpu),
                         "mean_response_len": statistics.mean(lens[name])}
    print(f"\nworkload: tiny qwen2 (width {args.width}, {args.layers} layers, vocab ~80), batch {args.batch}, "
          f"{args.new} new tokens/prompt, {args.reps} reps x {args.steps} timed steps (+{args.skip} skipped), "
          f"our anchor_weight {args.anchor}; load average during the run {summary['load_avg'][0]:.1f}")
    print("| trainer (rollout engine) | median step, CPU time (s) | rep medians (CPU s) | median step, wall (s) | "
          "sampled tokens per CPU s | response len | ratio to TRL (CPU / wall) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    trl = summary.get("trl")
    for name in names:
        r = summary[name]
        ratio = "-"
        if trl:
            r["ratio_to_trl_cpu"] = r["median_step_cpu_s"] / trl["median_step_cpu_s"]
            r["ratio_to_trl_wall"] = r["median_step_wall_s"] / trl["median_step_wall_s"]
            ratio = f"{r['ratio_to_trl_cpu']:.3f} / {r['ratio_to_trl_wall']:.3f}"
        reps = ", ".join(f"{x:.4f}" for x in r["rep_medians_cpu_s"])
        print(f"| {name} | {r['median_step_cpu_s']:.4f} | {reps} | {r['median_step_wall_s']:.4f} | "
              f"{r['tokens_per_cpu_s']:.0f} | {r['mean_response_len']:.1f} | {ratio} |")
    if trl:
        best = min(summary[n]["ratio_to_trl_cpu"] for n in names if n != "trl")
        print(f"best ours/TRL (CPU time) = {best:.3f} (target <= 0.8: {'met' if best <= 0.8 else 'not met'})")
    return summary


# ----------------------------------------------------------------------------------------- memory


def _loss_child(B: int, T: int, V: int, chunk: int | None, anchor: float) -> dict:
    """Runs in a fresh process: build inputs, then measure one forward + backward of the loss (bytes)."""
    from lightning_ctx import objectives

    torch.set_num_threads(1)

    def loss_fn(s, t, q, mask, c):
        loss = objectives.token_divergence(s, t, mask, chunk_size=c)
        if anchor > 0:
            loss = loss + anchor * objectives.anchored_consistency(s, q, mask, chunk_size=c)
        return loss

    # Warm-up on tiny tensors: the first checkpointed call imports and initialises ~70 MiB of code and
    # state once per process, which would otherwise be billed to the chunked settings.
    for c in (None, 2):
        a, b = torch.randn(2, 4, 50, requires_grad=True), torch.randn(2, 4, 50, requires_grad=True)
        loss_fn(a, torch.randn(2, 4, 50), b, torch.ones(2, 4, dtype=torch.bool), c).backward()

    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g).requires_grad_()
    t = torch.randn(B, T, V, generator=g)
    q = torch.randn(B, T, V, generator=g).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T // 2:] = False

    def rss_now() -> int:  # current RSS (Linux)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_now() -> int:  # peak RSS since the last reset (VmHWM)
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS to the current RSS (Linux >= 4.0)
        fh.write("5")
    base = rss_now()
    loss = loss_fn(s, t, q, mask, chunk)
    kept = rss_now() - base  # what the graph holds for backward
    peak_fwd = peak_now() - base
    loss.backward()
    peak = peak_now() - base
    grads = s.grad.nbytes + (q.grad.nbytes if anchor > 0 else 0)
    return {"loss": float(loss), "kept_after_forward": kept, "peak_forward": peak_fwd, "peak": peak,
            "grad_bytes": grads}


def memory(args) -> dict:
    B, T, V = args.mem_batch, args.mem_len, args.vocab
    from lightning_ctx.loss import auto_chunk_size

    auto = auto_chunk_size(B, V, 256)
    configs = [("unchunked", None), (f"auto (256 MiB budget): chunk {auto}", auto), ("chunk 32", 32),
               ("chunk 8", 8)]
    block = B * T * V * 4
    out = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    for name, chunk in configs:
        code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_cpu import _loss_child; "
                f"print(json.dumps(_loss_child({B}, {T}, {V}, {chunk!r}, {args.anchor_mem})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2 ** 20
    base = out["unchunked"]
    base_net = base["peak"] - base["grad_bytes"]
    print(f"\nloss memory: B={B}, T={T}, V={V} (one float32 [B, T, V] block = {block / mib:.0f} MiB), "
          f"reverse-KL OPD + {args.anchor_mem} x anchored consistency, forward + backward; RSS growth in MiB")
    print("| setting | loss | held after forward | peak forward | peak fwd+bwd | peak minus the input grads "
          "| ratio to unchunked (total / minus grads) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in out.items():
        net = r["peak"] - r["grad_bytes"]
        print(f"| {name} | {r['loss']:.6f} | {r['kept_after_forward'] / mib:.0f} | {r['peak_forward'] / mib:.0f} | "
              f"{r['peak'] / mib:.0f} | {net / mib:.0f} | {r['peak'] / base['peak']:.3f} / "
              f"{net / max(base_net, 1):.3f} |")
    chunked = [r for name, r in out.items() if name != "unchunked"]
    best_total = min(r["peak"] for r in chunked) / base["peak"]
    best_net = min(r["peak"] - r["grad_bytes"] for r in chunked) / max(base_net, 1)
    print(f"chunked / unchunked peak: {best_total:.3f} including the two [B, T, V] input-gradient buffers, "
          f"{best_net:.3f} without them (target <= 0.25)")
    return {"B": B, "T": T, "V": V, "results": out, "best_ratio_total": best_total, "best_ratio_net": best_net}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "speed", "memory"], default="all")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--skip", type=int, default=2, help="untimed first steps per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new", type=int, default=32, help="sampled tokens per prompt")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--engines", default="hf,loop", help="our rollout engines to time (comma-separated)")
    p.add_argument("--anchor", type=float, default=0.0, help="our anchor_weight in the speed part (0 = OPD)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--mem-len", type=int, default=128)
    p.add_argument("--anchor-mem", type=float, default=0.5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = {}
    if args.part in ("all", "speed"):
        results["speed"] = speed(args)
    if args.part in ("all", "memory"):
        results["memory"] = memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
