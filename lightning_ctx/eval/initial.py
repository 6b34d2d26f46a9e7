"""The initial model of the evaluation references: the initial student with its own unquantized weights."""

from __future__ import annotations

from lightning_ctx.models.loading import parse_dtype


def initial_model(trainer, pl_module, before_training: bool):
    """The initial student, with its own unquantized weights (the reference of ``ref/initial_*`` and retention).

    The teacher when it is the frozen initial student with the student's own weights (``model.teacher`` unset, or
    ``base``); else the student itself before any training step. When the teacher is the initial student re-loaded
    4/8-bit (``model.teacher_quantization``) or cast to another dtype (``model.teacher_dtype``), it is *not* the
    initial model: after training started, the initial weights are the LoRA student's base weights (adapter off) or
    are re-loaded from ``model.student``. None with a separate teacher once training started.
    """
    hp = getattr(pl_module, "hparams", {})
    get = hp.get if hasattr(hp, "get") else (lambda key, default=None: default)
    teacher_src, teacher_dtype = get("teacher"), get("teacher_dtype")
    recast = teacher_dtype is not None and parse_dtype(teacher_dtype) != parse_dtype(get("dtype", "float32"))
    altered = bool(get("teacher_quantization")) or recast
    teacher = getattr(pl_module, "teacher", None)
    # None = frozen copy of the initial student; "base" = the LoRA student's base weights, adapter off.
    if teacher_src in (None, "base") and teacher is not None and not (teacher_src is None and altered):
        return teacher
    if before_training and trainer is not None and trainer.global_step == 0:
        return pl_module.student
    if teacher_src is None and altered and get("student"):
        return unquantized_initial_student(pl_module.student, pl_module.hparams)
    return None


def unquantized_initial_student(student, hp):
    """The initial ``student`` with its own weights: the LoRA base weights with the adapter off, or ``model.student``
    (``hp``: the module's hyperparameters) re-loaded (frozen, on the student's device; freed when the references are
    done)."""
    from lightning_ctx.models.loading import freeze, load_causal_lm
    from lightning_ctx.models.teachers import BaseWeightsTeacher

    if hasattr(student, "disable_adapter"):
        return BaseWeightsTeacher(student)
    model = load_causal_lm(hp.student, hp.get("dtype", "float32"), hp.get("trust_remote_code", False),
                           hp.get("local_files_only", True))
    freeze(model)
    return model.to(next(student.parameters()).device)
