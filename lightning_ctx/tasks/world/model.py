"""The rule world's base model: a ~3-layer, width-96 Qwen2 or Llama, and the shipped pretrained copy."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_ctx.models.loading import BUILTIN_MODELS
from lightning_ctx.models.pretraining import count_parameters  # noqa: F401 -- re-exported (tests, notebooks)
from lightning_ctx.tasks.world.tokenizer import MAX_NEW_TOKENS, build_world_tokenizer

WORLD_BASE_DIR = BUILTIN_MODELS["world"]


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


def load_world_base(path: str | Path = WORLD_BASE_DIR):
    """``(model, tokenizer)`` of the shipped pretrained base (float32, eval mode, local files only)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no world model at {path}: run `lightning-ctx pretrain-world --out {path}`")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.eval()
    return model, tokenizer
