"""pipeline.objectives.objective.Objective against values computed by hand (numpy, float64) from small
explicit tensors: every loss x {single, multi-teacher where defined} x alpha x hint/RKD,
pad rows (weight 0), a stored temperature T different from the student's T' (the rescale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.objectives.dense import HintLoss, rescale
from pipeline.objectives.objective import Objective

# 4 rows, 3 classes; row 2 is a pad row (weight 0) with wild values that must not leak in
S = np.array([[1.0, 0.5, -1.0], [0.2, -0.3, 0.9], [9.0, -9.0, 4.0], [-0.5, 1.5, 0.0]])  # student logits
Z1 = np.array([[2.0, 0.0, -2.0], [0.5, 1.0, 3.0], [-7.0, 8.0, 0.0], [1.0, 2.5, -1.0]])  # teacher 1 raw z
Z2 = np.array([[0.0, 1.0, 1.0], [2.0, -1.0, 0.5], [5.0, 5.0, -5.0], [-2.0, 0.0, 3.0]])  # teacher 2 raw z
Y = np.array([0, 2, 1, 1])
W = np.array([1.0, 1.0, 0.0, 1.0])
T1, T2, TS = 2.0, 5.0, 4.0  # stored temperatures of teachers 1, 2; student T'
FS = np.array([[1.0, 0.0], [0.5, 2.0], [30.0, -30.0], [-1.0, 1.0]])  # student feature (B, 2)
FT = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [40.0, 0.0, 9.0], [2.0, -1.0, 1.0]])  # teacher feature (B, 3)
HW = np.array([[0.5, -1.0], [1.0, 0.0], [0.0, 2.0]])  # regressor (3, 2)
HB = np.array([0.1, -0.2, 0.3])
ALPHAS = (0.0, 0.3, 1.0)


def f32(a):
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def stored(z, T):
    """What the writer stores: z / T in float32."""
    return (np.asarray(z, np.float32) / np.float32(T)).astype(np.float32)


# ----------------------------------------------------------------------------- hand formulas (numpy)


def softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(a):
    m = a.max(-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))


def wmean(per_row):
    return float((per_row * W).sum() / W.sum())


def h_task():
    return wmean(-log_softmax(S)[np.arange(4), Y])


def h_kd(p):
    log_q = log_softmax(S / TS)
    return wmean(TS**2 * (p * (np.log(p) - log_q)).sum(-1))


def h_soft_ce(p):
    return wmean(-(TS**2) * (p * log_softmax(S / TS)).sum(-1))


def h_mse(z):
    return wmean(((S - z) ** 2).mean(-1))


def h_targets(multi):
    # z / T' for each teacher, from the stored z/T: (z/T)·T/T' = z/T'
    p = softmax(Z1 / TS)
    return 0.5 * (p + softmax(Z2 / TS)) if multi else p


def h_hint():
    keep = W > 0
    pred = FS[keep] @ HW.T + HB
    return float(((pred - FT[keep]) ** 2).mean())


def h_rkd():
    keep = W > 0
    s, t = FS[keep], FT[keep]
    n = len(s)

    def psi(x):
        d = np.array([[np.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)])
        off = d[~np.eye(n, dtype=bool)]
        return off / off.mean()

    x = psi(s) - psi(t)
    return float(np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5).mean())


def h_topk(k):
    """Top-k KL with a tail bucket, at T' = T = T1, by hand from the stored z/T."""
    a = Z1 / T1
    lse = np.log(np.exp(a).sum(-1))
    idx = np.argsort(-a, -1)[:, :k]
    log_q = log_softmax(S / T1)
    rows = []
    for b in range(4):
        p = np.exp(a[b, idx[b]] - lse[b])
        q = np.exp(log_q[b, idx[b]])
        kl = (p * (np.log(p) - np.log(q))).sum()
        tail_p, tail_q = 1 - p.sum(), 1 - q.sum()
        if k < 3:
            kl += tail_p * (np.log(tail_p) - np.log(tail_q))
        rows.append(T1**2 * kl)
    return wmean(np.array(rows)), idx


# ----------------------------------------------------------------------------- helpers


def hint_module():
    h = HintLoss(2, 3)
    with torch.no_grad():
        h.regressor.weight.copy_(f32(HW))
        h.regressor.bias.copy_(f32(HB))
    return h


def dense_batch(multi):
    b = {
        "y": torch.tensor(Y),
        "weight": f32(W),
        "stored_logits": torch.from_numpy(stored(Z1, T1)),
        "teacher_feature": f32(FT),
    }
    if multi:
        b["extra_stored_logits"] = torch.from_numpy(stored(Z2, T2))[None]  # (1, B, C)
    return b


