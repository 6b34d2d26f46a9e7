"""Objectives against independent float64 references (plain tensors, no models)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from lightning_ctx.objectives import (
    anchored_consistency,
    masked_mean,
    per_token_divergence,
    sampled_token_loss,
    token_divergence,
    token_entropy,
    token_logprobs,
)

torch.set_num_threads(1)

B, T, V = 4, 7, 23
LENGTHS = (7, 3, 0, 5)  # ragged, one row fully masked
ATOL = 1e-5


# ----------------------------------------------------------------------------- fixtures/helpers


def make_mask(lengths=LENGTHS, t=T) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def make_logits(seed: int, scale: float = 2.0, shape=(B, T, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def ref_reduce(values64: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.double()
    return (values64 * m).sum() / m.sum()


def ref_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, float64, via torch.distributions."""
    return kl_divergence(
        Categorical(logits=p_logits.double()), Categorical(logits=q_logits.double())
    )


def ref_jsd(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float) -> torch.Tensor:
    p_s = torch.softmax(s_logits.double(), -1)
    p_t = torch.softmax(t_logits.double(), -1)
    p_m = beta * p_t + (1 - beta) * p_s
    kl_tm = (p_t * (p_t.log() - p_m.log())).sum(-1)
    kl_sm = (p_s * (p_s.log() - p_m.log())).sum(-1)
    return beta * kl_tm + (1 - beta) * kl_sm


def ref_index_set(logits_list: list[torch.Tensor], k: int) -> torch.Tensor:
    """Bool membership [B, T, V] of the union of each tensor's top-k (scatter, not gather)."""
    member = torch.zeros(logits_list[0].shape, dtype=torch.bool)
    for logits in logits_list:
        idx = logits.double().topk(k, dim=-1).indices
        member.scatter_(-1, idx, True)
    return member


def ref_set_logprobs(logits: torch.Tensor, member: torch.Tensor, renormalize: bool):
    # Log-probs over all of V, normalised over the set (renormalize) or over V; entries outside
    # the set stay finite (ignored by ref_set_kl) so float64 autograd gives no NaN.
    x = logits.double()
    z = x.masked_fill(~member, float("-inf")) if renormalize else x
    return x - torch.logsumexp(z, -1, keepdim=True)


def ref_set_kl(log_p, log_q, member):
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(member, terms, torch.zeros((), dtype=terms.dtype)).sum(-1)


def grads(loss: torch.Tensor, *inputs: torch.Tensor):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# ----------------------------------------------------------------------------- basic helpers


def test_masked_mean_is_per_token_over_batch():
    mask = make_mask()
    vals = make_logits(0)[..., 0]
    got = masked_mean(vals, mask)
    want = ref_reduce(vals, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # The per-token mean differs from a mean of row means on ragged masks (test discriminates).
    rows = [vals[i, :n].double().mean() for i, n in enumerate(LENGTHS) if n]
    assert abs(torch.stack(rows).mean().item() - want.item()) > 1e-3


def test_masked_mean_ignores_nonfinite_padding_and_mask_dtypes():
    mask = make_mask()
    vals = make_logits(1)[..., 0]
    dirty = vals.masked_fill(~mask, float("nan"))
    want = masked_mean(vals, mask)
    for m in (mask, mask.long(), mask.float()):
        torch.testing.assert_close(masked_mean(dirty, m), want, atol=0, rtol=0)


def test_token_logprobs_matches_reference():
    logits = make_logits(2)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    want = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    for cs in (None, 3):
        got = token_logprobs(logits, tokens, chunk_size=cs)
        assert got.dtype == torch.float32 and got.shape == (B, T)
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)


