"""The dense-logit losses (pipeline/objectives/dense.py) and Hinton KD as the objective
computes it (α·CE + (1 − α)·T²·KL, objectives/objective.py with loss "kd"): hand-computed
values, torch references, invariants, errors. A classifier's top-k KD runs the sparse
loss (objectives/sparse.py) on its stored z/T minus logsumexp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.objectives.dense import (
    HintLoss,
    logit_mse,
    rkd_distance_loss,
    soft_kl_loss,
    soft_target_cross_entropy,
    teacher_side,
)
from pipeline.objectives.objective import Objective
from pipeline.objectives.sparse import topk_tail_kl


def distillation_loss(s, t, labels=None, *, temperature, alpha, weights=None):
    """Hinton KD through the live objective: raw teacher logits t enter as labels stored
    at T = 1 (rescaled to T' = temperature there); without labels alpha is ignored."""
    alpha = alpha if labels is not None else 0.0
    obj = Objective(loss="kd", temperature=temperature, alpha=alpha, kind="dense", stored_temperatures=[1.0])
    batch = {
        "stored_logits": t,
        "weight": torch.ones(s.shape[0]) if weights is None else weights,
        "y": labels if labels is not None else torch.zeros(s.shape[0], dtype=torch.long),
    }
    return obj.terms(s, batch)["loss"]


def topk_kl_loss(s, idx, vals, lse, *, temperature, weights=None):
    """A classifier's stored top-k (z/T, ids, logsumexp of all z/T) through the one top-k KL."""
    return topk_tail_kl(
        s,
        idx,
        vals.float() - lse.float()[:, None],
        temperature=temperature,
        stored_temperature=temperature,
        weights=weights,
    )


def multi_teacher_probs(scaled):
    """The teachers' mixture p = mean_m softmax(z_m/T) (objectives/dense.py teacher_side)."""
    return teacher_side(scaled)[0]


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _logits(b=6, c=10, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale


def _reference_kd(s, t, labels, T, alpha):
    soft = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    if labels is None:
        return soft
    return alpha * F.cross_entropy(s, labels) + (1 - alpha) * soft


def _stored_topk(t, T, k):
    """What the soft-label store holds: top-k of z/T, their ids, logsumexp of all z/T."""
    z = t / T
    vals, idx = z.topk(k, dim=-1)
    return idx, vals, torch.logsumexp(z, -1)


# ----------------------------------------------------------------------------- distillation_loss


def test_distillation_loss_hand_computed_3_class():
    s, t, T, alpha = [1.0, 0.0, -1.0], [2.0, 0.0, 0.0], 2.0, 0.3
    p = _softmax([x / T for x in t])
    q = _softmax([x / T for x in s])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(_softmax(s)[0])
    want = alpha * ce + (1 - alpha) * T**2 * kl
    got = distillation_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([0]), temperature=T, alpha=alpha)
    assert got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-5)  # fp32 math


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.1), (4.0, 0.9), (0.5, 0.0)])
def test_distillation_loss_matches_torch_reference(T, alpha):
    s, t = _logits()
    labels = torch.arange(6) % 10
    got = distillation_loss(s, t, labels, temperature=T, alpha=alpha)
    torch.testing.assert_close(got, _reference_kd(s, t, labels, T, alpha))


def test_alpha_ignored_without_labels_and_alpha_one_is_pure_ce():
    s, t = _logits()
    a = distillation_loss(s, t, temperature=3.0, alpha=0.0)
    b = distillation_loss(s, t, temperature=3.0, alpha=0.7)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, _reference_kd(s, t, None, 3.0, 0.0))
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    pure = distillation_loss(s, t, labels, temperature=3.0, alpha=1.0)
    torch.testing.assert_close(pure, F.cross_entropy(s, labels))


@pytest.mark.parametrize("T,alpha", [(1.0, 0.0), (4.0, 0.3)])
def test_kd_short_form_gradient_equals_kl_div_reference(T, alpha):
    """distillation_loss's short form (teacher side outside the graph) against autograd
    through the torch kl_div reference: same loss, same gradient, with pad-row weights."""
    s0, t = _logits(b=8, c=5, seed=3)
    labels, w = torch.arange(8) % 5, torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1])

    s = s0.clone().requires_grad_(True)
    got = distillation_loss(s, t, labels, temperature=T, alpha=alpha, weights=w)
    got.backward()

    r = s0.clone().requires_grad_(True)
    soft = F.kl_div(F.log_softmax(r / T, -1), F.log_softmax(t / T, -1), reduction="none", log_target=True)
    per_row = alpha * F.cross_entropy(r, labels, reduction="none") + (1 - alpha) * T**2 * soft.sum(-1)
    want = (w * per_row).sum() / w.sum()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s.grad, r.grad)
    assert s.grad[2].abs().max() == 0 and s.grad[6].abs().max() == 0  # weight-0 rows get no gradient


