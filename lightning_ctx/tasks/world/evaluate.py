"""Evaluating a rule-world model: greedy accuracy per context on held-out inputs, and what it does
without a context (the no-context mixture it should have learnt)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from lightning_ctx.data.render import left_pad
from lightning_ctx.models.scoring import eval_mode
from lightning_ctx.tasks.world import rules as W
from lightning_ctx.tasks.world.tokenizer import MAX_NEW_TOKENS, answer_ids, render_prompt_ids


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
