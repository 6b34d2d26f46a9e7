"""Loading students and teachers: local paths (or an HF cache), no implicit downloads.

``builtin:world`` names the embedded rule-world base model shipped in the package.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


class ModelError(ValueError):
    """A user-fixable problem with a model or tokenizer (path, vocab, pad token)."""


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_model_path(name: str, local_files_only: bool = True) -> str:
    """Map ``builtin:world`` to the shipped folder; check that a local path exists.

    A name that is not a folder is passed on as an HF id, which with ``local_files_only`` must already
    sit in the HF cache (never downloaded implicitly).
    """
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):]
        if key == "world":
            from lightning_ctx.models.world import WORLD_BASE_DIR

            return str(WORLD_BASE_DIR)
        raise ModelError(f"unknown built-in model {name!r}; available: builtin:world")
    path = Path(os.path.expanduser(name))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if looks_like_path or path.exists():
        raise ModelError(f"{name}: model path does not exist")
    return name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_tokenizer(name: str, trust_remote_code: bool = False, local_files_only: bool = True):
    """Load a tokenizer; a folder with ``tokenizer.json`` is read as-is with ``PreTrainedTokenizerFast``.

    ``AutoTokenizer`` on a saved Qwen2 folder silently swaps a custom pre-tokenizer (transformers v5),
    so the fast-tokenizer file wins when present. A missing pad token defaults to EOS: the rollout's
    response mask is built from the first EOS, not from the pad id, so this is safe.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(name, local_files_only)
    try:
        if Path(path, "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                local_files_only=local_files_only)
    except OSError as err:
        raise ModelError(f"{name}: cannot load tokenizer ({err})") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{name}: tokenizer has no eos_token; the student could never learn to stop")
    if tok.pad_token_id is None:
        log.warning("%s: tokenizer has no pad token; using eos_token %r as pad", name, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
                   local_files_only: bool = True, quantization: Optional[str] = None):
    """Load an HF causal LM from a local folder (safetensors only) or the HF cache.

    ``quantization``: None | ``4bit`` | ``8bit`` (bitsandbytes; for frozen teachers).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, local_files_only)
    kwargs = dict(dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code,
                  local_files_only=local_files_only, use_safetensors=True)
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, parse_dtype(dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(f"{name}: cannot load model ({err})") from None
    return model


def quantization_config(kind: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"unknown quantization {kind!r}; choose 4bit or 8bit")


def frozen_copy(model):
    """A frozen, eval-mode deep copy (the default teacher: the initial student)."""
    teacher = copy.deepcopy(model)
    freeze(teacher)
    return teacher


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def output_vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    return emb.weight.shape[0] if emb is not None else model.config.vocab_size


def check_teacher_compatible(student_tok, teacher_tok, student_model, teacher_model, teacher_name: str) -> int:
    """Teacher and student must share a tokenizer; returns the shared logit width to compare on.

    Embedding tables are often padded past the tokenizer (Qwen2.5 3B vs 72B: 151936 vs 152064 rows)
    although the tokenizer is identical, so logits are trimmed to the smaller width.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = len(set(s_vocab) - set(t_vocab))
        only_t = len(set(t_vocab) - set(s_vocab))
        moved = sum(1 for k, v in s_vocab.items() if k in t_vocab and t_vocab[k] != v)
        raise ModelError(f"{teacher_name}: teacher tokenizer differs from the student's ({len(s_vocab)} vs "
                         f"{len(t_vocab)} tokens; {only_s} only in student, {only_t} only in teacher, {moved} "
                         f"with different ids). On-policy distillation scores the student's tokens with the "
                         f"teacher, so both must share one tokenizer.")
    width = min(output_vocab_size(student_model), output_vocab_size(teacher_model))
    if width < len(s_vocab):
        raise ModelError(f"{teacher_name}: logit width {width} is smaller than the tokenizer ({len(s_vocab)} tokens)")
    return width
