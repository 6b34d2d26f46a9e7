"""EvaluationCallback, the base of both evaluation callbacks, with a stand-in evaluation and a stand-in trainer:
the schedule, the RNG isolation, what is logged and kept, and the uploaded files."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_ctx.eval.base_callback import Evaluation, EvaluationCallback
from lightning_ctx.eval.registry import REMOVABILITY, ItemRows


class Counting(EvaluationCallback):
    """Evaluates ``n`` items whose right/wrong flags are drawn from the torch RNG (so the RNG seen is visible)."""

    registry = REMOVABILITY
    curve_references = ("teacher_acc_ctx",)

    def __init__(self, n=20, **kwargs):
        super().__init__(**kwargs)
        self.n, self.draws, self.calls = n, [], []

    def measure_references(self, trainer, pl_module, split, before_training):
        return {"teacher_acc_ctx": 0.9}

    def evaluate(self, trainer, pl_module, split, prefix, step):
        self.calls.append((split, prefix, step))
        draw = torch.rand(2 * self.n)
        self.draws.append(draw)
        rows = [{"index": i, "correct_no_ctx": bool(draw[i] < 0.8), "correct_ctx": bool(draw[self.n + i] < 0.5),
                 "len_no_ctx": 3, "len_ctx": 4, "truncated_no_ctx": False, "truncated_ctx": False}
                for i in range(self.n)]
        metrics = self.registry.measure(ItemRows(rows), seed=self.seed, n_resamples=self.n_resamples)
        return Evaluation(metrics, self.n, {"rows": rows})

    def write_tables(self, folder, evaluation, *, stage, prefix, step, split):
        path = Path(folder) / "rows.json"
        path.write_text(json.dumps(evaluation.tables["rows"]))
        return [path]


class FolderLogger:
    """A logger with a ``log_dir`` (gets copies of the artifacts) that refuses NaN like some stores do."""

    def __init__(self, log_dir):
        self.log_dir, self.calls = str(log_dir), []

    def log_metrics(self, metrics, step=None):
        if any(isinstance(v, float) and math.isnan(v) for v in metrics.values()):
            raise ValueError("NaN refused")
        self.calls.append((step, dict(metrics)))


def _trainer(logger, step=0, fn="fit"):
    return SimpleNamespace(global_step=step, global_rank=0, world_size=1, loggers=[logger], callback_metrics={},
                           is_global_zero=True, sanity_checking=False, state=SimpleNamespace(fn=fn))


def test_schedule_state_rng_isolation_logging_and_files(tmp_path, caplog):
    cb = Counting(every_n_steps=2, seed=7, n_resamples=200)
    logger = FolderLogger(tmp_path / "logs")
    trainer, module = _trainer(logger), SimpleNamespace(device=torch.device("cpu"))

    torch.manual_seed(123)
    expected_after = torch.rand(4)
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO):
        cb.on_train_start(trainer, module)  # references once, then step 0
    assert torch.equal(torch.rand(4), expected_after)  # the training RNG is untouched by the evaluation
    torch.manual_seed(7)  # the evaluation drew from seed + rank
    assert torch.equal(cb.draws[0], torch.rand(40))

    for step in (1, 2, 3):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step)
    cb.on_train_end(trainer, module)  # step 3 not evaluated yet: evaluated now
    cb.on_train_end(trainer, module)  # the same step again: skipped
    trainer.state.fn = "validate"
    cb.on_validation_end(trainer, module)
    cb.on_test_end(trainer, module)
    assert cb.calls == [("val", "eval/", 0), ("val", "eval/", 2), ("val", "eval/", 3), ("val", "eval/", 3),
                        ("test", "test/", 3)]
    assert [h["step"] for h in cb.history] == [0, 2, 3]  # fit evaluations only (the curves)

    # every value logged at its step, with its interval; references once per split; NaN refused -> finite ones
    logged = {step: m for step, m in logger.calls if "eval/harm" in m}
    assert sorted(logged) == [0, 2, 3]
    assert logged[0]["eval/n_items"] == 20 and logged[0]["eval/harm_lo"] <= logged[0]["eval/harm"]
    assert [m for _, m in logger.calls if "ref/teacher_acc_ctx" in m] == [{"ref/teacher_acc_ctx": 0.9}]
    assert any("ref/test/teacher_acc_ctx" in m for _, m in logger.calls)
    assert not any("eval/retention" in m for _, m in logger.calls)
    assert float(trainer.callback_metrics["eval/harm"]) == pytest.approx(cb.history[-1]["metrics"]["harm"])
    cb.log_metrics(trainer, {"x": 1.0, "y": math.nan}, 9)
    assert logger.calls[-1] == (9, {"x": 1.0})
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[eval/step 0")]
    m0 = cb.history[0]["metrics"]
    assert summary == [f"[eval/step 0, val, 20 items] acc_no_ctx={m0['acc_no_ctx']:.3f} [{m0['acc_no_ctx_lo']:.3f}, "
                       f"{m0['acc_no_ctx_hi']:.3f}] " + summary[0].split("] ", 2)[2]]

    # the files: each step's table, the curves (fit only), under the prefix's folder
    logs = Path(logger.log_dir)
    assert {p.relative_to(logs).as_posix() for p in logs.rglob("*.*")} == {
        "eval/step_000000/rows.json", "eval/step_000002/rows.json", "eval/step_000003/rows.json",
        "eval/validate_step_000003/rows.json", "test/step_000003/rows.json", "eval/curves.png"}

    # state for resume: a fresh callback restored from it skips the step already evaluated
    restored = Counting(every_n_steps=2)
    restored.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert restored.history == cb.history and restored.references == cb.references
    trainer.state.fn = "fit"
    restored.on_train_end(trainer, module)
    assert restored.calls == []


def test_curves_draw_the_registry_metrics_with_bands():
    from lightning_ctx.eval.artifacts import curves_figure

    history = [{"step": s, "metrics": {"harm": h, "harm_lo": h - 0.1, "harm_hi": h + 0.1, "acc_ctx": 0.5,
                                       "len_ctx": 4.0, "help": 0.3}} for s, h in ((0, 0.2), (10, 0.4))]
    fig = curves_figure(history, REMOVABILITY, {"teacher_acc_ctx": 0.9})
    ax_acc, ax_len = fig.axes
    labels = [line.get_label() for line in ax_acc.lines]
    assert labels == ["acc_ctx", "harm", "ref teacher_acc_ctx"]  # registered curve metrics present; help has no curve
    (band,) = ax_acc.collections  # harm's interval (acc_ctx has none)
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), 0.1) and np.isclose(ys.max(), 0.5)
    assert [line.get_label() for line in ax_len.lines] == ["len_ctx"]