def test_kd_with_masked_teacher_classes_is_finite_and_ignores_them():
    """-inf teacher logits (p = 0) add 0 to the KL (0·log 0 = 0), never nan."""
    s = torch.tensor([[1.0, 0.5, -2.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0, float("-inf")]])
    loss = distillation_loss(s, t, temperature=2.0, alpha=0.0)
    p = torch.softmax(t[:, :2] / 2, -1)
    log_q = torch.log_softmax(s.detach() / 2, -1)[:, :2]
    torch.testing.assert_close(loss, 4 * (p * (p.log() - log_q)).sum())
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # the masked class's gradient pushes its student probability down: T·(q − 0) > 0
    assert s.grad[0, 2] > 0


def test_t_squared_keeps_gradient_scale_across_temperatures():
    s0, t = _logits(b=16, c=20, seed=1)

    def grad_norm(T, scaled):
        s = s0.clone().requires_grad_(True)
        loss = distillation_loss(s, t, temperature=T, alpha=0.0)
        if not scaled:  # the same KL without Hinton's T² factor
            loss = loss / T**2
        loss.backward()
        return s.grad.norm().item()

    temps = [2.0, 4.0, 8.0, 16.0]
    scaled = [grad_norm(T, True) for T in temps]
    unscaled = [grad_norm(T, False) for T in temps]
    for g in scaled:
        assert 0.5 * scaled[0] <= g <= 2.0 * scaled[0]
    # without T² the gradient collapses: 16/2 = 8x temperature -> ~64x smaller
    assert unscaled[-1] < unscaled[0] / 30
    for T, g, u in zip(temps, scaled, unscaled):
        assert u == pytest.approx(g / T**2, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_result(dtype):
    s, t = _logits()
    s_lo, t_lo = s.to(dtype), t.to(dtype)
    labels = torch.arange(6)
    got = distillation_loss(s_lo, t_lo, labels, temperature=2.0, alpha=0.5)
    assert got.dtype == torch.float32
    want = distillation_loss(s_lo.float(), t_lo.float(), labels, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    idx, vals, lse = _stored_topk(t, 2.0, 4)
    got_k = topk_kl_loss(s_lo, idx.to(torch.uint8), vals.to(dtype), lse.to(dtype), temperature=2.0)
    want_k = topk_kl_loss(s_lo.float(), idx, vals.to(dtype).float(), lse.to(dtype).float(), temperature=2.0)
    assert got_k.dtype == torch.float32
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
    for fn in (soft_target_cross_entropy, logit_mse):
        out = fn(s_lo, t_lo)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(s_lo.float(), t_lo.float()), rtol=0, atol=0)


# ----------------------------------------------------------------------------- soft CE / MSE / soft KL


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_soft_ce_minus_entropy_is_kd_term(T):
    s, t = _logits(seed=2)
    p = F.softmax(t / T, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    ce = soft_target_cross_entropy(s, t, temperature=T)
    kd = distillation_loss(s, t, temperature=T, alpha=0.0)
    torch.testing.assert_close(ce - entropy * T**2, kd)
    # probabilities in, same answer
    torch.testing.assert_close(soft_target_cross_entropy(s, p, temperature=T, from_logits=False), ce)


def test_logit_mse_hand_value():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert logit_mse(s, t).item() == pytest.approx((1 + 0 + 4 + 9) / 4)


def test_soft_kl_loss_handles_zero_probs_and_matches_kd():
    s, t = _logits(seed=3)
    T = 2.0
    probs = multi_teacher_probs([t / T])
    torch.testing.assert_close(soft_kl_loss(s, probs, temperature=T), distillation_loss(s, t, temperature=T, alpha=0.0))
    onehot = F.one_hot(torch.arange(6), 10).float()  # many p = 0 entries
    got = soft_kl_loss(s, onehot, temperature=T)
    want = T**2 * F.cross_entropy(s / T, torch.arange(6))  # KL to one-hot = CE
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)


def test_soft_kl_loss_with_precomputed_entropy_same_value_and_gradient():
    """The stream's fast form T²·(Σ p log p + CE(p, q)) against the p·(log p − log q) form
    and distillation_loss on the raw logits; also with one-hot (p = 0) targets and weights."""
    s0, t = _logits(b=8, c=10, seed=4)
    T, w = 3.0, torch.tensor([1.0, 0, 1, 1, 1, 1, 1, 0])
    for p in (multi_teacher_probs([t / T, t.flip(0) / T]), F.one_hot(torch.arange(8) % 10, 10).float()):
        neg_h = torch.xlogy(p, p).sum(-1)
        a, b = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        fast = soft_kl_loss(a, p, temperature=T, weights=w, teacher_neg_entropy=neg_h)
        slow = soft_kl_loss(b, p, temperature=T, weights=w)
        fast.backward()
        slow.backward()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad)
    p = torch.softmax(t / T, -1)
    torch.testing.assert_close(
        soft_kl_loss(s0, p, temperature=T, teacher_neg_entropy=torch.xlogy(p, p).sum(-1)),
        distillation_loss(s0, t, temperature=T, alpha=0.0),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="teacher_neg_entropy"):
        soft_kl_loss(s0, p, temperature=T, teacher_neg_entropy=torch.zeros(3))


