"""On-policy sampling from the student (no context): left-padded prompts, KV cache, response masks.

The response mask covers every token up to and including the first EOS and nothing after it. It is
built from EOS positions, never from ``pad_token_id``, so it stays right when ``pad == eos`` (a peer
bug: masking every EOS-valued token teaches the student never to stop).

Engines (``model.rollout_engine``):

* ``hf``: ``generate`` with the dynamic KV cache. Launch-bound on a GPU (a 0.5B model decodes ~640
  tokens/s at batch 16 on an H200).
* ``hf_static``: ``cache_implementation="static"``; transformers compiles the decode step itself where its
  criteria allow (CUDA/XPU device, static cache; ``compile="auto"``). On a CPU it runs the static cache
  *uncompiled* (transformers 5.24 never auto-compiles on CPU), which gives the same tokens as ``hf``.
  The static cache is sized once for the longest prompt + ``max_new_tokens`` (``max_cache_len``, set by
  ``warmup``): every batch then gets a cache of the same shape (transformers 5.24 allocates a new one per
  call), so the compiled decode step is reused instead of recompiled for each new prompt width. Prompts
  longer than that grow the cache (and recompile once). ``max_cache_len`` is passed only where
  ``GenerationConfig`` knows it (transformers >= 5.13; older ``generate`` rejects it): there each call sizes
  its own cache.
* ``hf_static_nocompile``: static cache, compilation disabled (``disable_compile=True``).
* ``hf_static_compile``: static cache, compilation forced on every device (``CompileConfig`` with
  ``_compile_all_devices``). Works on a CPU but the first call compiles for ~70 s on a tiny model.
* ``loop``: ``DecodeLoopEngine``, a lean prefill + per-token forward loop (dynamic KV cache) without
  ``generate``'s per-step machinery; same greedy tokens as ``hf`` and, for the same RNG state, the same
  samples. Fastest on a CPU; it also ignores sampling defaults in the checkpoint's ``generation_config``.
  It passes the cache under the name the model's forward takes (``cache_argument``): ``cache`` from
  transformers 5.24, ``past_key_values`` before; a forward that took the other name would ignore it silently.

``warmup(model, batch_size, prompt_len, settings, eos_token_ids, pad_token_id)`` decodes a few tokens for one
dummy batch of the training shape before the timed steps (``OnPolicyDistillation.on_fit_start`` calls it): the first
compiled call (~36 s for a 0.5B model on an H200) and CUDA graph capture then do not land in step 1.

Plugging in another engine (e.g. vLLM; no dependency here): write a class with

    generate(model, prompt_ids, prompt_mask, settings, eos_token_ids, pad_token_id) -> LongTensor[B, P + R]
    warmup(model, batch_size, prompt_len, settings, eos_token_ids, pad_token_id) -> None   # optional

and register a factory in ``ENGINES`` (``ENGINES["vllm"] = lambda: VLLMEngine(...)``). Contract:
``prompt_ids`` are left-padded ``[B, P]`` (``prompt_mask`` 1 on real tokens); return the prompt block
unchanged followed by ``R <= max_new_tokens`` sampled ids per row (any ids after a row's first EOS are
ignored: the response mask ends at the first EOS; pad short rows with ``pad_token_id``). Honour
``settings`` (temperature, top_p, top_k, greedy). Sampling must be *on-policy*: a vLLM engine holds its
own copy of the weights, so it must load the student's current weights before every call (e.g. keep a
``LLM(..., enable_sleep_mode=True)`` next to the trainer and push ``model.state_dict()`` -- with a LoRA
student, the merged or adapter weights -- through ``llm.llm_engine.model_executor``'s weight loading, or
a ``collective_rpc``/NCCL broadcast as TRL's vLLM client does). Convert vLLM's token lists to the
``[B, P + R]`` tensor on the prompt's device. Log-probs from the engine are never used: the student and
teacher re-score the tokens teacher-forced, so engine numerics (bf16, paged attention) cannot bias the
loss; they only make the samples slightly off-policy.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from lightning_ctx.errors import ModelError
from lightning_ctx.models.scoring import eval_mode


@dataclass
class SamplingSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0  # EOS suppressed before this many tokens (0 = may stop at once; benchmarks use it)
    # Sharded weights (FSDP): every forward is a collective, so every rank keeps decoding until all ranks are
    # done (``generate``'s ``synced_gpus``; the ``loop`` engine runs all ``max_new_tokens`` steps).
    sync_ranks: bool = False

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


def response_mask_from_ids(response_ids: torch.Tensor,
                           eos_token_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


WARMUP_TOKENS = 8  # decode steps of an engine warm-up


# A chat checkpoint's generation_config often sets logit processors (repetition penalty, min_p, ...);
# ``generate`` would apply them and the rollout would no longer sample from the student's own policy.
ON_POLICY_OVERRIDES = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_p=None, typical_p=1.0,
                           epsilon_cutoff=0.0, eta_cutoff=0.0, bad_words_ids=None, suppress_tokens=None,
                           begin_suppress_tokens=None, renormalize_logits=False)


class HFGenerateEngine:
    """``model.generate`` with the dynamic cache (``static_cache=False``) or a static cache.

    ``compile`` (static cache only): ``"auto"`` lets transformers decide (compiles on CUDA/XPU, not on a CPU),
    ``False`` disables it, ``True`` forces it on every device. ``max_cache_len`` sizes the static cache for
    the worst case across calls (``warmup`` sets it), so one cache (and one compiled graph) serves every step.
    """

    def __init__(self, static_cache: bool = False, compile: bool | str = "auto", max_cache_len: int | None = None):
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self.static_cache = static_cache
        self.compile = compile
        self.max_cache_len = max_cache_len
        self.warmup_s: float | None = None

    def _kwargs(self, settings, eos_token_ids, pad_token_id) -> dict:
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
                      eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, use_cache=True,
                      **ON_POLICY_OVERRIDES)
        if settings.min_new_tokens:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        if settings.sync_ranks:
            kwargs["synced_gpus"] = True
        if not settings.greedy:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
            if self.max_cache_len is not None and _generation_config_knows("max_cache_len"):
                kwargs["max_cache_len"] = self.max_cache_len
            if self.compile is False:
                kwargs["disable_compile"] = True
            elif self.compile is True:
                from transformers import CompileConfig

                config = CompileConfig()
                config._compile_all_devices = True  # transformers' own switch for compiling off-GPU
                kwargs["compile_config"] = config
        return kwargs

    def generate(self, model, prompt_ids, prompt_mask, settings, eos_token_ids, pad_token_id):
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                              **self._kwargs(settings, eos_token_ids, pad_token_id))

    @torch.no_grad()
    def warmup(self, model, batch_size: int, prompt_len: int, settings: SamplingSettings, eos_token_ids,
               pad_token_id: int) -> float:
        """Decode ``WARMUP_TOKENS`` tokens for one dummy ``[batch_size, prompt_len]`` batch; returns seconds.

        Every decode step of a static cache has one shape, so a few steps compile the step and capture its
        CUDA graph; a full-length decode would only cost a rollout's time (minutes for large models).

        Greedy (draws nothing from the RNG, so seeded runs sample the same with or without a warm-up) and
        with ``min_new_tokens`` so an early EOS cannot cut it short. Sizes the static cache for
        ``prompt_len + max_new_tokens``: pass the longest prompt the run will see.
        """
        import time

        if self.static_cache and self.max_cache_len is None:
            self.max_cache_len = int(prompt_len) + settings.max_new_tokens
        device = next(model.parameters()).device
        filler = next((i for i in range(8) if i not in set(eos_token_ids)), 0)
        ids = torch.full((batch_size, max(int(prompt_len), 1)), filler, dtype=torch.long, device=device)
        n = min(settings.max_new_tokens, WARMUP_TOKENS)
        greedy = SamplingSettings(max_new_tokens=n, greedy=True, min_new_tokens=n)
        kwargs = self._kwargs(greedy, eos_token_ids, pad_token_id)
        t0 = time.perf_counter()
        with _eval_mode(model):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s


class DecodeLoopEngine:
    """A lean decode loop around the model's own forward (KV cache), without ``generate``'s machinery.

    Prefill the left-padded prompts, then one forward per token with ``DynamicCache``; positions skip
    the left padding as in ``generate``. Sampling applies exactly temperature -> top-k -> top-p (the
    ``transformers`` warpers, in ``generate``'s order) and ``torch.multinomial`` on the softmax, so with the
    same RNG state it draws the same tokens as the ``hf`` engine. Unlike ``generate`` it ignores the
    checkpoint's ``generation_config`` (e.g. a ``repetition_penalty`` shipped with a chat model), so the
    samples come from the student's policy at the configured temperature, which on-policy distillation
    wants. Finished rows are fed ``pad_token_id``; the loop stops when every row has produced an EOS.
    On a CPU (and for small models on a GPU) the per-token overhead of ``generate`` dominates; this loop
    roughly halves it.
    """

    def __init__(self):
        self.warmup_s: float | None = None

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, settings, eos_token_ids, pad_token_id):
        from transformers import DynamicCache
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = []
        if not settings.greedy:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                warpers.append(TopKLogitsWarper(top_k=settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=settings.top_p))
        eos = torch.as_tensor(list(eos_token_ids), device=prompt_ids.device)
        mask = prompt_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        config = getattr(model, "config", None)
        cache = {cache_argument(model): DynamicCache(
            config=config.get_text_config(decoder=True) if config is not None else None)}
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **cache)
        next_pos = positions[:, -1:] + 1
        unfinished = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        tokens = []
        for step in range(settings.max_new_tokens):
            scores = out.logits[:, -1].to(dtype=torch.float32, copy=True)
            del out
            if step < settings.min_new_tokens:
                scores[:, eos] = float("-inf")
            for warper in warpers:
                scores = warper(None, scores)
            if settings.greedy:
                nxt = scores.argmax(dim=-1)
            else:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            tokens.append(nxt)
            unfinished = unfinished & ~torch.isin(nxt, eos)
            if step + 1 == settings.max_new_tokens or not (settings.sync_ranks or bool(unfinished.any())):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,  # noqa: F841
                        use_cache=True, **cache)  # (read at the top of the next step; ruff misses it across the `del`)
            next_pos = next_pos + 1
        return torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)

    def warmup(self, model, batch_size: int, prompt_len: int, settings: SamplingSettings, eos_token_ids,
               pad_token_id: int) -> float:
        """A short greedy dummy decode of the training shape (nothing to compile: first-call allocations only)."""
        import time

        device = next(model.parameters()).device
        filler = next((i for i in range(8) if i not in set(eos_token_ids)), 0)
        ids = torch.full((batch_size, max(int(prompt_len), 1)), filler, dtype=torch.long, device=device)
        n = min(settings.max_new_tokens, WARMUP_TOKENS)
        greedy = SamplingSettings(max_new_tokens=n, greedy=True, min_new_tokens=n)
        t0 = time.perf_counter()
        with _eval_mode(model):
            self.generate(model, ids, torch.ones_like(ids), greedy, eos_token_ids, pad_token_id)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s


def _generation_config_knows(name: str) -> bool:
    """Whether ``generate`` takes ``name`` (a ``GenerationConfig`` field of the installed transformers)."""
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), name)


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24, then every earlier version


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes its KV cache (``CACHE_ARGUMENTS``).

    Read from the forward signature, looking through wrappers whose forward hides it behind ``**kwargs`` and
    passes it on: PEFT (``get_base_model()``), ``torch.compile`` (``_orig_mod``), DDP/FSDP (``module``).
    """
    seen, current = set(), model
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        params = inspect.signature(current.forward).parameters
        for name in CACHE_ARGUMENTS:
            if name in params:
                return name
        unwrap = getattr(current, "get_base_model", None)
        current = unwrap() if callable(unwrap) else getattr(current, "_orig_mod", getattr(current, "module", None))
    raise ModelError(f"rollout_engine 'loop': the forward of {type(model).__name__} takes none of "
                     f"{list(CACHE_ARGUMENTS)} (a KV cache); use rollout_engine 'hf'")


ENGINES = {"hf": lambda: HFGenerateEngine(False), "hf_static": lambda: HFGenerateEngine(True, compile="auto"),
           "hf_static_nocompile": lambda: HFGenerateEngine(True, compile=False),
           "hf_static_compile": lambda: HFGenerateEngine(True, compile=True),
           "loop": DecodeLoopEngine}


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
    # No dropout while acting; every submodule's own mode is restored after (a blanket ``train()`` would
    # also wake submodules that were deliberately in eval mode). The scoring passes run in the trainer's mode.
    with _eval_mode(model):
        sequences = engine.generate(model, prompt_ids, prompt_mask, settings, eos_token_ids, pad_token_id)
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


def _eval_mode(model):
    if not isinstance(model, torch.nn.Module):  # e.g. BaseWeightsTeacher: scores in eval mode by itself
        return contextlib.nullcontext()
    return eval_mode(model)


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
