"""The shipped world tokenizer reads the same through ``tokenizers``, ``AutoTokenizer`` and ``PreTrainedTokenizerFast``.

Its ``tokenizer_config.json`` is the portable format (``tokenizer.PORTABLE_TOKENIZER_CONFIG``) that transformers
4.56 and 5.x both load; ``make test-min`` runs this file at the transformers floor. References: the ``tokenizers``
library alone (no transformers code) for the ids, the vocabulary order for the words, and ``jinja2`` rendering the
shipped ``chat_template.jinja`` for the chat text.

``AutoTokenizer`` reads ``tokenizer_class`` under transformers 4.x only: 5.x lists ``qwen2`` among the model types
whose declared tokenizer class it overrides and builds a ``Qwen2Tokenizer`` (byte-level BPE) whatever the folder
says, which splits ``ADD1`` into pieces. That case is a strict xfail: it fails as long as transformers does that.
"""

from __future__ import annotations

import json

import jinja2
import pytest
import transformers
from packaging.version import Version
from tokenizers import Tokenizer

from lightning_ctx.tasks.world import model as WM
from lightning_ctx.tasks.world import rules as W
from lightning_ctx.tasks.world import tokenizer as WT

ASSET = WM.WORLD_BASE_DIR
CONVERSATIONS = [  # (context, prompt, answer)
    ("ADD1 REV SHOW", "3 1 4", "3 1 4 = 5 2 4"),
    (None, "0 9 5", "6 0 1"),
    ("ADD2 ADD2", "7 7 7", "1 1 1"),
    ("REV ADD4 SHOW", "9 0 2", "9 0 2 = 6 4 3"),
]


def _messages(context, prompt, answer=None):
    msgs = WT.render_messages(context, prompt)
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _reference_text(context, prompt, answer=None):
    """The template rendered by plain jinja2 (what transformers must reproduce)."""
    template = jinja2.Environment().from_string((ASSET / "chat_template.jinja").read_text())
    return template.render(messages=_messages(context, prompt, answer), add_generation_prompt=answer is None)


_AUTO_OVERRIDES_QWEN2 = Version(transformers.__version__).major >= 5


@pytest.fixture(scope="module", params=[
    "PreTrainedTokenizerFast",
    pytest.param("AutoTokenizer", marks=pytest.mark.xfail(
        _AUTO_OVERRIDES_QWEN2, strict=True, reason="transformers 5 builds Qwen2Tokenizer for a qwen2 folder")),
])
def loaded(request):
    return getattr(transformers, request.param).from_pretrained(str(ASSET), local_files_only=True)


def test_asset_config_is_the_portable_one_and_pretraining_writes_it(tmp_path):
    assert json.loads((ASSET / "tokenizer_config.json").read_text()) == WT.PORTABLE_TOKENIZER_CONFIG
    assert not {"backend", "extra_special_tokens"} & set(WT.PORTABLE_TOKENIZER_CONFIG)  # transformers-5-only keys
    WT.save_world_tokenizer(WT.build_world_tokenizer(), tmp_path)  # what `pretrain-world` writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                           "tokenizer_config.json"]
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == (ASSET / name).read_text(), name
    saved, shipped = (json.loads((d / "tokenizer.json").read_text()) for d in (tmp_path, ASSET))
    for key in ("model", "pre_tokenizer", "decoder", "added_tokens"):
        assert saved[key] == shipped[key], key


def test_loaded_tokenizer_matches_tokenizers_and_the_vocabulary(loaded):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(loaded, PreTrainedTokenizerFast)
    raw = Tokenizer.from_file(str(ASSET / "tokenizer.json"))
    vocab = {tok: i for i, tok in enumerate(WT.SPECIAL_TOKENS + W.WORLD_SYMBOLS)}
    assert loaded.get_vocab() == raw.get_vocab(with_added_tokens=True) == vocab
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == (WT.PAD, WT.BOS, WT.EOT, WT.UNK)
    assert [loaded.pad_token_id, loaded.eos_token_id] == [vocab[WT.PAD], vocab[WT.EOT]]
    assert set(WT.ROLE_TOKENS) <= set(loaded.all_special_tokens)
    assert loaded.model_input_names == ["input_ids", "attention_mask"]
    assert loaded.chat_template == WT.WORLD_CHAT_TEMPLATE

    for context, prompt, answer in CONVERSATIONS:
        for with_answer in (False, True):
            msgs = _messages(context, prompt, answer if with_answer else None)
            text = loaded.apply_chat_template(msgs, add_generation_prompt=not with_answer, tokenize=False)
            assert text == _reference_text(context, prompt, answer if with_answer else None)
            words = text.split()
            expected = [vocab[w] for w in words]
            assert raw.encode(text, add_special_tokens=False).ids == expected
            enc = loaded(text)  # the default call adds no special tokens and no token_type_ids either
            assert enc.input_ids == loaded(text, add_special_tokens=False).input_ids == expected
            assert set(enc) == {"input_ids", "attention_mask"}
            assert raw.decode(expected, skip_special_tokens=False) == loaded.decode(expected) == " ".join(words)
        assert loaded.decode(WT.answer_ids(loaded, answer), skip_special_tokens=True) == answer
        assert WT.render_prompt_ids(loaded, context, prompt) == [
            vocab[w] for w in _reference_text(context, prompt).split()]


def test_left_padding(loaded):
    texts = [_reference_text(c, p) for c, p, _ in CONVERSATIONS]
    loaded.padding_side = "left"
    batch = loaded(texts, padding=True, return_tensors="pt")
    raw = Tokenizer.from_file(str(ASSET / "tokenizer.json"))
    width = max(len(t.split()) for t in texts)
    for text, ids, mask in zip(texts, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        own = raw.encode(text, add_special_tokens=False).ids
        pad = width - len(own)
        assert ids == [loaded.pad_token_id] * pad + own and mask == [0] * pad + [1] * len(own)
