"""The game base's model: a small Qwen3 (tied embeddings) over the word-level game tokenizer, and the shipped copy
(``model.student: builtin:games``)."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_ctx.models.loading import BUILTIN_MODELS

GAMES_BASE_DIR = BUILTIN_MODELS["games"]
MAX_POSITIONS = 1024  # the longest per-turn prompt with the built-in experience (turn 5) is ~450 tokens
MAX_NEW_TOKENS = 16  # the longest reply, "<think> ... </think> [move]", is 15 tokens + the end of turn


def build_games_model(tokenizer, seed: int | None = None, layers: int = 3, width: int = 96, heads: int = 4,
                      intermediate: int | None = None, rope_theta: float = 10000.0):
    """A freshly initialised float32 Qwen3 for ``tokenizer`` (``build_games_tokenizer``)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    if width % heads:
        raise ValueError(f"width {width} must be divisible by heads {heads}")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=intermediate or (8 * width) // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=width // heads,
        hidden_act="silu", max_position_embeddings=MAX_POSITIONS, initializer_range=0.02, rms_norm_eps=1e-6,
        use_cache=True, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False,
                                               max_new_tokens=MAX_NEW_TOKENS)
    return model


def load_games_base(path: str | Path = GAMES_BASE_DIR):
    """``(model, tokenizer)`` of the shipped game base (float32, eval mode, local files only)."""
    from transformers import AutoModelForCausalLM

    from lightning_ctx.models.loading import load_tokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no game base at {path}: run `lightning-ctx pretrain-games --out {path}`")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return model.eval(), load_tokenizer(str(path))
