import warnings

import pytest
import torch

from lightning_ctx.data.batches import PairCollator
from lightning_ctx.data.records import DataError, TaskRecord
from lightning_ctx.data.render import PromptRenderer, left_pad
from lightning_ctx.models.loading import load_causal_lm, load_tokenizer
from lightning_ctx.models.scoring import join_prompt_and_response, position_ids_from_mask, response_logits


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_renderer_chat_and_plain(tiny_dirs):
    tok = load_tokenizer(tiny_dirs["qwen2"])
    chat = PromptRenderer(tok)
    assert chat.use_chat
    with_ctx, without = chat.text("1 2 3", "ADD2"), chat.text("1 2 3")
    assert with_ctx == "<|im_start|>system ADD2<|im_end|> " + without  # context = the system message
    assert "system" not in without and without.endswith("<|im_start|>assistant ")
    plain = PromptRenderer(tok, "plain")
    assert plain.text("1 2 3", "ADD2") == "ADD2\n\n1 2 3\n" and plain.text("1 2 3") == "1 2 3\n"
    tok.chat_template = None
    with pytest.warns(UserWarning, match="has no chat template: prompts use the plain template"):
        assert not PromptRenderer(tok).use_chat  # (#26.8) template: auto no longer switches silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not PromptRenderer(tok, "plain").use_chat  # asked for: no warning
    with pytest.raises(DataError, match="chat_template"):
        PromptRenderer(tok, "chat")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_response_positions_line_up_with_unpadded_runs(tiny_dirs, family):
    """Batched, left-padded scoring == each row scored alone, for student and teacher prefixes."""
    tok = load_tokenizer(tiny_dirs[family])
    model = load_causal_lm(tiny_dirs[family]).eval()
    recs = [TaskRecord("a", "ADD2 REV", "1 2 3", "x"), TaskRecord("b", "SHOW", "4 5", "x"),
            TaskRecord("c", "ADD1 ADD1 ADD1", "7", "x")]
    batch = PairCollator(PromptRenderer(tok), tok.pad_token_id)(recs)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    responses = [[10, 11, eos], [12, eos], [13, 14, 15, 16]]  # last one truncated (no EOS)
    R = max(map(len, responses))
    resp = torch.full((3, R), pad)
    rmask = torch.zeros((3, R), dtype=torch.bool)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r)
        rmask[i, :len(r)] = True
    prefixes = ((batch.prompt_ids, batch.prompt_mask), (batch.ctx_prompt_ids, batch.ctx_prompt_mask))
    for prefix_ids, prefix_mask in prefixes:
        with torch.no_grad():
            batched = response_logits(model, join_prompt_and_response(prefix_ids, prefix_mask, resp, rmask))
        assert batched.shape == (3, R, model.config.vocab_size)
        for i, r in enumerate(responses):
            prompt = prefix_ids[i][prefix_mask[i].bool()].tolist()
            full = torch.tensor([prompt + r])
            with torch.no_grad():
                alone = model(input_ids=full).logits[0, len(prompt) - 1: len(prompt) - 1 + len(r)]
            torch.testing.assert_close(batched[i, :len(r)], alone, atol=1e-5, rtol=1e-5)
    # The two prefixes really differ, so the check above is not vacuous.
    assert batch.ctx_prompt_ids.shape[1] > batch.prompt_ids.shape[1]


def test_vocab_trim(tiny_dirs):
    model = load_causal_lm(tiny_dirs["qwen2"]).eval()
    ids, mask = left_pad([[1, 2, 3]], 0)
    inp = join_prompt_and_response(ids, mask, torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.bool))
    assert response_logits(model, inp, vocab_size=20).shape == (1, 2, 20)