def check(terms, want, total, names):
    assert set(terms) == {"loss", *names}, (set(terms), names)
    for k, v in want.items():
        if k in names:
            assert terms[k].dtype == torch.float32 and terms[k].shape == ()
            np.testing.assert_allclose(terms[k].item(), v, rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(terms["loss"].item(), total, rtol=2e-5, atol=1e-6)


def expected_names(alpha, hint_w=0.0, rkd_w=0.0, kd=True):
    return (
        ({"task_loss"} if alpha > 0 else set())
        | ({"kd_loss"} if alpha < 1 and kd else set())
        | ({"hint_loss"} if hint_w else set())
        | ({"rkd_loss"} if rkd_w else set())
    )


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("features", [(0.0, 0.0), (0.7, 0.0), (0.0, 2.0), (0.5, 1.5)])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("loss,multi", [("kd", False), ("kd", True), ("soft_ce", False), ("mse", False)])
def test_dense_losses_equal_hand_values(loss, multi, alpha, features):
    hint_w, rkd_w = features
    temps = [T1, T2] if multi else [T1]
    obj = Objective(
        loss=loss,
        temperature=TS,
        alpha=alpha,
        kind="dense",
        stored_temperatures=temps,
        hint_weight=hint_w,
        rkd_weight=rkd_w,
        hint=hint_module() if (hint_w or rkd_w) else None,
    )
    terms = obj.terms(f32(S), dense_batch(multi), f32(FS) if obj.needs_features else None)
    p = h_targets(multi)
    kd = {"kd": h_kd, "soft_ce": h_soft_ce}[loss](p) if loss != "mse" else h_mse(Z1)  # mse: raw z = (z/T)·T
    want = {"task_loss": h_task(), "kd_loss": kd, "hint_loss": h_hint(), "rkd_loss": h_rkd()}
    total = alpha * want["task_loss"] + (1 - alpha) * kd + hint_w * want["hint_loss"] + rkd_w * want["rkd_loss"]
    names = expected_names(alpha, hint_w, rkd_w)
    check(terms, want, total, names)
    assert obj.term_names == ("loss", *[n for n in ("task_loss", "kd_loss", "hint_loss", "rkd_loss") if n in names])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_kl_equals_hand_values(k, alpha):
    want_kd, idx = h_topk(k)
    a = stored(Z1, T1).astype(np.float64)
    # as the stream yields a classifier's stored top-k: the ids and z/T minus the stored logsumexp
    logp = np.take_along_axis(a, idx, -1) - np.log(np.exp(a).sum(-1))[:, None]
    batch = {"y": torch.tensor(Y), "weight": f32(W), "topk_ids": torch.from_numpy(idx), "topk_logprobs": f32(logp)}
    obj = Objective(loss="topk_kl", temperature=T1, alpha=alpha, stored_temperatures=[T1], kind="topk")
    check(
        obj.terms(f32(S), batch),
        {"task_loss": h_task(), "kd_loss": want_kd},
        alpha * h_task() + (1 - alpha) * want_kd,
        expected_names(alpha),
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("loss", ["kd", "soft_ce", "mse"])
def test_online_teacher_raw_logits_enter_at_temperature_one(loss, alpha):
    """Online KD: the objective runs the (frozen) teacher on batch["x"]; its raw z is z/1."""
    X = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0], [-2.0, 0.5]])
    A = np.array([[1.0, 0.0], [0.5, -1.0], [-1.0, 2.0]])
    c = np.array([0.1, 0.0, -0.3])
    teacher = torch.nn.Linear(2, 3)
    with torch.no_grad():
        teacher.weight.copy_(f32(A))
        teacher.bias.copy_(f32(c))
    teacher.requires_grad_(False)
    z = X @ A.T + c
    obj = Objective(loss=loss, temperature=TS, alpha=alpha, teacher=teacher)
    assert obj.mode == "online"
    terms = obj.terms(f32(S), {"x": f32(X), "y": torch.tensor(Y), "weight": f32(W)})
    p = softmax(z / TS)
    kd = {"kd": lambda: h_kd(p), "soft_ce": lambda: h_soft_ce(p), "mse": lambda: h_mse(z)}[loss]()
    check(terms, {"task_loss": h_task(), "kd_loss": kd}, alpha * h_task() + (1 - alpha) * kd, expected_names(alpha))


def test_loss_ce_is_weighted_cross_entropy_whatever_the_alpha():
    for alpha in (0.0, 0.5):
        terms = Objective(loss="ce", alpha=alpha).terms(f32(S), {"y": torch.tensor(Y), "weight": f32(W)})
        check(terms, {"task_loss": h_task()}, h_task(), {"task_loss"})


