"""The callback's "initial model" (``ref/initial_*`` and the per-item retention reference) is the initial student
with its own, unquantized weights -- also when the teacher is the initial student re-loaded 4/8-bit."""

from types import SimpleNamespace

import pytest
import torch

from lightning_ctx.eval.callback import initial_model
from lightning_ctx.module import OnPolicyDistillation


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def quantized_self_teacher(tiny_dirs):
    pytest.importorskip("bitsandbytes")
    return OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher_quantization="8bit")


def test_initial_model_is_not_the_quantized_teacher(quantized_self_teacher):
    module = quantized_self_teacher
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    reference = _logits(module.student, ids)  # no training yet: the student is the initial model
    # the precondition: 8-bit weights visibly change the logits, so the choice matters
    assert (_logits(module.teacher, ids) - reference).abs().max() > 1e-2

    fresh = initial_model(SimpleNamespace(global_step=0), module, before_training=True)
    assert fresh is module.student
    # later (a resumed fit without stored references, validate, test): the unquantized weights re-loaded
    later = initial_model(SimpleNamespace(global_step=5), module, before_training=False)
    assert later is not module.teacher and later is not module.student
    torch.testing.assert_close(_logits(later, ids), reference, rtol=0, atol=0)
    assert not any(p.requires_grad for p in later.parameters())


def test_unquantized_self_teacher_is_the_initial_model(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"])
    assert initial_model(SimpleNamespace(global_step=5), module, before_training=False) is module.teacher


def test_teacher_dtype_applies_to_the_frozen_copy_and_it_is_then_not_the_initial_model(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher_dtype="bfloat16")
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.student.parameters()} == {torch.float32}
    assert initial_model(SimpleNamespace(global_step=0), module, before_training=True) is module.student
    later = initial_model(SimpleNamespace(global_step=5), module, before_training=False)
    assert later is not module.teacher and later is not module.student
    assert {p.dtype for p in later.parameters()} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(_logits(later, ids), _logits(module.student, ids), rtol=0, atol=0)
    # the same dtype spelled differently is still the student's own weights
    same = OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher_dtype="fp32")
    assert initial_model(SimpleNamespace(global_step=5), same, before_training=False) is same.teacher
