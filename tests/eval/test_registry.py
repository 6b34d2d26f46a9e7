"""The metric registry: roles in one place, values and intervals from the per-item rows, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_ctx.eval.intervals import bootstrap
from lightning_ctx.eval.item_metrics import RatioOfSums, removability_items, retention_items, sampled_items, values
from lightning_ctx.eval.registry import REMOVABILITY, ItemRows, MetricRegistry, MetricSpec, metric_direction


def _rows(g, n, k=0):
    rows = []
    for i in range(n):
        row = {"index": i, "correct_no_ctx": bool(g.random() < 0.7), "correct_ctx": bool(g.random() < 0.6),
               "len_no_ctx": int(g.integers(1, 9)), "len_ctx": int(g.integers(1, 9)),
               "truncated_no_ctx": bool(g.random() < 0.1), "truncated_ctx": bool(g.random() < 0.1)}
        for tag, p in (("no_ctx", 0.6), ("ctx", 0.5)):
            if k:
                row[f"sampled_correct_{tag}"] = (g.random(k) < p).tolist()
                row[f"sampled_len_{tag}"] = g.integers(1, 9, k).tolist()
                row[f"sampled_truncated_{tag}"] = (g.random(k) < 0.1).tolist()
        rows.append(row)
    return rows


def test_measure_is_the_item_definitions_and_their_bootstrap():
    g = np.random.default_rng(0)
    rows = _rows(g, 40, k=3)
    ret = [{"index": i, "correct": bool(g.random() < 0.8), "reference_correct": bool(g.random() < 0.9)}
           for i in range(25)]
    got = REMOVABILITY.measure(ItemRows(rows, ret), seed=5, n_resamples=300)
    col = lambda rs, key: np.array([r[key] for r in rs], dtype=float)  # noqa: E731
    greedy = removability_items(*(col(rows, k) for k in ("correct_no_ctx", "correct_ctx", "len_no_ctx", "len_ctx",
                                                         "truncated_no_ctx", "truncated_ctx")))
    sampled = sampled_items(col(rows, "sampled_correct_no_ctx"), col(rows, "sampled_correct_ctx"))
    retention = retention_items(col(ret, "correct"), col(ret, "reference_correct"))
    for name, value in {**values(greedy), **{f"sampled/{k}": v for k, v in values(sampled).items()},
                        **values(retention)}.items():
        assert got[name] == pytest.approx(value, rel=1e-12, nan_ok=True), name
    # the intervals: one bootstrap over the N items for the greedy and sampled metrics, another over the retention items
    iv = bootstrap({**greedy, **{f"sampled/{k}": m for k, m in sampled.items()}}, n_resamples=300, seed=5)
    assert (got["harm_lo"], got["harm_hi"]) == (iv["harm"].lo, iv["harm"].hi)
    assert (got["sampled/harm_excess_lo"], got["sampled/harm_excess_hi"]) == (iv["sampled/harm_excess"].lo,
                                                                            iv["sampled/harm_excess"].hi)
    assert got["retention_lo"] == bootstrap(retention, n_resamples=300, seed=5)["retention"].lo
    assert got["n_items"] == 40 and got["n_retention_items"] == 25
    # the sampled lengths are those of the k samples (paired per item)
    assert got["sampled/len_ctx"] == pytest.approx(col(rows, "sampled_len_ctx").mean())
    plain = REMOVABILITY.measure(ItemRows(rows), n_resamples=0)
    assert "harm_lo" not in plain and plain["harm"] == got["harm"] and "retention" not in plain


def test_retention_reference_scalar_or_missing():
    ret = [{"index": i, "correct": i % 2 == 0} for i in range(10)]
    scalar = REMOVABILITY.measure(ItemRows([], ret, {"reference_accuracy": 0.8}), n_resamples=0)
    assert scalar["retention"] == pytest.approx(0.5 / 0.8) and scalar["other_ctx_acc"] == 0.5
    missing = REMOVABILITY.measure(ItemRows([], ret), n_resamples=0)
    assert math.isnan(missing["retention"]) and missing["other_ctx_acc"] == 0.5  # no reference: NaN, not 0


def test_roles_are_read_from_the_specs():
    assert REMOVABILITY.curve_names("fraction") == ["acc_no_ctx", "acc_ctx", "harm", "both_correct", "retention"]
    assert REMOVABILITY.curve_names("length") == ["len_no_ctx", "len_ctx"]
    assert REMOVABILITY.compare_names() == ["acc_no_ctx", "acc_ctx", "harm", "len_inflation", "harm_excess",
                                            "retention"]
    assert metric_direction("harm") == -1 and metric_direction("sampled/harm_excess") == -1
    assert metric_direction("len_inflation") == 0 and metric_direction("unregistered") == 1
    line = REMOVABILITY.summary_line({"acc_no_ctx": 0.9, "harm": 0.05, "harm_lo": 0.01, "harm_hi": 0.11,
                                      "retention": math.nan, "help": 0.3})
    assert line == "acc_no_ctx=0.900 harm=0.050 [0.010, 0.110] retention=nan"


def test_registration_errors():
    reg = MetricRegistry("test-registry")
    try:
        reg.add(MetricSpec("x"), items=lambda rows: {"x": RatioOfSums(np.ones(2), np.ones(2)),
                                                     "y": RatioOfSums(np.ones(2), np.ones(2))})
        with pytest.raises(ValueError, match=r"returned \['y'\], not registered"):
            reg.measure(ItemRows([{"a": 1}, {"a": 2}]))
        with pytest.raises(ValueError, match="already registered"):
            reg.add(MetricSpec("x"))
        with pytest.raises(ValueError, match="direction 1 here but -1 in removability"):
            reg.add(MetricSpec("harm"))
        with pytest.raises(ValueError, match="curve must be one of"):
            MetricSpec("z", curve="log")
        with pytest.raises(ValueError, match="no 'correct_no_ctx' column"):
            REMOVABILITY.measure(ItemRows([{"index": 0}]))
    finally:
        from lightning_ctx.eval import registry

        registry._REGISTRIES.remove(reg)