def test_pad_rows_change_nothing_and_get_no_gradient():
    obj = Objective(loss="kd", temperature=TS, alpha=0.3, kind="dense", stored_temperatures=[T1])
    s = f32(S).requires_grad_(True)
    obj.terms(s, dense_batch(False))["loss"].backward()
    assert s.grad[2].abs().max() == 0
    # the gradient of the KD term is w_b/Σw · T'(q − p) (Hinton et al.), of the CE term w_b/Σw (q1 − onehot)
    q_t, q_1 = softmax(S / TS), softmax(S)
    want = (W / W.sum())[:, None] * (0.3 * (q_1 - np.eye(3)[Y]) + 0.7 * TS * (q_t - h_targets(False)))
    np.testing.assert_allclose(s.grad.numpy(), want, rtol=1e-4, atol=1e-6)


def test_the_rescale_is_one_fp32_product_s_times_T_over_T_prime():
    s = stored(Z1, T1)
    for T_new in (1.0, 3.0, TS, T1):
        got = rescale(torch.from_numpy(s), T1, T_new)
        assert torch.equal(got, torch.from_numpy(s * np.float32(T1 / T_new)))
        np.testing.assert_allclose(got.numpy(), Z1 / T_new, rtol=1e-6)
    # T' = T: nothing to do, the stored tensor itself
    t = torch.from_numpy(s)
    assert rescale(t, T1, T1) is t


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("loss", ["soft_ce", "mse", "topk_kl"])
def test_multi_teacher_refuses_losses_it_does_not_define(loss):
    with pytest.raises(ValueError, match=rf"loss='{loss}' cannot be used with several teachers.*TrainConfig.loss"):
        Objective(
            loss=loss, temperature=TS, stored_temperatures=[T1, T2], kind="topk" if loss == "topk_kl" else "dense"
        )


def test_topk_at_another_temperature_follows_the_tail_convention_hand_computed():
    """A classifier's top-k stored at T = T1, learned at T' = TS: the kept log-probs tempered
    by T/T', the tail as one bucket of mass p_tail^(T/T'), renormalised (objectives/sparse.py);
    the student at T'; times T'². Exact at T' = T (test_topk_kl_equals_hand_values)."""
    k = 2
    a = Z1 / T1
    lse = np.log(np.exp(a).sum(-1))
    idx = np.argsort(-a, -1)[:, :k]
    logp = np.take_along_axis(a, idx, -1) - lse[:, None]
    tau = T1 / TS
    rows = []
    for b in range(4):
        lp = np.append(logp[b], np.log(1 - np.exp(logp[b]).sum())) * tau
        p = np.exp(lp - np.log(np.exp(lp).sum()))
        q_all = softmax(S[b] / TS)
        q = np.append(q_all[idx[b]], 1 - q_all[idx[b]].sum())
        rows.append(TS**2 * (p * (np.log(p) - np.log(q))).sum())
    want = wmean(np.array(rows))
    batch = {"y": torch.tensor(Y), "weight": f32(W), "topk_ids": torch.from_numpy(idx), "topk_logprobs": f32(logp)}
    obj = Objective(loss="topk_kl", temperature=TS, stored_temperatures=[T1], kind="topk")
    check(obj.terms(f32(S), batch), {"kd_loss": want}, want, {"kd_loss"})


def test_refusals_name_the_keys():
    with pytest.raises(ValueError, match="defined only at the stored temperature 1.*TrainConfig.temperature=2"):
        Objective(loss="sampled_kl", temperature=2.0, stored_temperatures=[1.0], kind="token_sampled")
    with pytest.raises(
        ValueError,
        match=r"loss='kd' learns from dense labels, but the soft labels are topk: use "
        r"one of \['topk_kl', 'reverse_kl', 'jsd'\]",
    ):
        Objective(loss="kd", stored_temperatures=[2.0], kind="topk")
    with pytest.raises(ValueError, match=r"loss='topk_kl' learns from topk labels, but the soft labels are dense"):
        Objective(loss="topk_kl", stored_temperatures=[2.0], kind="dense")
    with pytest.raises(ValueError, match="an online teacher gives dense logits"):
        Objective(loss="topk_kl", teacher=torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match="need a teacher feature"):
        Objective(loss="ce", hint_weight=1.0, hint=hint_module())
    with pytest.raises(ValueError, match="TrainConfig.alpha"):
        Objective(loss="kd", alpha=1.5, stored_temperatures=[2.0], kind="dense")
    with pytest.raises(ValueError, match="TrainConfig.temperature"):
        Objective(loss="kd", temperature=0.0, stored_temperatures=[2.0], kind="dense")
    with pytest.raises(ValueError, match="stored temperature of each teacher"):
        Objective(loss="kd")
    obj = Objective(loss="kd", kind="dense", stored_temperatures=[T1, T2])
    with pytest.raises(ValueError, match="holds 1 teachers' logits, the objective was built for 2"):
        obj.terms(f32(S), dense_batch(False))
