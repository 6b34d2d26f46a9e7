"""Single-GPU benchmark of the reference workload: per-phase times, tokens/s, MFU and peak memory.

    python benchmarks/bench_gpu.py                       # Qwen2-0.5B shape, bf16, hf + hf_static, OPD + anchored
    python benchmarks/bench_gpu.py --quick               # same shape, fewer/shorter steps (smoke run on a GPU)
    python benchmarks/bench_gpu.py --device cpu --quick  # tiny shape on the CPU: checks that the script works
    python benchmarks/bench_gpu.py --engines hf,hf_static,loop --json results.json

Reference workload (issue #5): Qwen2-0.5B shape with random weights (``Qwen2Config``), batch 16, prompt 128
tokens, context 256 tokens, 256 sampled tokens per prompt with no early stop (``min_new_tokens``), bf16.
Peer reference on one H200 (plain transformers loop): OPD step 6.54 s (generate 6.40 + teacher 0.03 + student
fwd/bwd 0.10), peak 28.0 GiB; anchored 7.89 s, peak 51.1 GiB; static-cache generate 0.99 s (first call 36 s).

Everything runs through the package's own code: ``OnPolicyDistillation.sample`` (the rollout engine),
``OnPolicyDistillation.compute_losses`` (teacher with context, student without, anchored term, chunked KLs with
``auto_chunk``), backward, then ``torch.optim.AdamW``. Phases are timed with ``torch.cuda.synchronize``
around them; the teacher phase by wrapping the module's ``_teacher_logits``. The rollout engine's
``warmup`` (static-cache compilation, CUDA graph capture) runs once per engine before the timed steps and is
reported on its own. Peak memory is ``torch.cuda.max_memory_allocated`` per step (and per phase).

MFU = model FLOPs / step time / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; pass ``--peak-tflops``
for another card). Model FLOPs per token and forward: ``2 * (non-embedding params) + 4 * layers * hidden *
attended length``, plus ``2 * hidden * vocab`` where the LM head runs (the last prompt token and every sampled
token in the rollout, the ``R + 1`` response positions in the scoring passes); backward = 2 x forward.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def build_checkpoint(root: Path, shape: dict, dtype: torch.dtype, seed: int = 0) -> str:
    """A random-init Qwen2 checkpoint plus the tiny word-level tokenizer (only its EOS/pad ids are used)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lightning_ctx.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer("qwen2")
    config = Qwen2Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root, safe_serialization=True)
    tok.save_pretrained(root)
    return str(root)


def make_batch(B: int, P: int, C: int, vocab: int, device, seed: int = 0):
    from lightning_ctx.data.batches import ContextPairBatch

    g = torch.Generator().manual_seed(seed)
    low = 16  # keep clear of the special ids of the tokenizer
    prompt = torch.randint(low, vocab, (B, P), generator=g)
    context = torch.randint(low, vocab, (B, C), generator=g)
    ctx_prompt = torch.cat([context, prompt], dim=1)
    batch = ContextPairBatch(prompt.to(device), torch.ones_like(prompt).to(device), ctx_prompt.to(device),
                             torch.ones_like(ctx_prompt).to(device), [str(i) for i in range(B)], ["c"] * B,
                             ["p"] * B, ["a"] * B)
    return batch


