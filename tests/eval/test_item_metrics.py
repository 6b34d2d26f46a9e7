"""Per-item metric definitions: the same numbers as the torchmetrics and the games' metrics, and the sampled
harm's noise floor proved exactly (binomial enumeration, every pairing of k samples)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_ctx.eval.item_metrics import (
    RATE_KEYS,
    RatioOfSums,
    counts_from_rates,
    rate_items,
    removability_items,
    retention_items,
    sampled_items,
    stack_runs,
    values,
)
from lightning_ctx.eval.metrics import REMOVABILITY_KEYS, ContextRemovability, Retention
from lightning_ctx.tasks.games.evaluate import GameSummary, game_metrics

RATIO_KEYS = ("acc_no_ctx", "acc_ctx", "harm", "help", "both_correct", "len_no_ctx", "len_ctx", "trunc_no_ctx",
              "trunc_ctx")


def _random_eval(seed: int, shape):
    g = np.random.default_rng(seed)
    r0 = g.random(shape) < 0.6
    r1 = np.where(r0, g.random(shape) > 0.3, g.random(shape) < 0.4)
    l0, l1 = g.integers(0, 40, shape), g.integers(0, 60, shape)
    t0, t1 = g.random(shape) < 0.1, g.random(shape) < 0.2
    return r0, r1, l0, l1, t0, t1


def _brute_force(r0, r1, l0, l1, t0, t1) -> dict[str, float]:
    """float64 counts over every (answer without, answer with) pair, in plain Python."""
    pairs = list(zip(*(np.asarray(x).reshape(-1).tolist() for x in (r0, r1, l0, l1, t0, t1))))
    n = len(pairs)
    right0 = sum(a for a, *_ in pairs)
    div = lambda x, y: x / y if y else math.nan  # noqa: E731
    return {"acc_no_ctx": div(right0, n), "acc_ctx": div(sum(p[1] for p in pairs), n),
            "harm": div(sum(a and not b for a, b, *_ in pairs), right0),
            "help": div(sum(b and not a for a, b, *_ in pairs), n - right0),
            "both_correct": div(sum(a and b for a, b, *_ in pairs), n),
            "len_no_ctx": div(sum(p[2] for p in pairs), n), "len_ctx": div(sum(p[3] for p in pairs), n),
            "len_inflation": div(sum(p[3] for p in pairs), sum(p[2] for p in pairs)) - 1,
            "trunc_no_ctx": div(sum(p[4] for p in pairs), n), "trunc_ctx": div(sum(p[5] for p in pairs), n)}


@pytest.mark.parametrize("shape", [(37,), (23, 4)], ids=["greedy", "k_paired_samples"])
def test_removability_items_equal_the_torchmetric_and_a_float64_count(shape):
    data = _random_eval(0, shape)
    mine = values(removability_items(*data))
    assert tuple(mine) == REMOVABILITY_KEYS
    ref = _brute_force(*data)
    assert mine == ref  # exactly: the same integer sums, one float64 division
    tm = ContextRemovability()
    tm.update(*(torch.as_tensor(x).reshape(-1) for x in data))  # [N, k] -> the N*k pairs the evaluator feeds
    tm_out = {k: float(v) for k, v in tm.compute().items()}
    for k in RATIO_KEYS:  # the torchmetric divides in float64 and rounds to float32 once
        assert float(np.float32(mine[k])) == tm_out[k], k
    # len_inflation: the torchmetric subtracts 1 after rounding to float32
    assert mine["len_inflation"] == pytest.approx(tm_out["len_inflation"], abs=2 ** -23)


def test_removability_items_hand_counted_and_nan():
    # the hand-counted case of tests/eval/test_metrics.py
    out = values(removability_items([1, 1, 1, 0, 0], [1, 0, 1, 1, 0]))
    assert out == {"acc_no_ctx": 3 / 5, "acc_ctx": 3 / 5, "harm": 1 / 3, "help": 1 / 2, "both_correct": 2 / 5}
    none_right = values(removability_items([0, 0, 0], [1, 0, 1]))
    assert math.isnan(none_right["harm"]) and none_right["help"] == 2 / 3  # undefined, not 0 ("no harm")
    all_right = values(removability_items([1, 1], [1, 0]))
    assert math.isnan(all_right["help"]) and all_right["harm"] == 1 / 2
    empty = values(removability_items(np.zeros(0, bool), np.zeros(0, bool), [], []))
    assert all(math.isnan(v) for v in empty.values())
    assert math.isnan(values(removability_items([0, 1], [1, 1], [0, 0], [3, 4]))["len_inflation"])


def test_removability_items_reject_mismatched_or_missing_inputs():
    with pytest.raises(ValueError, match="same items"):
        removability_items([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="len_ctx"):
        removability_items([1, 0], [1, 0], [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="missing value"):
        removability_items([True, None], [True, False])


def test_games_use_the_same_definition():
    g = np.random.default_rng(3)
    won0, won1 = (g.random(40) < 0.5).tolist(), (g.random(40) < 0.6).tolist()
    zeros = [0] * 40
    theirs = game_metrics(GameSummary(won0, zeros, zeros, zeros, zeros), GameSummary(won1, zeros, zeros, zeros, zeros))
    mine = values(removability_items(won0, won1))
    rename = {"pass_no_ctx": "acc_no_ctx", "pass_ctx": "acc_ctx", "harm": "harm", "help": "help",
              "both_pass": "both_correct"}
    assert {k: theirs[k] for k in rename} == {k: mine[v] for k, v in rename.items()}


def test_retention_items_equal_the_torchmetric():
    g = np.random.default_rng(4)
    correct, ref = g.random(31) < 0.7, g.random(31) < 0.8
    mine = values(retention_items(correct, ref))
    tm = Retention()
    tm.update(torch.as_tensor(correct), torch.as_tensor(ref))
    out = tm.compute()
    assert mine["retention"] == correct.sum() / ref.sum()
    assert float(np.float32(mine["retention"])) == float(out["retention"])
    assert float(np.float32(mine["other_ctx_acc"])) == float(out["other_ctx_acc"])
    scalar = values(retention_items(correct, reference_accuracy=0.8))
    assert scalar["retention"] == pytest.approx(correct.mean() / 0.8, rel=1e-12)
    assert math.isnan(values(retention_items(correct, reference_accuracy=0.0))["retention"])
    assert set(retention_items(correct)) == {"other_ctx_acc"}


# ---------------------------------------------------------------- sampled metrics and the noise floor


def test_floor_numerator_is_unbiased_for_finite_k_and_the_plug_in_is_not():
    """E[r (k - r) / (k (k - 1))] = p (1 - p) exactly, r ~ Binomial(k, p); the plug-in p̂ (1 - p̂) is short by 1/k."""
    for k in (2, 3, 4, 8):
        for p in (0.1, 0.37, 0.5, 0.9):
            pmf = [math.comb(k, r) * p ** r * (1 - p) ** (k - r) for r in range(k + 1)]
            unbiased = sum(w * rate_items([r], [0], k)["harm_floor"].num[0] for r, w in enumerate(pmf))
            plug_in = sum(w * (r / k) * (1 - r / k) for r, w in enumerate(pmf))
            assert unbiased == pytest.approx(p * (1 - p), rel=1e-12)
            assert plug_in == pytest.approx(p * (1 - p) * (k - 1) / k, rel=1e-12)  # biased low


def test_rate_harm_is_the_paired_harm_averaged_over_every_pairing():
    """harm_rate's numerator = the paired count (sample j without with sample σ(j) with) averaged over all σ:
    the same expectation as today's paired estimate, with the pairing noise averaged out."""
    g = np.random.default_rng(5)
    k = 4
    a, b = g.random((6, k)) < 0.6, g.random((6, k)) < 0.5
    rates = rate_items(a.sum(1), b.sum(1), k)
    perms = list(itertools.permutations(range(k)))
    for i in range(6):
        paired = [sum(a[i, j] and not b[i, s[j]] for j in range(k)) / k for s in perms]
        assert rates["harm_rate"].num[i] == pytest.approx(sum(paired) / len(perms), abs=1e-12)
        helped = [sum(b[i, s[j]] and not a[i, j] for j in range(k)) / k for s in perms]
        assert rates["help_rate"].num[i] == pytest.approx(sum(helped) / len(perms), abs=1e-12)


