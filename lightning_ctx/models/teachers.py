"""The teacher beside a student: a frozen copy of the initial student, a separate checkpoint sharing the
tokenizer (optionally 4/8-bit), or the LoRA student's own base weights with the adapter disabled."""

from __future__ import annotations

import copy
from typing import Optional

from lightning_ctx.errors import ModelError
from lightning_ctx.models.loading import (
    apply_lora,
    check_lora,
    check_model_sources,
    check_quantized_teacher,
    freeze,
    load_causal_lm,
    load_quantized_teacher,
    load_tokenizer,
    output_vocab_size,
    parse_dtype,
)
from lightning_ctx.models.scoring import eval_mode

TEACHER_BASE = "base"  # model.teacher: the LoRA student's base weights with the adapter disabled


def uses_base_weights_teacher(teacher: Optional[str], lora: Optional[dict],
                              teacher_quantization: Optional[str]) -> bool:
    """With LoRA and no separate teacher, the base weights with the adapter off *are* the initial student."""
    return teacher == TEACHER_BASE or (teacher is None and lora is not None and teacher_quantization is None)


def check_model_choices(student: str, teacher: Optional[str] = None, lora: Optional[dict] = None,
                        teacher_quantization: Optional[str] = None, trust_remote_code: bool = False,
                        local_files_only: bool = True):
    """Everything about the student and teacher choices that can be checked without their weights: the paths, the
    tokenizers (a separate teacher must share the student's), LoRA and quantization settings. Returns the student's
    tokenizer. Errors are :class:`ModelError` naming the knob; a missing student and teacher are named together."""
    separate_teacher = teacher if teacher not in (None, TEACHER_BASE) else None
    check_model_sources({"model.student": student, "model.teacher": separate_teacher}, local_files_only)
    tokenizer = load_tokenizer(student, trust_remote_code, local_files_only)
    if uses_base_weights_teacher(teacher, lora, teacher_quantization):
        if lora is None:
            raise ModelError("model.teacher: base means the LoRA student's base weights with the adapter "
                             "disabled; set model.lora (or leave model.teacher unset)")
        if teacher_quantization is not None:
            raise ModelError("model.teacher_quantization does not apply to teacher: base (those weights are "
                             "the student's own)")
    if lora is not None:
        check_lora(lora)
    if teacher not in (None, TEACHER_BASE):
        check_same_tokenizer(tokenizer, load_tokenizer(teacher, trust_remote_code, local_files_only, "model.teacher"),
                             teacher)
    if teacher_quantization is not None:
        check_quantized_teacher(student if teacher is None else teacher, teacher_quantization, trust_remote_code,
                                local_files_only)
    return tokenizer


def build_student_and_teacher(student: str, teacher: Optional[str] = None, *, lora: Optional[dict] = None,
                              teacher_quantization: Optional[str] = None, dtype: str = "float32",
                              teacher_dtype: Optional[str] = None, trust_remote_code: bool = False,
                              local_files_only: bool = True, tokenizer=None):
    """``(tokenizer, student, teacher, vocab_size)``; ``vocab_size`` is the vocabulary both share. ``tokenizer``: the
    student's, when already loaded. The choices are checked first (:func:`check_model_choices`)."""
    tokenizer = tokenizer or check_model_choices(student, teacher, lora, teacher_quantization, trust_remote_code,
                                                 local_files_only)
    model = load_causal_lm(student, dtype, trust_remote_code, local_files_only)
    model.train()  # from_pretrained returns eval mode; Lightning keeps modules as it finds them
    base_teacher = uses_base_weights_teacher(teacher, lora, teacher_quantization)
    if lora is not None:
        model = apply_lora(model, lora)
        model.train()

    def load_frozen(source: str):
        if teacher_quantization is not None:
            return load_quantized_teacher(source, teacher_quantization, teacher_dtype or dtype, trust_remote_code,
                                          local_files_only)
        return freeze(load_causal_lm(source, teacher_dtype or dtype, trust_remote_code, local_files_only))

    if base_teacher:
        return tokenizer, model, BaseWeightsTeacher(model), output_vocab_size(model)  # not a submodule
    if teacher is None:
        # The initial student: a frozen copy (in teacher_dtype when set), or re-loaded from its source when quantized.
        frozen = frozen_copy(model, teacher_dtype) if teacher_quantization is None else load_frozen(student)
        return tokenizer, model, frozen, output_vocab_size(model)
    teacher_tok = load_tokenizer(teacher, trust_remote_code, local_files_only)
    frozen = load_frozen(teacher)
    return tokenizer, model, frozen, check_teacher_compatible(tokenizer, teacher_tok, model, frozen, teacher)


