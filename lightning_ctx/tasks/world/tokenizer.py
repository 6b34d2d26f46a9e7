"""The rule world's word-level tokenizer and chat template (the context is the system message).

``build_world_tokenizer()`` is a ``PreTrainedTokenizerFast`` on a ``tokenizers`` WordLevel model with a
whitespace pre-tokenizer over the world's symbols, special tokens ``<pad>`` / ``<bos>`` (defined, not
emitted by the template) / ``<eot>`` (eos = end of turn) / ``<unk>`` and role markers. Load saved copies
with ``PreTrainedTokenizerFast.from_pretrained``, not ``AutoTokenizer`` (docs/design.md, pitfalls).
"""

from __future__ import annotations

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