def test_deterministic_model_has_no_floor_and_rate_harm_is_greedy_harm():
    g = np.random.default_rng(6)
    r0, r1 = g.random(50) < 0.6, g.random(50) < 0.5
    k = 5  # every sample agrees with the greedy answer
    out = values(sampled_items(np.repeat(r0[:, None], k, 1), np.repeat(r1[:, None], k, 1)))
    greedy = values(removability_items(r0, r1))
    assert out["harm_floor"] == 0.0 and out["help_floor"] == 0.0
    for key in ("harm", "harm_rate", "harm_excess"):
        assert out[key] == pytest.approx(greedy["harm"], abs=1e-15)
    for key in ("help", "help_rate", "help_excess"):
        assert out[key] == pytest.approx(greedy["help"], abs=1e-15)


def test_sampled_items_hand_counted():
    # 2 items, k = 2. item 0: without [1, 1], with [1, 0]; item 1: without [1, 0], with [0, 1]
    out = values(sampled_items([[1, 1], [1, 0]], [[1, 0], [0, 1]]))
    # paired: pairs (1,1) (1,0) (1,0) (0,1): harm 2/3, help 1/1
    assert out["harm"] == 2 / 3 and out["help"] == 1.0
    # p̂ = (1, 1/2), q̂ = (1/2, 1/2): harm_rate = (1 * 1/2 + 1/2 * 1/2) / (3/2) = 1/2
    assert out["harm_rate"] == pytest.approx(0.5)
    # u = (0, 1 * 1 / (2 * 1)) = (0, 1/2): harm_floor = (1/2) / (3/2) = 1/3, excess = 1/2 - 1/3 = 1/6
    assert out["harm_floor"] == pytest.approx(1 / 3) and out["harm_excess"] == pytest.approx(1 / 6)
    # help: 1 - p̂ = (0, 1/2); help_rate = (1/2 * 1/2) / (1/2) = 1/2; help_floor = (1/2) / (1/2) = 1
    assert out["help_rate"] == pytest.approx(0.5) and out["help_floor"] == pytest.approx(1.0)
    assert out["help_excess"] == pytest.approx(-0.5)
    assert set(RATE_KEYS) <= set(out)