def model_flops(cfg: dict, B: int, P: int, C: int, R: int, anchored: bool) -> dict:
    d, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg["intermediate_size"]  # q, o, k, v, gate/up/down
    n = L * per_layer

    def fwd(tokens: int, attended: float, head_positions: int) -> float:
        return tokens * (2 * n + 4 * L * d * attended) + head_positions * 2 * d * V

    rollout = fwd(B * P, P / 2, B) + fwd(B * R, P + R / 2, B * R)
    teacher = fwd(B * (C + P + R), (C + P + R) / 2, B * (R + 1))
    student = 3 * fwd(B * (P + R), (P + R) / 2, B * (R + 1))
    if anchored:
        student += 3 * fwd(B * (C + P + R), (C + P + R) / 2, B * (R + 1))
    return {"rollout": rollout, "teacher": teacher, "student": student, "total": rollout + teacher + student}


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else float("nan")

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def run_config(module, batch, engine_name: str, anchored: bool, args, clock: Clock, optimizer) -> dict:
    from lightning_ctx.rollout import build_engine

    module.engine = build_engine(engine_name)
    module.hparams.anchor_weight = 0.5 if anchored else 0.0
    t0 = clock.now()
    warm = module.engine.warmup(module.student, batch.prompt_ids.shape[0], batch.ctx_prompt_ids.shape[1],
                                module.sampling, module.eos_token_ids, module.pad_token_id) \
        if hasattr(module.engine, "warmup") else 0.0
    warm_s = clock.now() - t0
    teacher_times: list[float] = []
    real_teacher = type(module)._teacher_logits

    def timed_teacher(inputs):
        a = clock.now()
        out = real_teacher(module, inputs)
        teacher_times.append(clock.now() - a)
        return out

    module._teacher_logits = timed_teacher
    steps = []
    try:
        for i in range(args.steps + args.skip):
            clock.reset_peak()
            a = clock.now()
            rollout = module.sample(batch.prompt_ids, batch.prompt_mask)
            b = clock.now()
            peak_rollout = clock.peak()
            terms = module.compute_losses(batch, rollout)
            terms["loss"].backward()
            c = clock.now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            d = clock.now()
            if i < args.skip:
                continue
            steps.append({"rollout_s": b - a, "teacher_s": teacher_times[-1], "student_fwd_bwd_s": c - b -
                          teacher_times[-1], "optimizer_s": d - c, "step_s": d - a, "peak_gib": clock.peak(),
                          "peak_rollout_gib": peak_rollout, "tokens": rollout.num_tokens,
                          "loss": float(terms["loss"])})
    finally:
        del module._teacher_logits
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0] if k != "loss"}
    med["warmup_s"] = warm_s
    med["warmup_engine_s"] = warm
    med["loss_last"] = steps[-1]["loss"]
    return med


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer and shorter steps (tiny shape on a CPU)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--skip", type=int, default=1, help="untimed steps after the engine warm-up")
    p.add_argument("--engines", default="hf,hf_static")
    p.add_argument("--modes", default="opd,anchored")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default="bench_gpu_results.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for a CPU smoke run")
    shape = dict(QWEN2_05B)
    if device.type == "cpu":
        torch.set_num_threads(1)
        if args.quick:
            shape = dict(TINY)
            args.batch, args.prompt, args.context, args.new, args.steps, args.skip = 2, 8, 8, 8, 1, 0
            args.dtype = "float32"
    elif args.quick:
        args.new, args.steps = min(args.new, 64), 1
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]

    from lightning_ctx.loss import auto_chunk_size
    from lightning_ctx.module import OnPolicyDistillation

    clock = Clock(device)
    results = {"args": vars(args), "shape": shape, "torch": torch.__version__, "python": platform.python_version(),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or "cpu", "configs": {}}
    import transformers

    results["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_checkpoint(Path(tmp), shape, dtype)
        module = OnPolicyDistillation(student=path, dtype=args.dtype, max_new_tokens=args.new, lr=1e-5,
                                      rollout_warmup=False)
        module.sampling.min_new_tokens = args.new  # no early stop
        module.to(device)
        results["setup_s"] = time.perf_counter() - t0
    results["params"] = sum(p.numel() for p in module.student.parameters())
    results["loss_chunk"] = module.objective.chunk_for(args.batch)
    results["auto_chunk_rule"] = auto_chunk_size(args.batch, module.vocab_size)
    batch = make_batch(args.batch, args.prompt, args.context, shape["vocab_size"], device)
    optimizer = torch.optim.AdamW([p for p in module.student.parameters() if p.requires_grad], lr=1e-5)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = results["device_name"]
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results["peak_tflops"] = peak

    for engine in args.engines.split(","):
        for mode in args.modes.split(","):
            anchored = mode == "anchored"
            r = run_config(module, batch, engine, anchored, args, clock, optimizer)
            fl = model_flops(shape, args.batch, args.prompt, args.context, args.new, anchored)
            r["model_tflop_per_step"] = fl["total"] / 1e12
            r["mfu"] = fl["total"] / r["step_s"] / (peak * 1e12) if peak else None
            r["mfu_rollout"] = fl["rollout"] / r["rollout_s"] / (peak * 1e12) if peak else None
            r["sampled_tokens_per_s"] = args.batch * args.new / r["step_s"]
            r["decode_tokens_per_s"] = args.batch * args.new / r["rollout_s"]
            results["configs"][f"{engine}/{mode}"] = r
            print(f"done {engine}/{mode}: step {r['step_s']:.3f} s", flush=True)

    print(f"\n{results['device_name']}, torch {results['torch']}, transformers {results['transformers']}; "
          f"{results['params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch}, prompt {args.prompt}, "
          f"context {args.context}, {args.new} new tokens; loss chunk {results['loss_chunk']}")
    cols = ["step_s", "rollout_s", "teacher_s", "student_fwd_bwd_s", "optimizer_s", "warmup_s", "decode_tokens_per_s",
            "sampled_tokens_per_s", "mfu", "mfu_rollout", "peak_gib", "peak_rollout_gib"]
    print("| engine/mode | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, r in results["configs"].items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("n/a" if v is None or v != v else (f"{v:.1%}" if c.startswith("mfu") else
                                                            f"{v:.0f}" if "tokens" in c else f"{v:.3f}"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
