"""The rule world's word-level tokenizer and chat template (the context is the system message).

``build_world_tokenizer()`` is a ``PreTrainedTokenizerFast`` on a ``tokenizers`` WordLevel model with a
whitespace pre-tokenizer over the world's symbols, special tokens ``<pad>`` / ``<bos>`` (defined, not
emitted by the template) / ``<eot>`` (eos = end of turn) / ``<unk>`` and role markers. Load saved copies
with ``PreTrainedTokenizerFast.from_pretrained``, not ``AutoTokenizer``: transformers 5 builds a byte-level
``Qwen2Tokenizer`` for any qwen2 folder, whatever ``tokenizer_config.json`` says (docs/design.md, pitfalls).

``save_world_tokenizer`` writes a folder that every supported transformers (4.56 to 5.x) and ``tokenizers``
alone read the same way: ``tokenizer.json``, ``chat_template.jinja`` and a plain ``PreTrainedTokenizerFast``
``tokenizer_config.json`` (``PORTABLE_TOKENIZER_CONFIG``). ``save_pretrained`` would write the format of the
installed transformers: 5.x's (``TokenizersBackend``, ``extra_special_tokens`` as a list) fails to load under 4.x.
"""

from __future__ import annotations

from pathlib import Path

from lightning_ctx.tasks.world import rules as W

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
MODEL_MAX_LENGTH = 64
# No token_type_ids: PreTrainedTokenizerFast's default in transformers 4.x would return them.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]

#: ``tokenizer_config.json`` of a saved world tokenizer: the keys both transformers 4.56+ and 5.x read
#: (no ``backend``/``extra_special_tokens``, which are 5.x-only). The chat template is ``chat_template.jinja``.
PORTABLE_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS,
    "eos_token": EOT,
    "pad_token": PAD,
    "unk_token": UNK,
    "additional_special_tokens": list(ROLE_TOKENS),
    "clean_up_tokenization_spaces": False,
    "model_max_length": MODEL_MAX_LENGTH,
    "model_input_names": MODEL_INPUT_NAMES,
}


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
        model_max_length=MODEL_MAX_LENGTH,
        model_input_names=MODEL_INPUT_NAMES,
    )
    assert tok.pad_token_id != tok.eos_token_id
    return tok


def save_world_tokenizer(tokenizer, output_dir: str | Path) -> None:
    """Write ``tokenizer`` (a ``build_world_tokenizer()``) in the portable format (module docstring)."""
    from lightning_ctx.models.pretraining import save_portable_tokenizer

    save_portable_tokenizer(tokenizer, output_dir, PORTABLE_TOKENIZER_CONFIG)


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
