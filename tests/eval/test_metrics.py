"""Context-removability metrics: hand-counted cases, edge cases, and DDP-style merging."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_ctx.eval.metrics import (
    REMOVABILITY_KEYS,
    ContextRemovability,
    HiddenCosine,
    MeanTokenKL,
    RemovabilityMetrics,
    Retention,
)

T = torch.tensor
B = lambda *xs: torch.tensor(xs, dtype=torch.bool)  # noqa: E731


def floats(d):
    return {k: float(v) for k, v in d.items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        x, y = float(a[k]), float(b[k])
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-6), k


def compute_quietly(metric):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
        return metric.compute()


# ---------------------------------------------------------------- ContextRemovability

# 5 items. item: 0 1 2 3 4
#   right without c: 1 1 1 0 0   -> 3 right
#   right with c:    1 0 1 1 0   -> 3 right
#   harm: right w/o & wrong with = item 1        -> 1/3
#   help: wrong w/o & right with = item 3 of {3,4} -> 1/2
#   both right: items 0, 2                     -> 2/5
#   len w/o c: 3 3 3 3 3 (mean 3); with c: 7 7 7 3 6 (mean 30/5 = 6) -> inflation 6/3 - 1 = 1
#   truncated with c: item 4 only -> 1/5; w/o c: none -> 0
R0 = B(1, 1, 1, 0, 0)
R1 = B(1, 0, 1, 1, 0)
L0 = T([3, 3, 3, 3, 3])
L1 = T([7, 7, 7, 3, 6])
TR0 = B(0, 0, 0, 0, 0)
TR1 = B(0, 0, 0, 0, 1)
EXPECTED = {
    "acc_no_ctx": 3 / 5,
    "acc_ctx": 3 / 5,
    "harm": 1 / 3,
    "help": 1 / 2,
    "both_correct": 2 / 5,
    "len_no_ctx": 3.0,
    "len_ctx": 6.0,
    "len_inflation": 1.0,
    "trunc_no_ctx": 0.0,
    "trunc_ctx": 1 / 5,
}


def test_removability_hand_counted():
    m = ContextRemovability()
    m.update(R0, R1, L0, L1, TR0, TR1)
    out = m.compute()
    assert tuple(out) == REMOVABILITY_KEYS
    assert all(v.ndim == 0 and v.is_floating_point() for v in out.values())
    assert floats(out) == pytest.approx(EXPECTED)


def test_removability_accumulates_over_updates_and_accepts_int_flags():
    m = ContextRemovability()
    m.update(R0[:2].int(), R1[:2].int(), L0[:2], L1[:2], TR0[:2], TR1[:2])
    m.update(R0[2:].long(), R1[2:].float(), L0[2:].float(), L1[2:], TR0[2:], TR1[2:])
    assert floats(m.compute()) == pytest.approx(EXPECTED)


def test_truncation_defaults_to_zero_when_not_given():
    m = ContextRemovability()
    m.update(R0, R1, L0, L1)
    out = floats(m.compute())
    assert out["trunc_no_ctx"] == 0.0 and out["trunc_ctx"] == 0.0
    assert out["harm"] == pytest.approx(1 / 3)


def test_harm_nan_when_nothing_right_without_context():
    m = ContextRemovability()
    m.update(B(0, 0, 0, 0), B(1, 0, 1, 0), T([2, 2, 2, 2]), T([2, 2, 2, 2]))
    out = floats(m.compute())
    assert math.isnan(out["harm"])  # undefined, not 0 ("no harm")
    assert out["help"] == pytest.approx(2 / 4)
    assert out["acc_no_ctx"] == 0.0 and out["both_correct"] == 0.0


def test_help_nan_when_everything_right_without_context():
    m = ContextRemovability()
    m.update(B(1, 1, 1, 1), B(1, 0, 1, 0), T([2, 2, 2, 2]), T([2, 2, 2, 2]))
    out = floats(m.compute())
    assert math.isnan(out["help"])
    assert out["harm"] == pytest.approx(2 / 4)
    assert out["len_inflation"] == 0.0


def test_empty_responses_count_as_length_zero_and_as_verified():
    # item 0's with-context response is empty (length 0) and the verifier said wrong;
    # item 1's no-context response is empty and the verifier (e.g. answer "") said right.
    m = ContextRemovability()
    m.update(B(1, 1), B(0, 1), T([2, 0]), T([0, 4]))
    out = floats(m.compute())
    assert out["len_no_ctx"] == 1.0  # (2 + 0) / 2
    assert out["len_ctx"] == 2.0  # (0 + 4) / 2
    assert out["len_inflation"] == pytest.approx(1.0)  # 2 / 1 - 1
    assert out["acc_no_ctx"] == 1.0 and out["acc_ctx"] == 0.5 and out["harm"] == 0.5


def test_len_inflation_nan_when_no_context_responses_all_empty():
    m = ContextRemovability()
    m.update(B(0, 0), B(0, 1), T([0, 0]), T([3, 5]))
    out = floats(m.compute())
    assert out["len_no_ctx"] == 0.0 and out["len_ctx"] == 4.0
    assert math.isnan(out["len_inflation"])


def test_removability_no_updates_is_all_nan():
    m = ContextRemovability()
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = floats(m.compute())
    assert tuple(out) == REMOVABILITY_KEYS and all(math.isnan(v) for v in out.values())
    e = torch.zeros(0, dtype=torch.bool)
    m.update(e, e, torch.zeros(0), torch.zeros(0))  # an empty batch is no data either
    assert all(math.isnan(v) for v in floats(m.compute()).values())


def test_removability_rejects_mismatched_inputs():
    m = ContextRemovability()
    with pytest.raises(ValueError, match="len_ctx"):
        m.update(R0, R1, L0, L1[:4])
    with pytest.raises(ValueError, match="truncated_ctx"):
        m.update(R0, R1, L0, L1, TR0, TR1[:2])


# ---------------------------------------------------------------- MeanTokenKL


def test_mean_token_kl_masking_ignores_padding():
    kl = T([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    m = MeanTokenKL()
    m.update(kl, mask)
    assert float(m.compute()) == pytest.approx((1 + 2 + 3 + 4) / 4)

    garbage = kl.clone()
    garbage[mask == 0] = torch.tensor([1e6, float("inf"), float("nan"), -5.0])
    m2 = MeanTokenKL()
    m2.update(garbage, mask.bool())
    assert float(m2.compute()) == pytest.approx(2.5)


def test_mean_token_kl_is_per_token_not_mean_of_batch_means():
    m = MeanTokenKL()
    m.update(T([[3.0]]), T([[1]]))
    m.update(T([[1.0, 1.0, 1.0]]), T([[1, 1, 1]]))
    assert float(m.compute()) == pytest.approx(6 / 4)  # a mean of batch means would be 2.0


def test_mean_token_kl_no_tokens_is_nan_and_mask_none_is_all():
    m = MeanTokenKL()
    m.update(T([[5.0, 7.0]]), T([[0, 0]]))
    assert math.isnan(float(m.compute()))
    m.update(T([[1.0, 3.0]]))
    assert float(m.compute()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):
        m.update(T([[1.0, 3.0]]), T([[1, 1, 1]]))


# ---------------------------------------------------------------- HiddenCosine


def test_hidden_cos_identical_is_exactly_one():
    # the "empty context" case: the context changes nothing, so hidden states are identical
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 10, 16, generator=g)
    for h_ctx in (h.clone(), [x.clone() for x in h]):
        m = HiddenCosine()
        m.update(h, h_ctx)
        out = floats(m.compute())
        assert set(out) == {"hidden_cos/layer_0", "hidden_cos/layer_1", "hidden_cos/layer_2", "hidden_cos/mean"}
        assert all(v == 1.0 for v in out.values())


def test_hidden_cos_constructed_values():
    # layer 0: token 0 orthogonal (0), token 1 opposite (-1)        -> -0.5
    # layer 1: token 0 parallel (1), token 1 at 45 degrees (1/sqrt2) -> (1 + 1/sqrt2) / 2
    a = [T([[1.0, 0.0], [0.0, 1.0]]), T([[1.0, 1.0], [2.0, 0.0]])]
    b = [T([[0.0, 1.0], [0.0, -2.0]]), T([[2.0, 2.0], [1.0, 1.0]])]
    m = HiddenCosine()
    m.update(a, b)
    out = floats(m.compute())
    l1 = (1 + 1 / math.sqrt(2)) / 2
    assert out["hidden_cos/layer_0"] == pytest.approx(-0.5)
    assert out["hidden_cos/layer_1"] == pytest.approx(l1)
    assert out["hidden_cos/mean"] == pytest.approx((-0.5 + l1) / 2)


def test_hidden_cos_zero_vectors():
    z = torch.zeros(1, 4)
    assert float(HiddenCosine.cosine(z, z)) == 1.0  # identical (both zero): 1 by convention
    assert float(HiddenCosine.cosine(z, torch.ones(1, 4))) == 0.0  # zero vs non-zero: 0, no NaN
    m = HiddenCosine(num_layers=1)
    m.update(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    assert floats(m.compute())["hidden_cos/mean"] == 1.0


def test_hidden_cos_mask_selects_response_positions():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 2, 3, 8, generator=g)  # [L, B, T, D]
    b = torch.randn(2, 2, 3, 8, generator=g)
    mask = T([[0, 1, 1], [1, 1, 0]])
    m_mask = HiddenCosine()
    m_mask.update(a, b, mask)
    b_garbage = b.clone()
    b_garbage[:, mask == 0] = 1e4  # padding positions must not matter
    m_garbage = HiddenCosine()
    m_garbage.update(list(a.to(torch.bfloat16)), list(b_garbage.to(torch.bfloat16)), mask)
    m_rows = HiddenCosine()
    m_rows.update(a[:, mask.bool()], b[:, mask.bool()])  # [L, N, D] with the same 4 tokens
    assert_same(m_mask.compute(), m_rows.compute())
    got, want = floats(m_garbage.compute()), floats(m_rows.compute())
    assert got == pytest.approx(want, abs=2e-2)  # bf16 inputs, float32 math
    assert m_mask.n_tokens.item() == 4


def test_hidden_cos_layer_count_is_fixed():
    m = HiddenCosine()
    m.update(torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="layers"):
        m.update(torch.ones(3, 3, 4), torch.ones(3, 3, 4))
    m.reset()
    assert m.cos_sum.shape == (2,)  # still 2 layers after reset
    with pytest.raises(ValueError, match="layers"):
        HiddenCosine(num_layers=4).update(torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        HiddenCosine().update(torch.ones(2, 3, 4), torch.ones(2, 3, 5))


def test_hidden_cos_no_updates_is_nan():
    out = floats(compute_quietly(HiddenCosine(num_layers=2)))
    assert set(out) == {"hidden_cos/layer_0", "hidden_cos/layer_1", "hidden_cos/mean"}
    assert all(math.isnan(v) for v in out.values())
    assert all(math.isnan(v) for v in floats(compute_quietly(HiddenCosine())).values())


# ---------------------------------------------------------------- Retention


def test_retention_scalar_reference():
    m = Retention(reference_accuracy=0.9)
    m.update(B(1, 1, 0, 1))
    out = floats(m.compute())
    assert out["other_ctx_acc"] == pytest.approx(0.75)
    assert out["retention"] == pytest.approx(0.75 / 0.9)


def test_retention_reference_set_later_missing_or_zero():
    m = Retention()
    m.update(B(1, 1, 0, 1))
    out = floats(m.compute())
    assert math.isnan(out["retention"]) and out["other_ctx_acc"] == pytest.approx(0.75)
    m.set_reference(0.5)  # invalidates the cached value
    assert floats(m.compute())["retention"] == pytest.approx(1.5)  # can exceed 1
    m.set_reference(0.0)
    assert math.isnan(floats(m.compute())["retention"])
    with pytest.raises(ValueError, match="reference_accuracy"):
        m.set_reference(93.0)  # a percentage, not a fraction


def test_retention_per_item_reference():
    # student right on items 0, 2, 3; initial model right on 0, 1, 2 -> 3 / 3
    m = Retention(reference_accuracy=0.1)  # per-item reference wins over the scalar
    m.update(B(1, 0, 1, 1, 0), B(1, 1, 1, 0, 0))
    out = floats(m.compute())
    assert out["retention"] == pytest.approx(1.0)
    assert out["other_ctx_acc"] == pytest.approx(3 / 5)
    assert out["reference_acc"] == pytest.approx(3 / 5)
    # second batch: student 1 of 4, initial model 4 of 4 -> total (3 + 1) / (3 + 4)
    m.update(B(1, 0, 0, 0), B(1, 1, 1, 1))
    assert floats(m.compute())["retention"] == pytest.approx(4 / 7)


def test_retention_edge_cases():
    m = Retention()
    m.update(B(1, 0), B(0, 0))  # initial model never right -> undefined
    assert math.isnan(floats(m.compute())["retention"])
    m.update(B(1, 1))  # mixing forms is a bug
    with pytest.raises(ValueError, match="reference_correct"):
        m.compute()
    out = floats(compute_quietly(Retention(reference_accuracy=0.5)))
    assert math.isnan(out["retention"]) and math.isnan(out["other_ctx_acc"])


# ---------------------------------------------------------------- merging (stands in for DDP sync)


def _hidden(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, n, 8, generator=g), torch.randn(3, n, 8, generator=g)


CASES = {
    "removability": (
        ContextRemovability,
        [(R0[:2], R1[:2], L0[:2], L1[:2], TR0[:2], TR1[:2]), (R0[2:], R1[2:], L0[2:], L1[2:], TR0[2:], TR1[2:])],
    ),
    "kl": (
        MeanTokenKL,
        [(T([[1.0, 2.0, 9.0]]), T([[1, 1, 0]])), (T([[4.0, 5.0], [6.0, 7.0]]), T([[1, 1], [1, 0]]))],
    ),
    "hidden": (HiddenCosine, [_hidden(0, 4), _hidden(1, 7)]),
    "retention_item": (Retention, [(B(1, 0, 1), B(1, 1, 1)), (B(0, 1), B(1, 0))]),
    "retention_scalar": (lambda: Retention(0.8), [(B(1, 0, 1),), (B(0, 1, 1, 1),)]),
}


def _concat(halves):
    out = []
    for parts in zip(*halves):
        dim = 1 if parts[0].ndim == 3 else 0  # hidden states: [L, N, D], tokens along dim 1
        if parts[0].ndim == 2 and parts[0].shape[1] != parts[1].shape[1]:  # kl [B, T]: pad T
            t = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, t - p.shape[1])) for p in parts]
        out.append(torch.cat(parts, dim))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_merge_state_equals_single_pass(name):
    make, halves = CASES[name]
    full = make()
    full.update(*_concat(halves))
    a, b = make(), make()
    a.update(*halves[0])
    b.update(*halves[1])
    a.merge_state(b)
    got, want = a.compute(), full.compute()
    if isinstance(want, dict):
        assert_same(got, want)
    else:
        assert float(got) == pytest.approx(float(want))


def _fake_gather(own, other):
    """A ``dist_sync_fn`` for 'rank 0' of a 2-rank world whose other rank holds ``other``'s states.

    It returns ``[mine, theirs]`` like ``gather_all_tensors``, so torchmetrics' real ``_sync_dist``
    (stack + sum) runs. A tensor that is not a state is HiddenCosine's layer-count handshake.
    """

    def gather(x, group=None):
        for m_own, m_other in zip(own, other):
            for attr in m_own._defaults:
                if getattr(m_own, attr) is x:
                    return [x, getattr(m_other, attr)]
        hidden_other = next(m for m in other if isinstance(m, HiddenCosine))
        return [x, torch.tensor([hidden_other.cos_sum.numel()])]

    return gather


@pytest.mark.parametrize("name", list(CASES))
def test_dist_sync_sum_reduce_equals_single_pass(name):
    make, halves = CASES[name]
    full = make()
    full.update(*_concat(halves))
    other = make()
    other.update(*halves[1])
    rank0 = make()
    rank0.update(*halves[0])
    rank0.distributed_available_fn = lambda: True
    rank0.dist_sync_fn = _fake_gather([rank0], [other])
    got, want = rank0.compute(), full.compute()
    if isinstance(want, dict):
        assert_same(got, want)
    else:
        assert float(got) == pytest.approx(float(want))
    assert int(rank0.n_updates) == 1  # local state restored after the synced compute


def test_hidden_cos_rank_without_data_learns_layer_count():
    h_a, h_b = _hidden(0, 5)
    full, busy = HiddenCosine(), HiddenCosine()
    full.update(h_a, h_b)
    busy.update(h_a, h_b)
    idle = HiddenCosine()  # never updated: 0-length state
    idle.distributed_available_fn = lambda: True
    idle.dist_sync_fn = _fake_gather([idle], [busy])
    assert_same(compute_quietly(idle), full.compute())
    assert idle.cos_sum.numel() == 0  # local state untouched
    lazy = HiddenCosine()
    lazy.merge_state(busy)
    assert_same(compute_quietly(lazy), full.compute())


# ---------------------------------------------------------------- RemovabilityMetrics


def test_container_only_removability_keys_when_nothing_else_updated():
    m = RemovabilityMetrics()
    assert isinstance(m, nn.Module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute before update" noise from unused parts
        empty = m.compute()
    assert list(empty) == list(REMOVABILITY_KEYS) and all(math.isnan(v) for v in empty.values())
    m.removability.update(R0, R1, L0, L1, TR0, TR1)
    out = m.compute()
    assert list(out) == list(REMOVABILITY_KEYS)
    assert all(type(v) is float for v in out.values())
    assert out == pytest.approx(EXPECTED)


def test_container_full_keys_values_and_reset():
    m = RemovabilityMetrics(num_layers=2, reference_accuracy=0.5)
    m.removability.update(R0, R1, L0, L1, TR0, TR1)
    m.ctx_kl.update(T([[1.0, 3.0, 100.0]]), T([[1, 1, 0]]))
    h = torch.randn(2, 4, 8)
    m.hidden.update(h, h.clone())
    m.retention.update(B(1, 1, 0, 0))
    out = m.compute()
    assert list(out) == [
        *REMOVABILITY_KEYS,
        "ctx_kl",
        "hidden_cos/layer_0",
        "hidden_cos/layer_1",
        "hidden_cos/mean",
        "retention",
        "other_ctx_acc",
    ]
    assert out["ctx_kl"] == pytest.approx(2.0)
    assert out["hidden_cos/mean"] == 1.0
    assert out["other_ctx_acc"] == pytest.approx(0.5) and out["retention"] == pytest.approx(1.0)
    m.set_reference(0.25)
    assert m.compute()["retention"] == pytest.approx(2.0)
    m.reset()
    assert list(m.compute()) == list(REMOVABILITY_KEYS)


def test_container_keys_agree_across_ranks():
    # rank 0 never fed ctx_kl / hidden / retention, rank 1 did: after sync both report them.
    busy, idle = RemovabilityMetrics(), RemovabilityMetrics()
    for m in (busy, idle):
        m.removability.update(R0, R1, L0, L1)
    busy.ctx_kl.update(T([[2.0, 4.0]]), T([[1, 1]]))
    h_a, h_b = _hidden(3, 4)
    busy.hidden.update(h_a, h_b)
    busy.retention.update(B(1, 0), B(1, 1))
    parts = lambda c: [c.removability, c.ctx_kl, c.hidden, c.retention]  # noqa: E731
    for mi in parts(idle):
        mi.distributed_available_fn = lambda: True
        mi.dist_sync_fn = _fake_gather(parts(idle), parts(busy))
    got, want = idle.compute(), busy.compute()
    assert got.keys() == want.keys()
    for k in REMOVABILITY_KEYS:  # both ranks saw the same removability data: counts double
        assert got[k] == pytest.approx(want[k], nan_ok=True)
    for k in ("ctx_kl", "hidden_cos/mean", "retention", "other_ctx_acc"):
        assert got[k] == pytest.approx(want[k])


def test_container_to_moves_metric_states():
    m = RemovabilityMetrics(num_layers=2).to("meta")
    assert m.removability.n_items.device.type == "meta"
    assert m.hidden.cos_sum.device.type == "meta"
    assert m.retention.n_correct.device.type == "meta"
    m = RemovabilityMetrics(num_layers=2).to("cpu", torch.float64)
    assert m.hidden.cos_sum.dtype == torch.float64 and m.removability.n_items.dtype == torch.long
    m.removability.update(R0, R1, L0, L1)
    assert m.compute()["harm"] == pytest.approx(1 / 3)