def test_counts_from_rates_and_rate_checks():
    assert counts_from_rates([0.25, 0.5, 1.0, 0.0], 4).tolist() == [1, 2, 4, 0]
    with pytest.raises(ValueError, match="multiples of 1/k"):
        counts_from_rates([0.3], 4)
    with pytest.raises(ValueError, match="k >= 2"):
        rate_items([1], [0], 1)
    with pytest.raises(ValueError, match="between 0 and k"):
        rate_items([5], [0], 4)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        sampled_items([1, 0], [1, 0])


def test_stack_runs_is_the_mean_of_the_runs():
    runs = [removability_items(*_random_eval(s, (20,))[:2]) for s in range(3)]
    stacked = stack_runs(runs)
    for k, m in stacked.items():
        assert m.value() == pytest.approx(np.mean([r[k].value() for r in runs]), abs=1e-15)
    with pytest.raises(ValueError, match="same items"):
        stack_runs([runs[0], removability_items([1, 0], [1, 1])])
    undefined = stack_runs([removability_items([1, 0], [0, 0]), removability_items([0, 0], [1, 0])])
    assert math.isnan(undefined["harm"].value())  # one run's harm is undefined: no mean over the others
    with pytest.raises(ValueError, match="same"):
        RatioOfSums(np.zeros(3), np.zeros(4))
