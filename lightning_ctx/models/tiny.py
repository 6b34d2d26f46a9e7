"""Tiny randomly initialised stand-ins of real model families, saved with ``save_pretrained``.

Used by tests (and by users) to exercise the real loading path -- a local folder with
``config.json``, safetensors weights and a tokenizer with a chat template -- without any download.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Chat templates in the style of each family (context = system message).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> "
    "{{ m['content'] }}<|eot_id|> {% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|> {% endif %}"
)
# Qwen3-style: ChatML, and ``enable_thinking: false`` writes an empty reasoning block into the generation prompt.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant "
    "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}{% endif %}"
)
FAMILIES = {
    "qwen2": dict(template=CHATML_TEMPLATE, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                  eos="<|im_end|>", pad="<|endoftext|>", bos=None),
    "qwen3": dict(template=QWEN3_TEMPLATE, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                  eos="<|im_end|>", pad="<|endoftext|>", bos=None, words=["<think>", "</think>"]),
    "llama": dict(template=LLAMA3_TEMPLATE,
                  specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                            "<|finetune_right_pad_id|>"],
                  eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", bos="<|begin_of_text|>"),
}
BASE_WORDS = ([str(d) for d in range(10)] + list("ABCDEFGHIJ") + list("abcdefghijklmnopqrstuvwxyz")
              + ["system", "user", "assistant", "the", "answer", "is", "=", ".", ",", ":", "?", "(", ")",
                 "Question", "Answer", "Options", "hint", "be", "brief", "careful", "UP", "DOWN", "LEFT", "RIGHT",
                 "S", "F", "H", "G", "ADD1", "ADD2", "ADD3", "ADD4", "REV", "SHOW"])


def build_tiny_tokenizer(family: str = "qwen2", extra_words: list[str] | None = None, pad: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` with a family-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    # <think> / </think> are ordinary (not special) tokens, as in Qwen3: decoding keeps them
    words = ["[UNK]"] + fam["specials"] + [w for w in BASE_WORDS + fam.get("words", []) + list(extra_words or []) if w]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token=fam["eos"],
                                  pad_token=fam["pad"] if pad else None, bos_token=fam["bos"],
                                  additional_special_tokens=[s for s in fam["specials"]])
    tok.chat_template = fam["template"]
    return tok


def build_tiny_model(family: str, vocab_size: int, layers: int = 2, width: int = 32, heads: int = 4,
                     max_positions: int = 256, seed: int = 0, tokenizer=None, init_std: float = 0.2):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[family]
    extra = {"head_dim": width // heads} if family == "qwen3" else {}
    config = cls(**extra, vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                 max_position_embeddings=max_positions, tie_word_embeddings=True, initializer_range=init_std)
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
    # A wide init (default 0.2, not HF's 0.02) so random logits differ visibly between inputs: tests
    # of alignment and masking would pass vacuously on near-uniform outputs.
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_checkpoint(out_dir: str | Path, family: str = "qwen2", layers: int = 2, width: int = 32,
                         seed: int = 0, extra_words: list[str] | None = None, pad: bool = True,
                         vocab_padding: int = 0, max_positions: int = 256) -> Path:
    """Save a tiny random model + tokenizer of ``family`` (``qwen2`` | ``qwen3`` | ``llama``) to ``out_dir``.

    ``vocab_padding`` adds unused embedding rows (real checkpoints often pad the vocabulary).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(family, extra_words, pad=pad)
    model = build_tiny_model(family, len(tok) + vocab_padding, layers, width, seed=seed, tokenizer=tok,
                             max_positions=max_positions)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