# ----------------------------------------------------------------------------- top-k KL


def test_topk_kl_equals_dense_when_k_is_c():
    s0, t = _logits(b=5, c=12, seed=4)
    T = 3.0
    idx, vals, lse = _stored_topk(t, T, k=12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    s = s0.clone().requires_grad_(True)
    got = topk_kl_loss(s, idx[:, perm], vals[:, perm], lse, temperature=T)  # order irrelevant
    torch.testing.assert_close(got, distillation_loss(s0, t, temperature=T, alpha=0.0), atol=1e-5, rtol=1e-5)
    got.backward()  # no tail bucket: gradient must stay finite
    assert torch.isfinite(s.grad).all()
    # a rounded-up stored logsumexp (e.g. fp16) leaves tail mass but no tail class: ignore it
    s.grad = None
    loose = topk_kl_loss(s, idx, vals, lse + 1e-3, temperature=T)
    loose.backward()
    assert torch.isfinite(loose) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_kl_bounded_by_dense_kl(k):
    s0, t = _logits(b=8, c=12, seed=5)
    T = 2.0
    idx, vals, lse = _stored_topk(t, T, k)
    s = s0.clone().requires_grad_(True)
    per_row = [
        topk_kl_loss(s[i : i + 1], idx[i : i + 1], vals[i : i + 1], lse[i : i + 1], temperature=T) for i in range(8)
    ]
    dense = [distillation_loss(s0[i : i + 1], t[i : i + 1], temperature=T, alpha=0.0) for i in range(8)]
    for sparse, full in zip(per_row, dense):
        assert 0.0 <= sparse.item() <= full.item() + 1e-6
    torch.stack(per_row).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_topk_kl_hand_computed_k1_c3():
    z, s, T = [2.0, 1.0, 0.0], [0.4, 0.2, -0.6], 2.0
    scaled = [x / T for x in z]
    lse = math.log(sum(math.exp(x) for x in scaled))
    p0 = math.exp(scaled[0] - lse)
    p_tail = 1 - p0
    q = _softmax([x / T for x in s])
    want = T**2 * (p0 * math.log(p0 / q[0]) + p_tail * math.log(p_tail / (q[1] + q[2])))
    got = topk_kl_loss(
        torch.tensor([s]),
        torch.tensor([[0]], dtype=torch.uint16),
        torch.tensor([[scaled[0]]]),
        torch.tensor([lse]),
        temperature=T,
    )
    assert got.item() == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- weights


def test_zero_weight_row_does_not_change_loss():
    s, t = _logits(b=5, seed=6)
    s_pad = torch.cat([s, torch.full((1, 10), 50.0)])  # garbage padding row
    t_pad = torch.cat([t, torch.full((1, 10), -50.0)])
    w = torch.tensor([1.0, 1, 1, 1, 1, 0])
    labels, labels_pad = torch.arange(5), torch.arange(6)
    T = 2.0
    pairs = [
        (
            distillation_loss(s, t, labels, temperature=T, alpha=0.4),
            distillation_loss(s_pad, t_pad, labels_pad, temperature=T, alpha=0.4, weights=w),
        ),
        (
            soft_target_cross_entropy(s, t, temperature=T),
            soft_target_cross_entropy(s_pad, t_pad, temperature=T, weights=w),
        ),
        (
            soft_kl_loss(s, F.softmax(t / T, -1), temperature=T),
            soft_kl_loss(s_pad, F.softmax(t_pad / T, -1), temperature=T, weights=w),
        ),
        (logit_mse(s, t), logit_mse(s_pad, t_pad, weights=w)),
        (
            topk_kl_loss(s, *_stored_topk(t, T, 3), temperature=T),
            topk_kl_loss(s_pad, *_stored_topk(t_pad, T, 3), temperature=T, weights=w),
        ),
    ]
    for plain, weighted in pairs:
        torch.testing.assert_close(weighted, plain)


def test_weights_are_a_weighted_mean():
    s, t = _logits(b=2, seed=7)
    dup = distillation_loss(s[[0, 0, 1]], t[[0, 0, 1]], temperature=2.0, alpha=0.0)
    w = distillation_loss(s, t, temperature=2.0, alpha=0.0, weights=torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(w, dup)


# ----------------------------------------------------------------------------- multi-teacher


def test_multi_teacher_probs():
    a, b = _logits(seed=8)
    torch.testing.assert_close(multi_teacher_probs([a, a.clone()]), F.softmax(a, -1))
    mixed = multi_teacher_probs([a, b])
    torch.testing.assert_close(mixed.sum(-1), torch.ones(6))
    torch.testing.assert_close(mixed, (F.softmax(a, -1) + F.softmax(b, -1)) / 2)
    assert multi_teacher_probs([a.half()]).dtype == torch.float32


# ----------------------------------------------------------------------------- RKD / hints


def test_rkd_scale_invariant_and_hand_checked():
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(7, 5, generator=g)
    assert rkd_distance_loss(3.5 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_distance_loss(torch.randn(7, 3, generator=g), teacher).item() > 1e-3
    # 3 points: teacher distances 3, 4, 5 (mean 4); student 1, 1, sqrt 2
    t3 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    s3 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    mu_s = (2 + math.sqrt(2)) / 3
    diffs = [1 / mu_s - 0.75, 1 / mu_s - 1.0, math.sqrt(2) / mu_s - 1.25]  # all |d| < 1
    want = sum(0.5 * d * d for d in diffs) / 3  # symmetric: 6 ordered pairs = 3 unordered x2
    got = rkd_distance_loss(s3, t3)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert t3.grad is None and s3.grad is not None and torch.isfinite(s3.grad).all()


def test_hint_loss_linear_trains_regressor():
    torch.manual_seed(0)
    hint = HintLoss(4, 6)
    x, m = torch.randn(32, 4), torch.randn(4, 6)
    target = x @ m
    loss = hint(x, target)
    torch.testing.assert_close(loss, F.mse_loss(hint.regressor(x), target))
    loss.backward()
    assert hint.regressor.weight.grad.abs().sum() > 0 and hint.regressor.bias.grad is not None
    opt = torch.optim.SGD(hint.parameters(), lr=0.1)
    first = loss.item()
    for _ in range(100):
        opt.zero_grad()
        hint(x, target).backward()
        opt.step()
    assert hint(x, target).item() < 0.05 * first


def test_hint_loss_conv_and_shape_errors():
    hint = HintLoss(3, 8, conv=True)
    s = torch.randn(2, 3, 5, 5, requires_grad=True)
    t = torch.randn(2, 8, 5, 5)
    loss = hint(s.half().float(), t.bfloat16())
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert hint.regressor.weight.grad.shape == (8, 3, 1, 1) and s.grad is not None
    with pytest.raises(ValueError, match="teacher_feat"):
        hint(s, torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="student_feat"):
        hint(torch.randn(2, 3), t)
    with pytest.raises(ValueError, match="student_feat"):
        HintLoss(4, 6)(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="teacher_feat"):
        HintLoss(4, 6)(torch.randn(2, 4), torch.randn(2, 7))


# ----------------------------------------------------------------------------- errors

_S, _T, _Y = torch.zeros(4, 10), torch.zeros(4, 9), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: distillation_loss(_S, _T, temperature=1.0, alpha=0.5), r"the same shape.*\(4, 9\)"),
        (lambda: distillation_loss(_S, _S, temperature=0.0, alpha=0.5), "temperature"),
        (lambda: distillation_loss(_S, _S, temperature=-2.0, alpha=0.5), "temperature"),
        (lambda: distillation_loss(_S, _S, _Y, temperature=1.0, alpha=1.5), "alpha"),
        (lambda: distillation_loss(_S, _S, _Y, temperature=1.0, alpha=-0.1), "alpha"),
        (lambda: distillation_loss(_S, _S, temperature=1.0, alpha=0.5, weights=torch.ones(5)), "weights"),
        (lambda: soft_kl_loss(_S[0], _S[0], temperature=1.0), "student_logits"),
        (lambda: soft_target_cross_entropy(_S, _T), "teacher_probs_or_logits"),
        (lambda: soft_target_cross_entropy(_S, _S, temperature=0.0), "temperature"),
        (lambda: soft_kl_loss(_S, _T, temperature=1.0), "teacher_probs"),
        (lambda: logit_mse(_S, _T), "teacher_logits"),
        (lambda: rkd_distance_loss(torch.zeros(4, 3), torch.zeros(5, 3)), "teacher_emb"),
        (lambda: rkd_distance_loss(torch.zeros(1, 3), torch.zeros(1, 3)), "B >= 2"),
    ],
)
def test_invalid_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
