import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from lightning_ctx.module import NonFiniteLossError, OnPolicyDistillation
from lightning_ctx.optim import lr_lambda
from tests.helpers import fixed_rollout, perturb, tiny_batch


def _row_logits(model, prefix_ids, prefix_mask, response):
    """Independent reference: score one unpadded row, no batching, float64."""
    prompt = prefix_ids[prefix_mask.bool()].tolist()
    full = torch.tensor([prompt + response])
    logits = model(input_ids=full).logits[0, len(prompt) - 1: len(prompt) - 1 + len(response)]
    return logits.double()


def _reverse_kl(s, t):
    return kl_divergence(Categorical(logits=s), Categorical(logits=t)).sum().item()


def _terms_and_hand_sums(module, kl):
    """The module's terms on a fixed rollout, and by hand row by row (unpadded, float64): the sums over response
    tokens of ``kl(s, T)`` (OPD) and ``kl(s, q)`` (anchor), and the number of response tokens."""
    perturb(module.student)  # student != teacher, so every term is non-trivial
    module.student.eval()
    batch = tiny_batch(module)
    rollout = fixed_rollout(module, batch)
    terms = module.compute_losses(batch, rollout)
    opd_sum, anchor_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(batch)):
            resp = rollout.response_ids[i][rollout.response_mask[i]].tolist()
            s = _row_logits(module.student, batch.prompt_ids[i], batch.prompt_mask[i], resp)
            t = _row_logits(module.teacher, batch.ctx_prompt_ids[i], batch.ctx_prompt_mask[i], resp)
            q = _row_logits(module.student, batch.ctx_prompt_ids[i], batch.ctx_prompt_mask[i], resp)
            opd_sum += kl(s, t)
            anchor_sum += kl(s, q)
            n += len(resp)
    return terms, opd_sum, anchor_sum, n


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_loss_equals_objectives_by_hand(tiny_dirs, family):
    module = OnPolicyDistillation(student=tiny_dirs[family], anchor_weight=0.5)
    terms, opd_sum, anchor_sum, n = _terms_and_hand_sums(module, _reverse_kl)
    assert n == 3 + 2 + 4
    assert terms["opd"].item() == pytest.approx(opd_sum / n, rel=1e-5)
    assert terms["anchor"].item() == pytest.approx(anchor_sum / n, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(opd_sum / n + 0.5 * anchor_sum / n, rel=1e-5)
    assert terms["opd"].item() > 1e-3 and terms["anchor"].item() > 1e-3


def test_no_anchor_term_when_disabled_and_gradients(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], anchor_weight=0.0)
    perturb(module.student)
    batch = tiny_batch(module)
    terms = module.compute_losses(batch, fixed_rollout(module, batch))
    assert "anchor" not in terms and torch.equal(terms["loss"], terms["opd"])
    terms["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_training_step_rejects_nonfinite(tiny_dirs, monkeypatch):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], anchor_weight=0.5, max_new_tokens=4)
    batch = tiny_batch(module)
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
    batch = tiny_batch(module)
    assert torch.isfinite(module.compute_losses(batch, fixed_rollout(module, batch))["loss"])


def test_lr_schedule():
    f = lr_lambda(warmup_steps=4, total_steps=14, schedule="cosine", min_ratio=0.1)
    assert [round(f(s), 4) for s in (0, 3)] == [0.25, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert lr_lambda(2, 10, "constant")(7) == 1.0


def _topk_reverse_kl(s, t, k, renormalize):
    """Reverse KL(s || t) over the student's top-k indices, by hand in float64 (OPCD's kl_renorm_topk)."""
    idx = s.topk(k, dim=-1).indices
    if renormalize:
        ls, lt = torch.log_softmax(s.gather(-1, idx), -1), torch.log_softmax(t.gather(-1, idx), -1)
    else:
        ls, lt = torch.log_softmax(s, -1).gather(-1, idx), torch.log_softmax(t, -1).gather(-1, idx)
    return (ls.exp() * (ls - lt)).sum().item()


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_renormalize_reaches_opd_and_anchor(tiny_dirs, renormalize):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], anchor_weight=0.5, scope="topk", topk=5,
                                  topk_renormalize=renormalize)
    assert module.objective.topk_renormalize is renormalize
    # KL(sg s || q) of the anchor over the anchor's top-k, like the OPD term over the student's
    terms, opd_sum, anchor_sum, n = _terms_and_hand_sums(module, lambda a, b: _topk_reverse_kl(a, b, 5, renormalize))
    assert terms["opd"].item() == pytest.approx(opd_sum / n, rel=1e-5)
    assert terms["anchor"].item() == pytest.approx(anchor_sum / n, rel=1e-5)


def test_gradient_checkpointing_changes_memory_not_the_loss(tiny_dirs):
    grads = []
    for checkpointing in (False, True):
        module = OnPolicyDistillation(student=tiny_dirs["llama"], anchor_weight=0.5,
                                      gradient_checkpointing=checkpointing)
        student = module.student
        assert getattr(student, "is_activation_checkpointing", None) in (checkpointing, None)
        assert any(getattr(m, "gradient_checkpointing", False) for m in student.modules()) is checkpointing
        perturb(module.student)
        module.student.train()
        batch = tiny_batch(module)
        module.compute_losses(batch, fixed_rollout(module, batch))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