def test_token_entropy_matches_reference():
    logits, mask = make_logits(3), make_mask()
    want = ref_reduce(Categorical(logits=logits.double()).entropy(), mask)
    for cs in (None, 2):
        got = token_entropy(logits, mask, chunk_size=cs)
        assert not got.requires_grad
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- full-vocab KLs


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_kl_full_vocab_value_and_grad(kind):
    s, t, mask = make_logits(10), make_logits(11), make_mask()
    s32 = s.clone().requires_grad_(True)
    got = token_divergence(s32, t, mask, kind=kind)
    assert got.dtype == torch.float32 and got.dim() == 0

    s64 = s.double().requires_grad_(True)
    per = ref_kl(s64, t) if kind == "reverse_kl" else ref_kl(t, s64)
    want = ref_reduce(per, mask)
    torch.testing.assert_close(got.double(), want.detach(), atol=ATOL, rtol=0)

    (g32,) = grads(got, s32)
    (g64,) = grads(want, s64)
    torch.testing.assert_close(g32.double(), g64, atol=1e-6, rtol=1e-4)


def test_forward_and_reverse_differ():
    # Guards the direction tests above: the two KLs are genuinely different on this data.
    s, t, mask = make_logits(10), make_logits(11), make_mask()
    fwd = token_divergence(s, t, mask, kind="forward_kl")
    rev = token_divergence(s, t, mask, kind="reverse_kl")
    assert abs(fwd.item() - rev.item()) > 1e-2


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_reference(beta):
    s, t, mask = make_logits(12), make_logits(13), make_mask()
    s32 = s.clone().requires_grad_(True)
    got = token_divergence(s32, t, mask, kind="jsd", beta=beta)
    s64 = s.double().requires_grad_(True)
    want = ref_reduce(ref_jsd(s64, t, beta), mask)
    torch.testing.assert_close(got.double(), want.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(grads(got, s32)[0].double(), grads(want, s64)[0], atol=1e-6, rtol=1e-4)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, mask = make_logits(14), make_logits(15), make_mask()
    fwd = ref_reduce(ref_kl(t, s), mask)
    rev = ref_reduce(ref_kl(s, t), mask)
    got0 = token_divergence(s, t, mask, kind="jsd", beta=0.0)
    got1 = token_divergence(s, t, mask, kind="jsd", beta=1)
    torch.testing.assert_close(got0.double(), fwd, atol=ATOL, rtol=0)
    torch.testing.assert_close(got1.double(), rev, atol=ATOL, rtol=0)
    # Near the endpoints the mixture JSD is small, far from the KLs: endpoints really are special.
    near0 = token_divergence(s, t, mask, kind="jsd", beta=1e-4)
    assert near0.item() < 0.01 * fwd.item()


def test_per_token_divergence_values_and_zero_padding():
    s, t, mask = make_logits(16), make_logits(17), make_mask()
    got = per_token_divergence(s, t, mask, kind="reverse_kl")
    assert got.shape == (B, T) and got.dtype == torch.float32
    want = ref_kl(s, t)
    torch.testing.assert_close(got[mask].double(), want[mask], atol=ATOL, rtol=0)
    assert torch.all(got[~mask] == 0)
    # Without a mask every position is filled in.
    torch.testing.assert_close(per_token_divergence(s, t).double(), want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- top-k scope


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("union", [False, True])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_topk_matches_reference(kind, union, renormalize):
    k, beta = 5, 0.3
    s, t, mask = make_logits(20), make_logits(21), make_mask()
    s32 = s.clone().requires_grad_(True)
    got = token_divergence(
        s32, t, mask, kind=kind, beta=beta, scope="topk", topk=k,
        topk_union_teacher=union, topk_renormalize=renormalize,
    )

    member = ref_index_set([s, t] if union else [s], k)
    if union:  # the union must actually add indices for this test to cover de-duplication
        sizes = member.sum(-1)
        assert sizes.max() > k and sizes.min() < 2 * k
    s64 = s.double().requires_grad_(True)
    log_s = ref_set_logprobs(s64, member, renormalize)
    log_t = ref_set_logprobs(t, member, renormalize)
    if kind == "reverse_kl":
        per = ref_set_kl(log_s, log_t, member)
    elif kind == "forward_kl":
        per = ref_set_kl(log_t, log_s, member)
    else:
        p_m = beta * log_t.exp() + (1 - beta) * log_s.exp()
        log_m = torch.where(member, p_m, torch.ones((), dtype=p_m.dtype)).log()
        per = beta * ref_set_kl(log_t, log_m, member) + (1 - beta) * ref_set_kl(log_s, log_m, member)
    want = ref_reduce(per, mask)
    torch.testing.assert_close(got.double(), want.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(grads(got, s32)[0].double(), grads(want, s64)[0], atol=1e-6, rtol=1e-4)


def test_topk_union_deduplicates_shared_indices():
    # Teacher with the same ranking as the student: union == student's set, so the result must
    # equal the non-union one (double-counted duplicates would change it).
    s, mask = make_logits(22), make_mask()
    t = s * 1.7 + 0.3
    for renorm in (True, False):
        kw = dict(kind="reverse_kl", scope="topk", topk=6, topk_renormalize=renorm)
        plain = token_divergence(s, t, mask, **kw)
        union = token_divergence(s, t, mask, topk_union_teacher=True, **kw)
        assert abs(plain.item()) > 1e-3  # (a truncated sum may be negative)
        torch.testing.assert_close(union, plain, atol=1e-6, rtol=0)


def test_topk_with_k_at_least_vocab_equals_full():
    s, t, mask = make_logits(23), make_logits(24), make_mask()
    full = token_divergence(s, t, mask, kind="forward_kl")
    for renorm in (True, False):
        top = token_divergence(s, t, mask, kind="forward_kl", scope="topk", topk=10 * V,
                               topk_renormalize=renorm)
        torch.testing.assert_close(top, full, atol=1e-6, rtol=0)


def test_topk_truncated_sum_differs_from_renormalized():
    s, t, mask = make_logits(25), make_logits(26), make_mask()
    a = token_divergence(s, t, mask, scope="topk", topk=3, topk_renormalize=True)
    b = token_divergence(s, t, mask, scope="topk", topk=3, topk_renormalize=False)
    assert abs(a.item() - b.item()) > 1e-3


# ----------------------------------------------------------------------------- sampled-token loss


def test_sampled_token_loss_value_and_hand_derived_grad():
    s, mask = make_logits(30), make_mask()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    teacher_lp = torch.log_softmax(make_logits(31), -1).gather(-1, tokens[..., None]).squeeze(-1)

    s32 = s.clone().requires_grad_(True)
    got = sampled_token_loss(s32, teacher_lp, tokens, mask)
    (g32,) = grads(got, s32)

    # float64 reference: L = -sum m A log s(y) / N with A = log T(y) - log s(y) held fixed.
    p = torch.softmax(s.double(), -1)
    log_sy = p.log().gather(-1, tokens[..., None]).squeeze(-1)
    adv = teacher_lp.double() - log_sy
    m, n = mask.double(), mask.double().sum()
    want = -(m * adv * log_sy).sum() / n
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    # d/dz_v [-A log s(y)] = -A (1[v = y] - s(v))
    want_grad = (-(m * adv) / n)[..., None] * (onehot - p)

    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(g32.double(), want_grad, atol=1e-6, rtol=1e-4)
    # The stop-gradient matters: differentiating through A would give a different gradient.
    s64 = s.double().requires_grad_(True)
    lsy = torch.log_softmax(s64, -1).gather(-1, tokens[..., None]).squeeze(-1)
    no_sg = -(m * (teacher_lp.double() - lsy) * lsy).sum() / n
    assert (grads(no_sg, s64)[0] - want_grad).abs().max() > 1e-3


def test_sampled_token_loss_ignores_padding_ids_and_nan_teacher():
    s, mask = make_logits(32), make_mask()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    teacher_lp = -torch.rand(B, T, generator=torch.Generator().manual_seed(3))
    s1 = s.clone().requires_grad_(True)
    clean = sampled_token_loss(s1, teacher_lp, tokens, mask)
    s2 = s.clone().requires_grad_(True)
    dirty = sampled_token_loss(
        s2, teacher_lp.masked_fill(~mask, float("nan")), tokens.masked_fill(~mask, -100), mask
    )
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)
    g1, g2 = grads(clean, s1)[0], grads(dirty, s2)[0]
    assert torch.isfinite(g2).all()
    torch.testing.assert_close(g2, g1, atol=0, rtol=0)


# ----------------------------------------------------------------------------- anchored consistency


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_anchored_consistency_matches_reference(direction):
    no, ctx, mask = make_logits(40), make_logits(41), make_mask()
    ctx32 = ctx.clone().requires_grad_(True)
    no32 = no.clone().requires_grad_(True)
    got = anchored_consistency(no32, ctx32, mask, direction=direction)

    ctx64 = ctx.double().requires_grad_(True)
    anchor = no.double()  # constant: the stop-gradient
    fwd, rev = ref_kl(anchor, ctx64), ref_kl(ctx64, anchor)
    per = {"forward": fwd, "reverse": rev, "symmetric": 0.5 * (fwd + rev)}[direction]
    want = ref_reduce(per, mask)
    torch.testing.assert_close(got.double(), want.detach(), atol=ATOL, rtol=0)

    g_no, g_ctx = grads(got, no32, ctx32)
    assert g_no is None or torch.all(g_no == 0)
    torch.testing.assert_close(g_ctx.double(), grads(want, ctx64)[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_anchored_consistency_without_detach_flows_to_both(direction):
    no, ctx, mask = make_logits(42), make_logits(43), make_mask()
    no32, ctx32 = no.clone().requires_grad_(True), ctx.clone().requires_grad_(True)
    got = anchored_consistency(no32, ctx32, mask, direction=direction, detach_anchor=False)
    no64, ctx64 = no.double().requires_grad_(True), ctx.double().requires_grad_(True)
    fwd, rev = ref_kl(no64, ctx64), ref_kl(ctx64, no64)
    want = ref_reduce({"forward": fwd, "reverse": rev, "symmetric": 0.5 * (fwd + rev)}[direction], mask)
    torch.testing.assert_close(got.double(), want.detach(), atol=ATOL, rtol=0)
    g = grads(got, no32, ctx32)
    g_ref = grads(want, no64, ctx64)
    assert g[0] is not None and g[0].abs().max() > 1e-4
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-4)


def test_anchored_consistency_topk_uses_anchor_indices():
    no, ctx, mask = make_logits(44), make_logits(45), make_mask()
    k = 4
    got = anchored_consistency(no, ctx, mask, direction="forward", scope="topk", topk=k)
    member = ref_index_set([no], k)  # the anchor's top-k, not the ctx pass's
    per = ref_set_kl(ref_set_logprobs(no, member, True), ref_set_logprobs(ctx, member, True), member)
    torch.testing.assert_close(got.double(), ref_reduce(per, mask), atol=ATOL, rtol=0)
    other = ref_index_set([ctx], k)
    per_other = ref_set_kl(ref_set_logprobs(no, other, True), ref_set_logprobs(ctx, other, True), other)
    assert abs(ref_reduce(per_other, mask).item() - got.item()) > 1e-3


# ----------------------------------------------------------------------------- stop-gradient


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_teacher_receives_no_gradient(kind):
    s = make_logits(50).requires_grad_(True)
    t = make_logits(51).requires_grad_(True)
    token_divergence(s, t, make_mask(), kind=kind).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().max() > 0


# ----------------------------------------------------------------------------- chunking

CHUNK_CASES = [
    dict(kind="reverse_kl"),
    dict(kind="forward_kl"),
    dict(kind="jsd", beta=0.3),
    dict(kind="reverse_kl", scope="topk", topk=5),
    dict(kind="forward_kl", scope="topk", topk=5, topk_renormalize=False),
    dict(kind="jsd", beta=0.7, scope="topk", topk=5, topk_union_teacher=True),
]


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
@pytest.mark.parametrize("kw", CHUNK_CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_token_divergence_chunked_equals_unchunked(kw, chunk_size):
    s, t, mask = make_logits(60), make_logits(61), make_mask()
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref = token_divergence(s1, t, mask, **kw)
    got = token_divergence(s2, t, mask, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grads(got, s2)[0], grads(ref, s1)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("scope", ["full", "topk"])
def test_anchored_consistency_chunked_equals_unchunked(direction, detach, scope):
    no, ctx, mask = make_logits(62), make_logits(63), make_mask()
    ins1 = [x.clone().requires_grad_(True) for x in (no, ctx)]
    ins2 = [x.clone().requires_grad_(True) for x in (no, ctx)]
    kw = dict(direction=direction, detach_anchor=detach, scope=scope, topk=5)
    ref = anchored_consistency(*ins1, mask, **kw)
    got = anchored_consistency(*ins2, mask, chunk_size=3, **kw)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    for a, b in zip(grads(got, *ins2), grads(ref, *ins1)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_sampled_token_loss_chunked_equals_unchunked():
    s, mask = make_logits(64), make_mask()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    teacher_lp = -torch.rand(B, T, generator=torch.Generator().manual_seed(5))
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref = sampled_token_loss(s1, teacher_lp, tokens, mask)
    got = sampled_token_loss(s2, teacher_lp, tokens, mask, chunk_size=2)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grads(got, s2)[0], grads(ref, s1)[0], atol=1e-6, rtol=0)


def _fresh_saved_bytes(fn, inputs) -> int:
    """Bytes of V-wide tensors autograd saves for backward that are not views of ``inputs``."""
    ptrs = {x.untyped_storage().data_ptr() for x in inputs}
    fresh = []

    def pack(x):
        if x.dim() == 3 and x.shape[-1] == V and x.untyped_storage().data_ptr() not in ptrs:
            fresh.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_keeps_no_vocab_sized_activations_for_backward(dtype):
    # The memory contract: with chunk_size, backward does not hold float32 [B, T, V] log-probs
    # (they are recomputed per chunk). Unchunked, it does (so this check can fail).
    s = make_logits(65).to(dtype).requires_grad_(True)
    t = make_logits(66).to(dtype)
    mask = make_mask()
    unchunked = _fresh_saved_bytes(lambda: token_divergence(s, t, mask), [s, t])
    chunked = _fresh_saved_bytes(lambda: token_divergence(s, t, mask, chunk_size=2), [s, t])
    assert unchunked >= B * T * V * 4
    assert chunked == 0


# ----------------------------------------------------------------------------- masking


def _perturb_padding(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    noise = make_logits(seed, scale=30.0, shape=x.shape)
    return torch.where(mask[..., None], x, noise)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda s, o, m: token_divergence(s, o, m, kind="reverse_kl"),
        lambda s, o, m: token_divergence(s, o, m, kind="jsd", chunk_size=3),
        lambda s, o, m: token_divergence(s, o, m, kind="forward_kl", scope="topk", topk=4,
                                         topk_union_teacher=True),
        lambda s, o, m: anchored_consistency(o, s, m, direction="symmetric", detach_anchor=False),
    ],
    ids=["reverse", "jsd-chunked", "topk-union", "consistency"],
)
def test_padded_positions_do_not_matter(loss_fn):
    s, o, mask = make_logits(70), make_logits(71), make_mask()
    s1 = s.clone().requires_grad_(True)
    s2 = _perturb_padding(s, mask, 72).requires_grad_(True)
    o2 = _perturb_padding(o, mask, 73)
    ref = loss_fn(s1, o, mask)
    got = loss_fn(s2, o2, mask)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    g1, g2 = grads(ref, s1)[0], grads(got, s2)[0]
    torch.testing.assert_close(g2[mask], g1[mask], atol=1e-7, rtol=0)
    assert torch.all(g2[~mask] == 0)
    # And the unmasked positions do matter (the comparison above is not vacuous).
    s3 = s.clone()
    s3[0, 0, :3] += 5.0  # a shift of all logits would leave the softmax unchanged
    assert abs(loss_fn(s3, o, mask).item() - ref.item()) > 1e-4


def test_all_masked_returns_connected_zero():
    s = make_logits(74).requires_grad_(True)
    t = make_logits(75)
    empty = torch.zeros(B, T, dtype=torch.bool)
    losses = [
        token_divergence(s, t, empty),
        token_divergence(s, t, empty, scope="topk", topk=3, chunk_size=2),
        anchored_consistency(t, s, empty),
        sampled_token_loss(s, torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long), empty),
    ]
    for loss in losses:
        assert loss.item() == 0.0 and loss.grad_fn is not None
        (g,) = grads(loss, s)
        assert g is not None and torch.all(g == 0)


def test_mask_dtypes_agree():
    s, t, mask = make_logits(76), make_logits(77), make_mask()
    ref = token_divergence(s, t, mask)
    for m in (mask.long(), mask.int(), mask.float()):
        torch.testing.assert_close(token_divergence(s, t, m), ref, atol=0, rtol=0)


# ----------------------------------------------------------------------------- dtypes


def test_bf16_inputs_give_float32_results():
    s = make_logits(80).bfloat16().requires_grad_(True)
    t = make_logits(81).bfloat16()
    mask = make_mask()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(6))
    outs = {
        "reverse": token_divergence(s, t, mask),
        "jsd-topk": token_divergence(s, t, mask, kind="jsd", scope="topk", topk=5, chunk_size=3),
        "cons": anchored_consistency(t, s, mask),
        "logprobs": token_logprobs(s, tokens),
        "entropy": token_entropy(s, mask),
        "per_token": per_token_divergence(s, t, mask),
    }
    for name, out in outs.items():
        assert out.dtype == torch.float32, name
    # bf16 values are exact in float64, so the float32 computation must match float64 closely.
    torch.testing.assert_close(outs["reverse"].double(), ref_reduce(ref_kl(s, t), mask).detach(),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(outs["cons"].double(), ref_reduce(ref_kl(t, s), mask).detach(),
                               atol=ATOL, rtol=0)
    (g,) = grads(outs["reverse"], s)
    assert g.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- validation


def _bad_calls():
    s, t, mask = make_logits(90), make_logits(91), make_mask()
    tok = torch.zeros(B, T, dtype=torch.long)
    lp = torch.zeros(B, T)
    return {
        "kind": lambda: token_divergence(s, t, mask, kind="kl"),
        "scope": lambda: token_divergence(s, t, mask, scope="sampled"),
        "beta_high": lambda: token_divergence(s, t, mask, kind="jsd", beta=1.5),
        "beta_neg": lambda: token_divergence(s, t, mask, kind="jsd", beta=-0.1),
        "beta_nan": lambda: token_divergence(s, t, mask, kind="jsd", beta=float("nan")),
        "vocab": lambda: token_divergence(s, t[..., :-1], mask),
        "mask_shape": lambda: token_divergence(s, t, mask[:, :-1]),
        "logits_2d": lambda: token_divergence(s[0], t[0], mask),
        "topk_zero": lambda: token_divergence(s, t, mask, scope="topk", topk=0),
        "chunk_zero": lambda: token_divergence(s, t, mask, chunk_size=0),
        "direction": lambda: anchored_consistency(s, t, mask, direction="both"),
        "cons_shape": lambda: anchored_consistency(s, t[:, :-1], mask),
        "cons_scope": lambda: anchored_consistency(s, t, mask, scope="all"),
        "sampled_tokens": lambda: sampled_token_loss(s, lp, tok[:, :-1], mask),
        "sampled_lp": lambda: sampled_token_loss(s, lp[:-1], tok, mask),
        "float_tokens": lambda: token_logprobs(s, tok.float()),
        "masked_mean": lambda: masked_mean(lp, mask[:-1]),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_invalid_arguments_raise_value_error(name):
    with pytest.raises(ValueError):
        _bad_calls()[name]()
