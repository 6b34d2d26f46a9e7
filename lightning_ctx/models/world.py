"""The built-in tiny world model: word-level tokenizer, small HF causal LM, pretraining, evaluation.

* ``build_world_tokenizer()`` -- a ``PreTrainedTokenizerFast`` on a ``tokenizers`` WordLevel model with
  a whitespace pre-tokenizer over the world's symbols, special tokens ``<pad>`` / ``<bos>`` (defined,
  not emitted by the template) / ``<eot>`` (eos = end of turn) / ``<unk>`` and role markers, and a Jinja chat template in which the
  context is the system message. Load saved copies with ``PreTrainedTokenizerFast.from_pretrained``
  (not ``AutoTokenizer``: DESIGN section 7).
* ``build_world_model_config`` / ``build_world_model`` -- a ~3-layer, width-96 Qwen2 or Llama.
* ``WorldPretrainModule`` + ``pretrain_world`` -- a small Lightning job on all in-distribution
  contexts plus no-context items (whose target is a draw from the no-context mixture); loss on answer
  and ``<eot>`` tokens only.
* ``evaluate_world_model`` -- greedy accuracy per context on held-out inputs (``val`` + ``test`` pools,
  never seen in pretraining); ``no_context_report`` -- what the model does without a context.
* ``load_world_base()`` -- the shipped pretrained base in ``WORLD_BASE_DIR``.

Command line: ``python -m lightning_ctx.models.world --out DIR --seed 0`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch

from lightning_ctx.data import world as W
from lightning_ctx.data.render import left_pad
from lightning_ctx.models.scoring import eval_mode

WORLD_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "world_base"

PAD, BOS, EOT, UNK = "<pad>", "<bos>", "<eot>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOT, UNK) + ROLE_TOKENS

#: Rendered as ``<|system|> CONTEXT <|user|> PROMPT <|assistant|>`` (word-level tokens; no system part
#: without a context). Turns are delimited by the role markers; an assistant turn (the response) ends
#: with ``<eot>`` (the eos token). Short on purpose: every template token costs pretraining compute.
WORLD_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }} "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} <eot> "
    "{% else %}{{ raise_exception('world chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MAX_NEW_TOKENS = 8  # the longest answer (SHOW format) is 7 tokens + <eot>


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------

def build_world_tokenizer():
    """The world tokenizer (24 tokens). ``pad != eos``; ``decode`` joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + W.WORLD_SYMBOLS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece decoder = join tokens with single spaces (no '##' pieces exist here); no cleanup so
    # '=' keeps its spaces: decode([3, 1, 4, =, 5, 3, 6]) == "3 1 4 = 5 3 6".
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOT,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=WORLD_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
    assert tok.pad_token_id != tok.eos_token_id
    return tok


def render_messages(context: str | None, prompt: str) -> list[dict[str, str]]:
    """The package's rendering convention: the context (if non-empty) is the system message."""
    msgs = []
    if context is not None and context.strip():
        msgs.append({"role": "system", "content": context})
    msgs.append({"role": "user", "content": prompt})
    return msgs


