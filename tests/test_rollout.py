import pytest
import torch

from lightning_ctx.data.render import left_pad
from lightning_ctx.models.loading import load_causal_lm
from lightning_ctx.rollout import SamplingSettings, response_mask_from_ids, sample_responses


def test_mask_through_first_eos_inclusive():
    ids = torch.tensor([[5, 9, 2, 9], [9, 1, 1, 1], [1, 2, 3, 4], [3, 9, 9, 9]])
    mask, lengths, finished = response_mask_from_ids(ids, [9])
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert lengths.tolist() == [2, 1, 4, 2] and finished.tolist() == [True, True, False, True]
    # several EOS ids (chat models: <|im_end|> and <|endoftext|>)
    mask, _, _ = response_mask_from_ids(torch.tensor([[1, 7, 9]]), [9, 7])
    assert mask.int().tolist() == [[1, 1, 0]]


def _prompts():
    return left_pad([[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]], pad_id=0)


def test_batched_greedy_matches_unbatched(tiny_dirs):
    """Left padding + KV cache: each row decodes exactly as it would alone."""
    model = load_causal_lm(tiny_dirs["llama"]).train()
    ids, mask = _prompts()
    settings = SamplingSettings(max_new_tokens=6, greedy=True)
    unused_eos = model.config.vocab_size - 1
    batched = sample_responses(model, ids, mask, settings, [unused_eos], pad_token_id=0)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = sample_responses(model, row, torch.ones_like(row), settings, [unused_eos], pad_token_id=0)
        assert batched.response_ids[i].tolist() == alone.response_ids[0].tolist()
    assert model.training  # mode restored after sampling


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_rollout_mask_includes_eos_excludes_rest(tiny_dirs, pad_is_eos):
    model = load_causal_lm(tiny_dirs["qwen2"])
    ids, mask = _prompts()
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    free = sample_responses(model, ids, mask, settings, [model.config.vocab_size - 1], pad_token_id=0)
    eos = int(free.response_ids[0, 2])  # a token row 0 emits at step 3: make it the EOS
    pad = eos if pad_is_eos else 0
    out = sample_responses(model, ids, mask, settings, [eos], pad_token_id=pad)
    for i in range(ids.shape[0]):
        row = out.response_ids[i].tolist()
        if eos in row:
            k = row.index(eos)
            assert out.response_mask[i, :k + 1].all() and not out.response_mask[i, k + 1:].any()
            assert all(t == pad for t in row[k + 1:])
            assert out.lengths[i] == k + 1 and out.finished[i]
        else:
            assert out.response_mask[i].all() and not out.finished[i]
    assert out.lengths[0] <= 3 and out.finished[0]


def test_sampling_settings_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
