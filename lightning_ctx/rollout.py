"""On-policy sampling from the student (no context): left-padded prompts, KV cache, response masks.

The response mask covers every token up to and including the first EOS and nothing after it. It is
built from EOS positions, never from ``pad_token_id``, so it stays right when ``pad == eos`` (a peer
bug: masking every EOS-valued token teaches the student never to stop).

Engines: ``hf`` (``generate`` with the dynamic KV cache) and ``hf_static`` (static KV cache; with
``compile=True`` the decode step is compiled, which pays off on a GPU). A new engine (e.g. vLLM) is a
class with ``generate(model, prompt_ids, prompt_mask, settings) -> Tensor[B, P+R]`` registered in
``ENGINES``; it must sample from the current student weights (sync them before each call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol

import torch


@dataclass
class SamplingSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature} (use greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    """Sampled responses. ``response_ids`` is right-padded with ``pad_token_id`` after the first EOS."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] bool: tokens up to and including the first EOS
    lengths: torch.Tensor  # [B] response tokens counted by the mask
    finished: torch.Tensor  # [B] bool: an EOS was produced (False = truncated at max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask through the first EOS (inclusive); returns ``(mask, lengths, finished)``."""
    eos = torch.as_tensor(list(eos_token_ids), device=response_ids.device)
    is_eos = torch.isin(response_ids, eos)
    # Count EOS tokens strictly before each position: a position is kept while none was seen.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    finished = is_eos.any(dim=1)
    return mask, mask.sum(dim=1), finished


class RolloutEngine(Protocol):
    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings,
                 eos_token_ids: list[int], pad_token_id: int) -> torch.Tensor: ...


class HFGenerateEngine:
    """``model.generate`` with the dynamic cache (``static=False``) or a static cache."""

    def __init__(self, static_cache: bool = False, compile: bool = False):
        self.static_cache = static_cache
        self.compile = compile

    def generate(self, model, prompt_ids, prompt_mask, settings, eos_token_ids, pad_token_id):
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
                      eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, use_cache=True)
        if not settings.greedy:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
            if not self.compile:
                kwargs["disable_compile"] = True
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)


ENGINES = {"hf": lambda: HFGenerateEngine(False), "hf_static": lambda: HFGenerateEngine(True, compile=True),
           "hf_static_nocompile": lambda: HFGenerateEngine(True, compile=False)}


def build_engine(name: str) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]()


@torch.no_grad()
def sample_responses(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings,
                     eos_token_ids: Iterable[int], pad_token_id: int,
                     engine: Optional[RolloutEngine] = None) -> Rollout:
    """Sample one response per prompt from ``model`` (eval mode while sampling, mode restored after)."""
    engine = engine or HFGenerateEngine()
    eos_token_ids = sorted(set(int(e) for e in eos_token_ids))
    was_training = model.training
    model.eval()  # no dropout while acting; the scoring passes run in the trainer's mode
    try:
        sequences = engine.generate(model, prompt_ids, prompt_mask, settings, eos_token_ids, pad_token_id)
    finally:
        model.train(was_training)
    P = prompt_ids.shape[1]
    response_ids = sequences[:, P:]
    if response_ids.shape[1] == 0:  # keep one (masked) column so downstream shapes stay valid
        response_ids = torch.full((prompt_ids.shape[0], 1), pad_token_id, dtype=torch.long, device=prompt_ids.device)
        mask = torch.zeros_like(response_ids, dtype=torch.bool)
        lengths, finished = mask.sum(dim=1), mask.any(dim=1)
    else:
        mask, lengths, finished = response_mask_from_ids(response_ids, eos_token_ids)
    response_ids = response_ids.masked_fill(~mask, pad_token_id)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, lengths, finished)


def eos_ids_for(tokenizer, model=None) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)