class BaseWeightsTeacher:
    """The LoRA student's base weights with the adapter disabled, used as the frozen teacher.

    One copy of the weights in memory. Deliberately *not* an ``nn.Module`` (nothing is registered twice,
    nothing of it lands in checkpoints) and its ``eval()``/``train()`` are no-ops: the student object
    must keep its own train/eval modes (a peer bug: calling ``.eval()`` on a teacher that is the student
    object turns the student's dropout off for the rest of training). Scoring runs every submodule in
    eval mode and restores each one's own mode afterwards (``eval_mode``).
    """

    def __init__(self, student):
        if not hasattr(student, "disable_adapter"):
            raise ModelError("teacher: base needs a LoRA student (set model.lora)")
        self._student = student

    def __call__(self, *args, **kwargs):
        with self._student.disable_adapter(), eval_mode(self._student):
            return self._student(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._student.disable_adapter(), eval_mode(self._student):
            return self._student.generate(*args, **kwargs)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    @property
    def training(self) -> bool:
        return False

    def parameters(self):
        """The frozen (non-adapter) weights of the student."""
        return (p for n, p in self._student.named_parameters() if "lora_" not in n)

    def __getattr__(self, name):  # config, generation_config, device, dtype, get_output_embeddings, ...
        student = self.__dict__.get("_student")
        if student is None or name.startswith("__"):  # copy/pickle probe dunders before __dict__ is filled
            raise AttributeError(name)
        return getattr(student, name)


def frozen_copy(model, dtype: Optional[str] = None):
    """A frozen, eval-mode deep copy (the default teacher: the initial student), cast to ``dtype`` when given
    (``model.teacher_dtype``: e.g. a bfloat16 teacher beside float32 master weights)."""
    teacher = copy.deepcopy(model)
    if dtype is not None:
        teacher.to(parse_dtype(dtype))
    freeze(teacher)
    return teacher


def check_same_tokenizer(student_tok, teacher_tok, teacher_name: str) -> None:
    """On-policy distillation scores the student's tokens with the teacher: both must share one tokenizer."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = len(set(s_vocab) - set(t_vocab))
        only_t = len(set(t_vocab) - set(s_vocab))
        moved = sum(1 for k, v in s_vocab.items() if k in t_vocab and t_vocab[k] != v)
        raise ModelError(f"{teacher_name}: teacher tokenizer differs from the student's ({len(s_vocab)} vs "
                         f"{len(t_vocab)} tokens; {only_s} only in student, {only_t} only in teacher, {moved} "
                         f"with different ids). On-policy distillation scores the student's tokens with the "
                         f"teacher, so both must share one tokenizer.")


def check_teacher_compatible(student_tok, teacher_tok, student_model, teacher_model, teacher_name: str) -> int:
    """The shared logit width to compare on, for a teacher whose tokenizer is the student's
    (:func:`check_same_tokenizer`, checked before its weights load).

    Embedding tables are often padded past the tokenizer (Qwen2.5 3B vs 72B: 151936 vs 152064 rows)
    although the tokenizer is identical, so logits are trimmed to the smaller width.
    """
    s_vocab = student_tok.get_vocab()
    width = min(output_vocab_size(student_model), output_vocab_size(teacher_model))
    if width < len(s_vocab):
        raise ModelError(f"{teacher_name}: logit width {width} is smaller than the tokenizer ({len(s_vocab)} tokens)")
    return width
