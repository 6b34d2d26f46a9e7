import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from lightning_ctx.data.datamodule import PairCollator
from lightning_ctx.data.records import TaskRecord
from lightning_ctx.data.render import PromptRenderer
from lightning_ctx.module import NonFiniteLossError, OnPolicyDistillation
from lightning_ctx.optim import lr_lambda
from lightning_ctx.rollout import Rollout, response_mask_from_ids


def _batch(module):
    recs = [TaskRecord("a", "ADD2 REV", "1 2 3", "x"), TaskRecord("b", "SHOW", "4 5", "x"),
            TaskRecord("c", "ADD1", "7 8 9", "x")]
    return PairCollator(PromptRenderer(module.tokenizer), module.pad_token_id)(recs)


def _fixed_rollout(module, batch):
    eos, pad = module.tokenizer.eos_token_id, module.pad_token_id
    resp = torch.tensor([[10, 11, eos, pad], [12, eos, pad, pad], [13, 14, 15, 16]])
    mask, lengths, finished = response_mask_from_ids(resp, [eos])
    return Rollout(batch.prompt_ids, batch.prompt_mask, resp, mask, lengths, finished)


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _row_logits(model, prefix_ids, prefix_mask, response):
    """Independent reference: score one unpadded row, no batching, float64."""
    prompt = prefix_ids[prefix_mask.bool()].tolist()
    full = torch.tensor([prompt + response])
    logits = model(input_ids=full).logits[0, len(prompt) - 1: len(prompt) - 1 + len(response)]
    return logits.double()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_loss_equals_objectives_by_hand(tiny_dirs, family):
    module = OnPolicyDistillation(student=tiny_dirs[family], anchor_weight=0.5)
    _perturb(module.student)  # student != teacher, so every term is non-trivial
    module.student.eval()
    batch = _batch(module)
    rollout = _fixed_rollout(module, batch)
    terms = module.compute_losses(batch, rollout)
    opd_sum, anchor_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(batch)):
            resp = rollout.response_ids[i][rollout.response_mask[i]].tolist()
            s = _row_logits(module.student, batch.prompt_ids[i], batch.prompt_mask[i], resp)
            t = _row_logits(module.teacher, batch.ctx_prompt_ids[i], batch.ctx_prompt_mask[i], resp)
            q = _row_logits(module.student, batch.ctx_prompt_ids[i], batch.ctx_prompt_mask[i], resp)
            opd_sum += kl_divergence(Categorical(logits=s), Categorical(logits=t)).sum().item()  # reverse KL(s || T)
            anchor_sum += kl_divergence(Categorical(logits=s), Categorical(logits=q)).sum().item()  # KL(sg s || q)
            n += len(resp)
    assert n == 3 + 2 + 4
    assert terms["opd"].item() == pytest.approx(opd_sum / n, rel=1e-5)
    assert terms["anchor"].item() == pytest.approx(anchor_sum / n, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(opd_sum / n + 0.5 * anchor_sum / n, rel=1e-5)
    assert terms["opd"].item() > 1e-3 and terms["anchor"].item() > 1e-3


def test_no_anchor_term_when_disabled_and_gradients(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], anchor_weight=0.0)
    _perturb(module.student)
    batch = _batch(module)
    terms = module.compute_losses(batch, _fixed_rollout(module, batch))
    assert "anchor" not in terms and terms["loss"] is terms["opd"]
    terms["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_training_step_rejects_nonfinite(tiny_dirs, monkeypatch):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], anchor_weight=0.5, max_new_tokens=4)
    batch = _batch(module)
    real = module.compute_losses

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out["anchor"] = out["anchor"] * float("nan")
        return out

    monkeypatch.setattr(module, "compute_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="term 'anchor'"):
        module.training_step(batch, 0)


def test_teacher_vocab_mismatch_is_clear(tmp_path, tiny_dirs):
    from lightning_ctx.models.loading import ModelError
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    other = save_tiny_checkpoint(tmp_path / "other", "qwen2", extra_words=["zebra", "yak"])
    with pytest.raises(ModelError, match="teacher tokenizer differs"):
        OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher=str(other))


def test_teacher_with_padded_vocab_is_trimmed(tmp_path, tiny_dirs):
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    padded = save_tiny_checkpoint(tmp_path / "padded", "qwen2", seed=3, vocab_padding=16)
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher=str(padded))
    assert module.vocab_size == module.student.config.vocab_size
    batch = _batch(module)
    assert torch.isfinite(module.compute_losses(batch, _fixed_rollout(module, batch))["loss"])


def test_lr_schedule():
    f = lr_lambda(warmup_steps=4, total_steps=14, schedule="cosine", min_ratio=0.1)
    assert [round(f(s), 4) for s in (0, 3)] == [0.25, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert lr_lambda(2, 10, "constant")(7) == 1.0