def render_prompt_ids(tokenizer, context: str | None, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(render_messages(context, prompt), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Response ids for an answer: its tokens followed by ``<eot>``."""
    return list(tokenizer(answer, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def build_world_model_config(tokenizer=None, arch: str = "qwen2", layers: int = 3, width: int = 96, heads: int = 4,
                             kv_heads: int | None = None, intermediate: int | None = None,
                             max_position_embeddings: int = 64, rope_theta: float = 10000.0):
    """A small HF config (``Qwen2Config`` or ``LlamaConfig``) with tied embeddings."""
    from transformers import LlamaConfig, Qwen2Config

    tokenizer = tokenizer if tokenizer is not None else build_world_tokenizer()
    if width % heads:
        raise ValueError(f"width {width} must be divisible by heads {heads}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate or (8 * width) // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    raise ValueError(f"unknown arch {arch!r}; choose qwen2 or llama")


def build_world_model(tokenizer=None, seed: int | None = None, **config_kwargs):
    """A freshly initialised float32 world model (``config_kwargs`` go to ``build_world_model_config``)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tokenizer if tokenizer is not None else build_world_tokenizer()
    config = build_world_model_config(tokenizer, **config_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
    )
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings are counted once


def load_world_base(path: str | Path = WORLD_BASE_DIR):
    """``(model, tokenizer)`` of the shipped pretrained base (float32, eval mode, local files only)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no world model at {path}: run `python -m lightning_ctx.models.world --out {path}`")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# pretraining data
# --------------------------------------------------------------------------------------------------

class WorldBatches(torch.utils.data.IterableDataset):
    """Endless, seeded stream of pretraining batches (already collated; use ``batch_size=None``).

    Each item: with probability ``p_no_context`` no context and a target drawn from the no-context
    mixture; otherwise a context drawn uniformly from ``contexts`` (default ``ALL_CONTEXTS``) and its
    answer. Inputs come from the ``train`` pool only. Right-padded; ``labels`` are -100 on prompt and
    padding, so the loss covers answer tokens and ``<eot>`` (HF shifts labels internally).
    """

    def __init__(self, tokenizer, batch_size: int = 128, seed: int = 0, p_no_context: float = 0.45,
                 contexts: Sequence[str] | None = None, split: str = "train"):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.p_no_context = p_no_context
        self.contexts = list(contexts) if contexts is not None else list(W.ALL_CONTEXTS)
        self.inputs = W.split_inputs(split)
        self._prompt_table: dict[str, list[list[int]]] = {}
        self._answer_cache: dict[str, list[int]] = {}

    def _prompt_rows(self, context: str) -> list[list[int]]:
        # Render the context once with a sentinel prompt and splice the digit ids in between the ids
        # of the text before and after it (word-level tokens, so this is exact; checked against
        # render_prompt_ids on one input per context). ~100x faster than rendering every pair.
        sentinel = "\x00PROMPT\x00"
        text = self.tokenizer.apply_chat_template(render_messages(context, sentinel), add_generation_prompt=True,
                                                  tokenize=False)
        pre, post = (self.tokenizer(t, add_special_tokens=False).input_ids for t in text.split(sentinel))
        digit_ids = self.tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
        rows = [list(pre) + [digit_ids[d] for d in x] + list(post) for x in self.inputs]
        if rows[0] != render_prompt_ids(self.tokenizer, context, W.format_digits(self.inputs[0])):
            raise AssertionError("world prompt splicing disagrees with the chat template")
        return rows

    def _prompt(self, context: str, input_index: int) -> list[int]:
        if context not in self._prompt_table:
            self._prompt_table[context] = self._prompt_rows(context)
        return self._prompt_table[context][input_index]

    def _answer(self, answer: str) -> list[int]:
        if answer not in self._answer_cache:
            self._answer_cache[answer] = answer_ids(self.tokenizer, answer)
        return self._answer_cache[answer]

    def example(self, rng: random.Random) -> tuple[list[int], list[int]]:
        i = rng.randrange(len(self.inputs))
        x = self.inputs[i]
        if rng.random() < self.p_no_context:
            context = ""
            answer, _ = W.sample_no_context_answer(x, rng)
        else:
            context = self.contexts[rng.randrange(len(self.contexts))]
            answer = W.apply_context(context, x)
        return self._prompt(context, i), self._answer(answer)

    def collate(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(p) + len(a) for p, a in pairs)
        pad = self.tokenizer.pad_token_id
        ids, labels, mask = [], [], []
        for p, a in pairs:
            fill = width - len(p) - len(a)
            ids.append(p + a + [pad] * fill)
            labels.append([-100] * len(p) + a + [-100] * fill)
            mask.append([1] * (len(p) + len(a)) + [0] * fill)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(f"lightning_ctx.world.pretrain/{self.seed}")
        while True:
            yield self.collate([self.example(rng) for _ in range(self.batch_size)])


# --------------------------------------------------------------------------------------------------
# Lightning module
# --------------------------------------------------------------------------------------------------

class WorldPretrainModule(pl.LightningModule):
    """Pretrains the world model: next-token loss on answer + ``<eot>`` tokens, AdamW, warmup + cosine."""

    def __init__(self, arch: str = "qwen2", layers: int = 3, width: int = 96, heads: int = 4,
                 intermediate: int | None = None, lr: float = 5e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 100, max_steps: int = 1600, min_lr_ratio: float = 0.05, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = build_world_tokenizer()
        self.model = build_world_model(self.tokenizer, seed=seed, arch=arch, layers=layers, width=width, heads=heads,
                                       intermediate=intermediate)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=(0.9, 0.98))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            t = min(1.0, (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_responses(model, tokenizer, prompt_rows: list[list[int]], batch_size: int = 1024,
                       do_sample: bool = False, temperature: float = 1.0, max_new_tokens: int = MAX_NEW_TOKENS
                       ) -> list[tuple[str, bool]]:
    """Decode with the model's own ``generate`` (left padding). Returns ``(text, stopped_with_eot)``.

    The model is put in eval mode for the call and its previous mode is restored afterwards."""
    with eval_mode(model):
        return _generate(model, tokenizer, prompt_rows, batch_size, do_sample, temperature, max_new_tokens)


def _generate(model, tokenizer, prompt_rows, batch_size, do_sample, temperature, max_new_tokens):
    device = next(model.parameters()).device
    out: list[tuple[str, bool]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompt_rows), batch_size):
        ids, mask = left_pad(prompt_rows[start:start + batch_size], pad)
        kwargs: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row in gen[:, ids.shape[1]:].tolist():
            stopped = eos in row
            row = row[: row.index(eos)] if stopped else row
            out.append((tokenizer.decode(row, skip_special_tokens=True), stopped))
    return out


def heldout_records(context: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` held-out records (inputs never used in pretraining): half from ``val``, half from ``test``.

    With ``n = 200`` these are exactly the 200 held-out inputs."""
    n_val = (n + 1) // 2
    return W.make_records(context, n_val, seed, "val") + W.make_records(context, n - n_val, seed, "test")


@torch.no_grad()
def evaluate_world_model(model, tokenizer, contexts: Sequence[str] | None = None, n_per_context: int = 200,
                         seed: int = 0, batch_size: int = 1024) -> dict[str, Any]:
    """Greedy accuracy per context on held-out inputs (``world_verifier`` on decoded responses).

    Returns ``{"per_context": {ctx: {"acc", "n", "stopped"}}, "min_acc", "argmin", "mean_acc"}``.
    """
    contexts = list(contexts) if contexts is not None else list(W.ALL_CONTEXTS)
    items = [(c, r) for c in contexts for r in heldout_records(c, n_per_context, seed)]
    rows = [render_prompt_ids(tokenizer, c, r["prompt"]) for c, r in items]
    responses = generate_responses(model, tokenizer, rows, batch_size=batch_size)
    per: dict[str, dict[str, float]] = {c: {"right": 0, "n": 0, "stopped": 0} for c in contexts}
    for (c, r), (text, stopped) in zip(items, responses):
        per[c]["n"] += 1
        per[c]["right"] += int(W.world_verifier(text, r["answer"]))
        per[c]["stopped"] += int(stopped)
    table = {c: {"acc": v["right"] / max(1, v["n"]), "n": v["n"], "stopped": v["stopped"] / max(1, v["n"])}
             for c, v in per.items()}
    accs = {c: v["acc"] for c, v in table.items()}
    argmin = min(accs, key=accs.get) if accs else None
    return {"per_context": table, "min_acc": accs[argmin] if argmin else float("nan"), "argmin": argmin,
            "mean_acc": sum(accs.values()) / max(1, len(accs)), "n_per_context": n_per_context, "seed": seed}


@torch.no_grad()
def sequence_logprob(model, tokenizer, prompt_rows: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """log p(response | prompt) summed over response tokens, teacher-forced (right padding; float32)."""
    was_training = model.training
    model.eval()
    try:
        return _sequence_logprob(model, tokenizer, prompt_rows, responses)
    finally:
        model.train(was_training)


def _sequence_logprob(model, tokenizer, prompt_rows, responses):
    device = next(model.parameters()).device
    full = [p + r for p, r in zip(prompt_rows, responses)]
    width = max(len(f) for f in full)
    ids = torch.full((len(full), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    resp_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, f) in enumerate(zip(prompt_rows, full)):
        ids[i, :len(f)] = torch.tensor(f)
        mask[i, :len(f)] = 1
        resp_mask[i, len(p):len(f)] = True
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_lp = logp.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
    return (tok_lp * resp_mask[:, 1:].to(device)).sum(-1).cpu()


@torch.no_grad()
def no_context_answer_probs(model, tokenizer, prompt: str) -> dict[str, float]:
    """Exact model probability (teacher-forced, including ``<eot>``) of each mixture component's answer
    without a context: ``{"IDENTITY": p, "ADD1": p, ..., "SHOW": p}`` (``SHOW`` = the ``x = x`` answer).
    Components with coinciding answers (REV of a palindrome) get the same number."""
    comps = list(W.no_context_mixture())
    x = W.parse_digits(prompt)
    answers = [W.format_digits(x) if op == W.IDENTITY else W.apply_context(op, x) for op in comps]
    row = render_prompt_ids(tokenizer, None, prompt)
    lps = sequence_logprob(model, tokenizer, [row] * len(comps), [answer_ids(tokenizer, a) for a in answers])
    return {op: float(lp.exp()) for op, lp in zip(comps, lps)}


@torch.no_grad()
def no_context_report(model, tokenizer, n_prompts: int = 8, n_fit: int = 100, n_samples: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """What the model does *without* a context, on held-out inputs.

    * ``examples``: for ``n_prompts`` prompts, the greedy answer and the exact probability of each mixture
      component's answer (``no_context_answer_probs``). The target is identity 0.5, each hidden op
      (ADD1..4, REV, SHOW) 1/12 = 0.083.
    * ``mixture_fit`` over ``n_fit`` prompts: mean exact probability per component, ``valid_mass`` (total
      probability on answers the mixture can produce) and ``tv_distance`` (total variation between the
      model's and the target answer distributions; 0 = perfect).
    * ``greedy``: fraction of greedy answers per component over all 200 held-out prompts.
    * ``sampled``: fraction of temperature-1 samples per component (``n_samples`` over held-out prompts),
      plus ``show_format`` (any ``d d d = d d d`` answer) and ``other`` (matches no component).
    """
    mixture = W.no_context_mixture()
    comps = list(mixture)
    heldout = [r["prompt"] for r in heldout_records("SHOW", 200, seed)]  # context unused: just the inputs

    examples = []
    for prompt in heldout[:n_prompts]:
        greedy_text, _ = generate_responses(model, tokenizer, [render_prompt_ids(tokenizer, None, prompt)])[0]
        probs = no_context_answer_probs(model, tokenizer, prompt)
        examples.append({"prompt": prompt, "greedy": greedy_text, "prob": {k: round(v, 4) for k, v in probs.items()}})

    fit_prompts = heldout[:n_fit]
    mean_prob = {op: 0.0 for op in comps}
    valid, tv = 0.0, 0.0
    for prompt in fit_prompts:
        probs = no_context_answer_probs(model, tokenizer, prompt)
        x = W.parse_digits(prompt)
        by_answer: dict[str, float] = {}
        for op in comps:
            mean_prob[op] += probs[op] / len(fit_prompts)
            a = W.format_digits(x) if op == W.IDENTITY else W.apply_context(op, x)
            by_answer[a] = probs[op]  # coinciding answers: same sequence, same probability
        target = W.no_context_answer_distribution(x)
        mass = sum(by_answer.values())
        valid += mass / len(fit_prompts)
        tv += 0.5 * (sum(abs(by_answer[a] - target[a]) for a in target) + max(0.0, 1.0 - mass)) / len(fit_prompts)

    def fractions(texts_prompts):
        counts = {op: 0 for op in comps}
        counts.update(show_format=0, other=0)
        for text, prompt in texts_prompts:
            matched = W.classify_no_context_answer(prompt, text)
            for op in matched:
                counts[op] += 1
            if not matched:
                counts["other"] += 1
            parsed = W.parse_world_answer(text)
            if parsed is not None and "=" in parsed:
                counts["show_format"] += 1
        n = max(1, len(texts_prompts))
        return {k: round(v / n, 4) for k, v in counts.items()}

    rows = [render_prompt_ids(tokenizer, None, p) for p in heldout]
    greedy = generate_responses(model, tokenizer, rows)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    sample_prompts = [heldout[rng.randrange(len(heldout))] for _ in range(n_samples)]
    sampled = generate_responses(model, tokenizer, [render_prompt_ids(tokenizer, None, p) for p in sample_prompts],
                                 do_sample=True, temperature=1.0)
    return {
        "target_mixture": {k: round(v, 4) for k, v in mixture.items()},
        "mixture_fit": {"mean_prob": {k: round(v, 4) for k, v in mean_prob.items()}, "valid_mass": round(valid, 4),
                        "tv_distance": round(tv, 4), "n_prompts": len(fit_prompts)},
        "greedy": fractions([(t, p) for (t, _), p in zip(greedy, heldout)]),
        "sampled": fractions([(t, p) for (t, _), p in zip(sampled, sample_prompts)]),
        "n_greedy": len(heldout), "n_sampled": n_samples,
        "note": "fractions count an answer for every component it matches (e.g. REV of a palindrome is also "
                "IDENTITY), so they can sum to slightly more than 1",
        "examples": examples,
    }


# --------------------------------------------------------------------------------------------------
# pretraining entry point
# --------------------------------------------------------------------------------------------------

#: Tuned so that every context reaches >= 99% greedy accuracy on held-out inputs and the no-context
#: mixture is learnt (p_no_context 0.45: the hidden-op mixture is the slowest thing to learn; lower
#: shares left ADDk/REV without context unlearnt, see the report). threads=1: on the shared 2-core
#: machine a training step took 0.18 s with 1 thread and 1.35 s with 2 while another process was busy.
DEFAULTS = dict(arch="qwen2", layers=3, width=96, heads=4, intermediate=None, max_steps=1600, batch_size=128,
                lr=5e-3, weight_decay=0.1, warmup_steps=100, p_no_context=0.45, eval_n_per_context=200, threads=1)


def _command(output_dir, seed, **kw) -> str:
    parts = ["python", "-m", "lightning_ctx.models.world", "--out", str(output_dir), "--seed", str(seed)]
    for k, v in kw.items():
        if v is not None and v != DEFAULTS.get(k):
            parts += [f"--{k.replace('_', '-')}", str(v)]
    return shlex.join(parts)


def format_table(report: dict[str, Any]) -> str:
    ev = report["eval"]
    lines = [f"{'context':<18} {'acc':>7} {'n':>5}"]
    for c, v in ev["per_context"].items():
        lines.append(f"{c:<18} {v['acc']:>7.3f} {v['n']:>5d}")
    lines.append(f"min acc {ev['min_acc']:.4f} ({ev['argmin']}), mean acc {ev['mean_acc']:.4f}")
    nc = report.get("no_context")
    if nc:
        lines.append(f"no context, mixture fit: {nc['mixture_fit']}")
        lines.append(f"no context, greedy: {nc['greedy']}")
        lines.append(f"no context, sampled: {nc['sampled']}")
    lines.append(f"wall time: train {report['train_seconds']:.1f}s, total {report['total_seconds']:.1f}s")
    return "\n".join(lines)


def _loss_printer(every: int):
    class PrintLoss(pl.Callback):
        """Plain-text loss lines (for logs, when the progress bar is off)."""

        def __init__(self):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0 or step == trainer.max_steps:
                loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
                print(f"step {step:5d}/{trainer.max_steps}  loss {loss:.4f}  {time.perf_counter() - self.t0:6.1f}s",
                      flush=True)

    return PrintLoss()


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def pretrain_world(output_dir: str | Path, seed: int = 0, arch: str = "qwen2", max_steps: int = DEFAULTS["max_steps"],
                   batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], progress: bool = True,
                   layers: int = DEFAULTS["layers"], width: int = DEFAULTS["width"], heads: int = DEFAULTS["heads"],
                   intermediate: int | None = DEFAULTS["intermediate"],
                   weight_decay: float = DEFAULTS["weight_decay"],
                   warmup_steps: int = DEFAULTS["warmup_steps"], p_no_context: float = DEFAULTS["p_no_context"],
                   eval_n_per_context: int = DEFAULTS["eval_n_per_context"], threads: int | None = DEFAULTS["threads"],
                   command: str | None = None) -> dict[str, Any]:
    """Pretrain a world base, save it (safetensors + tokenizer + report.json) to ``output_dir``, return the report."""
    t0 = time.perf_counter()
    load_start = _loadavg()
    if threads:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    module = WorldPretrainModule(arch=arch, layers=layers, width=width, heads=heads, intermediate=intermediate, lr=lr,
                                 weight_decay=weight_decay, warmup_steps=warmup_steps, max_steps=max_steps, seed=seed)
    data = WorldBatches(module.tokenizer, batch_size=batch_size, seed=seed, p_no_context=p_no_context)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=1.0,
                         log_every_n_steps=50, callbacks=[] if progress else [_loss_printer(max(1, max_steps // 20))])
    trainer.fit(module, train_dataloaders=loader)
    train_seconds = time.perf_counter() - t0

    model, tokenizer = module.model.eval(), module.tokenizer
    ev = evaluate_world_model(model, tokenizer, W.ALL_CONTEXTS, eval_n_per_context, seed=seed)
    nc = no_context_report(model, tokenizer, seed=seed)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    total_seconds = time.perf_counter() - t0

    import lightning
    import transformers

    report = {
        "command": command or _command(output_dir, seed, arch=arch, layers=layers, width=width, heads=heads,
                                       intermediate=intermediate,
                                       max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                       warmup_steps=warmup_steps,
                                       p_no_context=p_no_context, eval_n_per_context=eval_n_per_context,
                                       threads=threads),
        "seed": seed,
        "model": {"arch": arch, "layers": layers, "width": width, "heads": heads,
                  "intermediate": model.config.intermediate_size, "vocab_size": model.config.vocab_size,
                  "parameters": count_parameters(model), "tie_word_embeddings": True,
                  "max_position_embeddings": model.config.max_position_embeddings},
        "training": {"max_steps": max_steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
                     "schedule": "linear warmup + cosine to 5%", "optimizer": f"AdamW(0.9, 0.98), weight decay {weight_decay} (matrices), grad clip 1.0",
                     "p_no_context": p_no_context, "train_inputs": "train pool (800 of 1000 inputs)",
                     "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))},
        "eval_protocol": (f"greedy decoding with model.generate (left padding), {eval_n_per_context} held-out "
                          "inputs per context (val + test pools, never seen in pretraining), all "
                          f"{len(W.ALL_CONTEXTS)} in-distribution contexts, world_verifier"),
        "eval": ev,
        "no_context": nc,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "hardware": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "machine": platform.machine(), "processor": platform.processor() or None,
                     "loadavg_1min_start": load_start, "loadavg_1min_end": _loadavg(),
                     "note": "wall times depend on other processes sharing the CPUs (see loadavg)"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lightning": lightning.__version__, "python": platform.python_version()},
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m lightning_ctx.models.world",
                                description="Pretrain the rule-world base model and print its per-context accuracy.")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, report.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["qwen2", "llama"], default=DEFAULTS["arch"])
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--width", type=int, default=DEFAULTS["width"])
    p.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8*width/3)")
    p.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"])
    p.add_argument("--p-no-context", type=float, default=DEFAULTS["p_no_context"])
    p.add_argument("--eval-n-per-context", type=int, default=DEFAULTS["eval_n_per_context"])
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads (0 = leave as is)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    report = pretrain_world(a.out, seed=a.seed, arch=a.arch, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                            progress=not a.no_progress, layers=a.layers, width=a.width, heads=a.heads,
                            intermediate=a.intermediate,
                            weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, p_no_context=a.p_no_context,
                            eval_n_per_context=a.eval_n_per_context, threads=a.threads or None,
                            command=shlex.join(["python", "-m", "lightning_ctx.models.world", *argv_list]))
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
