"""The sparse (top-k, sampled) losses of pipeline/objectives/sparse.py and the objective
over a language model's positions: hand-computed values (plain math), invariants, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.objectives.objective import Objective
from pipeline.objectives.sparse import jsd_topk, next_token_ce, reverse_kl_topk, sampled_kl, topk_tail_kl

Z = [1.0, 0.5, -0.5, 0.0, 2.0]  # student logits, V = 5
P = [0.5, 0.2, 0.15, 0.1, 0.05]  # the teacher's full distribution at T = 1


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _buckets(dist, ids):
    kept = [dist[i] for i in ids]
    return kept + [1.0 - sum(kept)]


def _row(ids, p=P):
    """A stored top-k row: ids (1, k) and their log-probs (1, k)."""
    return torch.tensor([ids]), torch.tensor([[math.log(p[i]) for i in ids]])


def _random(n=7, v=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 2
    logp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    ids = logp.topk(k, -1).indices
    return z, ids, logp.gather(1, ids)


# ----------------------------------------------------------------------------- top-k forward KL


def test_topk_tail_kl_at_t1_is_the_bucket_kl_hand_computed():
    q = _softmax(Z)
    want0 = _kl(_buckets(P, [0, 1]), _buckets(q, [0, 1]))  # p = (.5, .2, tail .3)
    want1 = _kl(_buckets(P, [4, 2]), _buckets(q, [4, 2]))  # ids in any order
    ids0, lp0 = _row([0, 1])
    ids1, lp1 = _row([4, 2])
    z = torch.tensor([Z, Z])
    got = topk_tail_kl(z, torch.cat([ids0, ids1]), torch.cat([lp0, lp1]))
    assert got.shape == () and got.dtype == torch.float32
    assert got.item() == pytest.approx((want0 + want1) / 2, rel=1e-5)
    assert topk_tail_kl(z[:1], ids0, lp0).item() == pytest.approx(want0, rel=1e-5)
    # gradient by hand: kept v: q_v − p_v; tail v: q_v · (1 − p_tail / q_tail)
    zg = torch.tensor([Z], requires_grad=True)
    topk_tail_kl(zg, ids0, lp0).backward()
    q_tail = 1 - q[0] - q[1]
    want = [q[0] - P[0], q[1] - P[1], *[q[v] * (1 - 0.3 / q_tail) for v in (2, 3, 4)]]
    assert zg.grad[0].tolist() == pytest.approx(want, abs=1e-6)


def test_topk_with_k_equal_v_is_the_dense_kl_and_its_gradient():
    ids, lp = _row([3, 0, 4, 1, 2])
    q = _softmax(Z)
    z = torch.tensor([Z], requires_grad=True)
    got = topk_tail_kl(z, ids, lp)
    assert got.item() == pytest.approx(_kl(P, q), rel=1e-5)
    got.backward()
    assert z.grad[0].tolist() == pytest.approx([qi - pi for qi, pi in zip(q, P)], abs=1e-6)  # q − p


def test_topk_is_between_zero_and_the_dense_kl():
    z, _, _ = _random(n=6, v=8, seed=1)
    logp_full = torch.log_softmax(torch.randn(6, 8, generator=torch.Generator().manual_seed(2)), -1)
    dense = (logp_full.exp() * (logp_full - torch.log_softmax(z, -1))).sum(-1)
    for k in range(1, 8):
        ids = logp_full.topk(k, -1).indices
        for r in range(6):
            got = topk_tail_kl(z[r : r + 1], ids[r : r + 1], logp_full[r : r + 1].gather(1, ids[r : r + 1])).item()
            assert -1e-6 <= got <= dense[r].item() + 1e-6


def test_topk_at_t2_follows_the_documented_convention_hand_computed():
    T = 2.0
    a = [x ** (1 / T) for x in _buckets(P, [0, 1])]  # kept p^(1/T), tail as ONE token: 0.3^(1/T)
    p_T = [x / sum(a) for x in a]
    q_T = _buckets(_softmax([x / T for x in Z]), [0, 1])
    ids, lp = _row([0, 1])
    got = topk_tail_kl(torch.tensor([Z]), ids, lp, temperature=T).item()
    assert got == pytest.approx(T**2 * _kl(p_T, q_T), rel=1e-5)  # carries T'^2 = 4
    assert got != pytest.approx(_kl(p_T, q_T), rel=1e-2)
    # k = V: the tempering of the kept log-probs is exact, the dense tempered KL times T'^2
    ids, lp = _row([0, 1, 2, 3, 4])
    dense = _kl(_softmax([math.log(x) / T for x in P]), _softmax([x / T for x in Z]))
    assert topk_tail_kl(torch.tensor([Z]), ids, lp, temperature=T).item() == pytest.approx(T**2 * dense, rel=1e-5)


# ----------------------------------------------------------------------------- reverse KL, JSD


def test_reverse_kl_and_jsd_hand_computed():
    p, q = _buckets(P, [0, 1]), _buckets(_softmax(Z), [0, 1])
    ids, lp = _row([0, 1])
    z = torch.tensor([Z])
    assert reverse_kl_topk(z, ids, lp).item() == pytest.approx(_kl(q, p), rel=1e-5)
    for beta in (0.5, 0.2):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        want = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        assert jsd_topk(z, ids, lp, beta=beta).item() == pytest.approx(want, rel=1e-5)
    T = 2.0
    a = [x ** (1 / T) for x in p]
    p_T, q_T = [x / sum(a) for x in a], _buckets(_softmax([x / T for x in Z]), [0, 1])
    assert reverse_kl_topk(z, ids, lp, temperature=T).item() == pytest.approx(T**2 * _kl(q_T, p_T), rel=1e-5)


def test_jsd_is_symmetric_at_half_and_bounded_by_log2():
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.log_softmax(torch.randn(4, 6, generator=g) * 3, -1),
        torch.log_softmax(torch.randn(4, 6, generator=g) * 3, -1),
    )
    ids = torch.arange(6).repeat(4, 1)
    ab, ba = jsd_topk(b, ids, a), jsd_topk(a, ids, b)  # teacher a vs student b, and swapped
    torch.testing.assert_close(ab, ba)
    assert 0 < ab.item() <= math.log(2)
    far = torch.tensor([[30.0, 0, 0, 0, 0, 0]])  # student all on token 0
    lp = torch.tensor([[-30.0, *[math.log((1 - math.exp(-30)) / 5)] * 5]])
    got = jsd_topk(far, ids[:1], lp).item()  # teacher nearly all off token 0
    assert math.log(2) - 1e-3 < got <= math.log(2) + 1e-6


def test_reverse_kl_with_an_empty_teacher_tail_is_finite():
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.75), math.log(0.25)]])  # Σ p = 1: tail 0
    z = torch.tensor([Z], requires_grad=True)
    loss = reverse_kl_topk(z, ids, lp)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and loss.item() > 1
    for fn in (topk_tail_kl, jsd_topk):
        assert torch.isfinite(fn(torch.tensor([Z]), ids, lp))


# ----------------------------------------------------------------------------- sampled KD


def test_sampled_kl_hand_value_padding_num_draws_and_baselines():
    q = _softmax(Z)
    ids = torch.tensor([[4, 0, 999, -7]])  # the last two are padding: ids ignored
    counts = torch.tensor([[2, 1, 0, 0]])
    ce = -(2 / 3 * math.log(q[4]) + 1 / 3 * math.log(q[0]))
    z = torch.tensor([Z])
    assert sampled_kl(z, ids, counts).item() == pytest.approx(ce, rel=1e-5)
    assert sampled_kl(z, ids[:, :2], counts[:, :2]).item() == pytest.approx(ce, rel=1e-5)
    assert sampled_kl(z, ids, counts, num_draws=6).item() == pytest.approx(ce / 2, rel=1e-5)
    kl_hat = 2 / 3 * math.log((2 / 3) / q[4]) + 1 / 3 * math.log((1 / 3) / q[0])  # KL(counts/n ‖ q)
    assert sampled_kl(z, ids, counts, baseline="empirical").item() == pytest.approx(kl_hat, rel=1e-5)
    h = -sum(x * math.log(x) for x in P)
    assert sampled_kl(z, ids, counts, baseline=torch.tensor([h])).item() == pytest.approx(ce - h, rel=1e-5)


def test_sampled_kl_is_unbiased_for_the_cross_entropy_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    V, N, n = 5, 20_000, 4
    p = torch.softmax(torch.randn(V, generator=g), -1)
    z = torch.randn(1, V, generator=g).requires_grad_(True)
    draws = torch.multinomial(p.expand(N, V), n, replacement=True, generator=g)  # (N, n)
    log_q = torch.log_softmax(z.detach(), -1)[0]
    exact = -(p * log_q).sum().item()
    per_row = -log_q[draws].mean(1)
    se = per_row.std().item() / math.sqrt(N)
    got = sampled_kl(z.expand(N, V), draws, torch.ones(N, n))
    assert got.item() == pytest.approx(per_row.mean().item(), rel=1e-5)
    assert abs(got.item() - exact) < 4 * se
    got.backward()
    q = log_q.exp()
    assert (z.grad[0] - (q - p)).abs().max().item() < 0.01  # E[grad] = q − p, the exact CE/KL gradient
    freq = F.one_hot(draws, V).sum(1).float() / n  # the same draws merged into counts
    torch.testing.assert_close(z.grad[0], q - freq.mean(0), rtol=0, atol=1e-5)
    counts = F.one_hot(draws, V).sum(1)
    ids = torch.where(counts > 0, torch.arange(V).expand(N, V), 12345)  # padding ids garbage
    torch.testing.assert_close(sampled_kl(z.detach().expand(N, V), ids, counts), got.detach())


# ----------------------------------------------------------------------------- CE, chunks, weights


def test_next_token_ce_hand_value_with_ignore_index():
    q = _softmax(Z)
    z = torch.tensor([Z, Z, Z])
    got = next_token_ce(z, torch.tensor([4, -100, 1]))
    assert got.item() == pytest.approx(-(math.log(q[4]) + math.log(q[1])) / 2, rel=1e-5)
    got = next_token_ce(z, torch.tensor([4, -100, 1]), weights=torch.tensor([3.0, 5.0, 1.0]))
    assert got.item() == pytest.approx(-(3 * math.log(q[4]) + math.log(q[1])) / 4, rel=1e-5)
    assert next_token_ce(z, torch.full((3,), -100)).item() == 0.0


def _all_losses(z, ids, logp, chunk):
    counts = torch.arange(ids.numel()).reshape(ids.shape) % 3
    counts[:, 0] += 1
    return [
        topk_tail_kl(z, ids, logp, chunk_size=chunk),
        reverse_kl_topk(z, ids, logp, chunk_size=chunk, temperature=2.0),
        jsd_topk(z, ids, logp, chunk_size=chunk, beta=0.3),
        sampled_kl(z, ids, counts, chunk_size=chunk),
        next_token_ce(z, ids[:, 0], chunk_size=chunk),
    ]


def test_chunking_gives_the_same_values_and_gradients():
    z0, ids, logp = _random()
    for i in range(5):
        grads, vals = [], []
        for chunk in (1, 3, 100):
            z = z0.clone().requires_grad_(True)
            loss = _all_losses(z, ids, logp, chunk)[i]
            loss.backward()
            vals.append(loss.detach())
            grads.append(z.grad)
        for v, gr in zip(vals[1:], grads[1:]):
            torch.testing.assert_close(v, vals[0], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(gr, grads[0], rtol=1e-6, atol=1e-8)


def test_weights_are_a_weighted_mean_and_zero_weight_rows_get_no_gradient():
    q = _softmax(Z)
    l0 = _kl(_buckets(P, [0, 1]), _buckets(q, [0, 1]))
    l1 = _kl(_buckets(P, [4, 2]), _buckets(q, [4, 2]))
    ids, lp = torch.tensor([[0, 1], [4, 2]]), torch.log(torch.tensor([[0.5, 0.2], [0.05, 0.15]]))
    z = torch.tensor([Z, Z], requires_grad=True)
    got = topk_tail_kl(z, ids, lp, weights=torch.tensor([3.0, 1.0]))
    assert got.item() == pytest.approx((3 * l0 + l1) / 4, rel=1e-5)
    loss = topk_tail_kl(z, ids, lp, weights=torch.tensor([0.0, 2.0]))
    loss.backward()
    assert loss.item() == pytest.approx(l1, rel=1e-5) and z.grad[0].abs().max() == 0
    assert topk_tail_kl(z, ids, lp, weights=torch.zeros(2)).item() == 0.0


def test_low_precision_student_gives_fp32():
    z, ids, logp = _random()
    got = topk_tail_kl(z.bfloat16(), ids.int(), logp)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, topk_tail_kl(z.bfloat16().float(), ids, logp), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the objective over positions


def lm_kd_loss(logits, batch, *, loss="topk_kl", alpha=0.0, temperature=1.0, chunk_size=512, mask=None):
    """The objective's terms for token labels (stored at T = 1): α·next-token CE + (1 − α)·KD."""
    kind = "token_sampled" if loss == "sampled_kl" else "token_topk"
    obj = Objective(
        loss=loss, temperature=temperature, alpha=alpha, kind=kind, stored_temperatures=[1.0], chunk_size=chunk_size
    )
    b = {"weight": torch.ones(logits.shape[0]), **batch}
    if mask is not None:
        b["mask"] = mask
    return obj.terms(logits, b)


def test_lm_kd_loss_alpha_mixing_hand_computed():
    q = _softmax(Z)
    ids, lp = _row([0, 1])
    kd = _kl(_buckets(P, [0, 1]), _buckets(q, [0, 1]))
    ce = -math.log(q[3])
    batch = {"topk_ids": ids, "topk_logprobs": lp, "y": torch.tensor([3])}
    out = lm_kd_loss(torch.tensor([Z]), batch, alpha=0.25)
    assert set(out) == {"loss", "kd_loss", "task_loss"}
    assert out["task_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.25 * ce + 0.75 * kd, rel=1e-5)
    out = lm_kd_loss(torch.tensor([Z]), batch)
    assert set(out) == {"loss", "kd_loss"} and out["loss"].item() == pytest.approx(kd, rel=1e-5)
    sb = {"sample_ids": torch.tensor([[4, 0]]), "sample_counts": torch.tensor([[2, 1]]), "y": torch.tensor([3])}
    want = -(2 / 3 * math.log(q[4]) + 1 / 3 * math.log(q[0]))
    out = lm_kd_loss(torch.tensor([Z]), sb, loss="sampled_kl", alpha=0.5)
    assert out["loss"].item() == pytest.approx(0.5 * ce + 0.5 * want, rel=1e-5)


@pytest.mark.parametrize("loss", ["topk_kl", "reverse_kl", "jsd", "sampled_kl"])
def test_lm_kd_loss_batch_with_mask_equals_the_flattened_valid_rows(loss):
    B, L, V, k = 2, 3, 6, 2
    z0, ids, logp = _random(n=B * L, v=V, k=k, seed=4)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    keep = mask.reshape(-1)
    targets = torch.arange(B * L) % V
    counts = torch.tensor([[1, 2]]).repeat(B * L, 1)
    full = {"topk_ids": ids, "topk_logprobs": logp, "sample_ids": ids, "sample_counts": counts, "y": targets}
    grid = {key: t.reshape(B, L, *t.shape[1:]) for key, t in full.items()}
    flat = {key: t[keep] for key, t in full.items()}
    T = 1.0 if loss == "sampled_kl" else 2.0

    def run(logits, batch, **kw):
        x = logits.clone().requires_grad_(True)
        out = lm_kd_loss(x, batch, loss=loss, alpha=0.3, temperature=T, chunk_size=2, **kw)
        out["loss"].backward()
        return out, x.grad

    want, g_flat = run(z0[keep], flat)
    got, g = run(z0.reshape(B, L, V), grid | {"weight": torch.ones(B)}, mask=mask)  # (B, L, ...) as streamed
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    torch.testing.assert_close(g.reshape(-1, V)[keep], g_flat)
    assert g.reshape(-1, V)[~keep].abs().max() == 0


# ----------------------------------------------------------------------------- refusals


def _refusals():
    z = torch.tensor([Z])
    ids, lp = _row([0, 1])
    c = torch.tensor([[2, 1]])
    return [
        (lambda: topk_tail_kl(z, torch.arange(6)[None], torch.full((1, 6), -2.0)), "k=6 > V=5"),
        (lambda: topk_tail_kl(z, torch.tensor([[0, 5]]), lp), r"ids must lie in \[0, V=5\)"),
        (lambda: topk_tail_kl(z, torch.tensor([[0, -1]]), lp), r"ids must lie in \[0, V=5\)"),
        (lambda: topk_tail_kl(z, torch.tensor([[1, 1]]), lp), "distinct"),
        (lambda: topk_tail_kl(z, ids.float(), lp), "ids must be an integer tensor"),
        (lambda: topk_tail_kl(torch.tensor([Z, Z]), ids, lp), r"ids must be \(N, k\) with N=2"),
        (lambda: topk_tail_kl(z, ids, lp[:, :1]), r"logp must be floating with the shape of ids \(1, 2\)"),
        (lambda: topk_tail_kl(z, ids, torch.tensor([[0.1, -1.0]])), r"logp must be log-probabilities"),
        (lambda: topk_tail_kl(z, ids, torch.log(torch.tensor([[0.8, 0.3]]))), r"sum to <= 1"),
        (lambda: topk_tail_kl(z, ids, lp, temperature=0.0), "temperature must be finite and > 0"),
        (lambda: topk_tail_kl(z, ids, lp, chunk_size=0), "chunk_size must be an int >= 1"),
        (lambda: topk_tail_kl(z, ids, lp, weights=torch.ones(2)), r"weights must have shape \(1,\)"),
        (lambda: topk_tail_kl(z[0], ids, lp), r"student_logits must be a floating \(N, V\)"),
        (lambda: jsd_topk(z, ids, lp, beta=1.0), r"beta must be in \(0, 1\)"),
        (lambda: sampled_kl(z, ids, torch.tensor([[2, -1]])), "counts must be >= 0"),
        (lambda: sampled_kl(z, ids, c[:, :1]), r"counts must be numeric with the shape of ids \(1, 2\)"),
        (lambda: sampled_kl(z, torch.tensor([[0, 9]]), c), r"ids must lie in \[0, V=5\)"),
        (lambda: sampled_kl(z, ids, torch.zeros(1, 2)), "n > 0 draws"),
        (lambda: sampled_kl(z, ids, c, num_draws=2), r"sum\(counts\) <= num_draws"),
        (lambda: sampled_kl(z, ids, c, num_draws=torch.tensor([3, 3])), r"num_draws must be an int or \(1,\)"),
        (lambda: sampled_kl(z, ids, c, baseline="entropy"), "baseline must be None, 'empirical'"),
        (lambda: sampled_kl(z, ids, c, baseline=torch.ones(2)), r"baseline must be \(N,\) = \(1,\)"),
        (lambda: sampled_kl(z, torch.tensor([[1, 1]]), c, baseline="empirical"), "distinct"),
        (lambda: next_token_ce(z, torch.tensor([5])), r"targets must lie in \[0, V=5\)"),
        (lambda: next_token_ce(z, torch.tensor([1, 2])), r"targets must be \(1,\)"),
        (lambda: lm_kd_loss(z, {"topk_ids": ids, "topk_logprobs": lp}, loss="kl"), "loss must be one of"),
        (lambda: lm_kd_loss(z, {"topk_ids": ids, "topk_logprobs": lp}, alpha=1.5), r"alpha must be in \[0, 1\]"),
        (lambda: lm_kd_loss(z, {"topk_ids": ids, "topk_logprobs": lp}, alpha=0.5), r"the batch has no 'y'"),
        (lambda: lm_kd_loss(z, {"topk_ids": ids}), r"the batch has no 'topk_logprobs'"),
        (
            lambda: lm_kd_loss(z, {"sample_ids": ids, "sample_counts": c}, loss="sampled_kl", temperature=2.0),
            "defined only at the stored temperature 1",
        ),
        (lambda: lm_kd_loss(z[None], {"topk_ids": ids, "topk_logprobs": lp}), r"need a bool batch\['mask'\] \(1, 1\)"),
        (
            lambda: lm_kd_loss(
                z[None],
                {"topk_ids": ids.repeat(2, 1), "topk_logprobs": lp.repeat(2, 1)},
                mask=torch.ones(1, 1, dtype=torch.bool),
            ),
            r"must start with the mask's shape \(1, 1\)",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_refusals())))
def test_refusals_name_the_argument(case):
    fn, match = _refusals()[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_no_rows_by_vocab_intermediate_is_kept_for_backward():
    """Chunks run under checkpointing: autograd keeps only the student's own logits and the
    small (N, k) teacher tensors, never an fp32 (rows, V) log-softmax."""
    z0, ids, logp = _random(n=8, v=200, k=3, seed=5)
    z = z0.requires_grad_(True)
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() != z.untyped_storage().data_ptr():
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = _all_losses(z, ids, logp, chunk=2)
    assert max(sizes) < 200
    sum(losses).backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- the fused CE


def _autograd_forward_kl(z, ids, logp, missing, temperature, stored_temperature=1.0):
    """The plain-autograd reference: _buckets + _kl (the formula, no hand-written gradient)."""
    from pipeline.objectives.sparse import _forward_kl

    return _forward_kl(z, ids, logp, missing, temperature=temperature, stored_temperature=stored_temperature).mean()


@pytest.mark.parametrize("temperature,stored", [(1.0, 1.0), (2.0, 1.0), (4.0, 2.0), (2.0, 3.0)])
@pytest.mark.parametrize("with_missing", [False, True])
def test_fused_topk_kl_equals_autograd_values_and_gradients(temperature, stored, with_missing):
    g = torch.Generator().manual_seed(3)
    n, v, k = 9, 40, 6
    z = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    t = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    logp, ids = t.topk(k, -1)
    missing = (1 - logp.exp().sum(-1)) if with_missing else None
    z[2].data[ids[2]] += 30.0  # a student whose tail is ~e^-30: the exact (masked) tail path
    got = topk_tail_kl(z, ids, logp, temperature=temperature, missing_mass=missing, stored_temperature=stored)
    (gz,) = torch.autograd.grad(got, z)
    z2 = z.detach().clone().requires_grad_()
    want = _autograd_forward_kl(z2, ids, logp, missing, temperature, stored)
    (wz,) = torch.autograd.grad(want, z2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # fp32 both ways, summed in another order: ~1e-6 apart on the row with an e^-30 tail (torch 2.14)
    torch.testing.assert_close(gz, wz, rtol=1e-4, atol=2e-6)


def test_fused_topk_kl_gradcheck_in_double():
    from pipeline.objectives.sparse_ce import SparseTargetCE

    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3], [1, 2], [6, 5], [4, 0]])
    w = torch.rand(4, 2, generator=g, dtype=torch.float64)
    w_t = torch.rand(4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: SparseTargetCE.apply(x, ids, w, w_t), (s,))
    assert torch.autograd.gradcheck(lambda x: SparseTargetCE.apply(x, ids, w, None), (s,))


def test_fused_sampled_ce_with_padding_that_repeats_a_real_id():
    # row 0 drew id 0 twice and id 3 once; its padding slots hold id 0 with count 0
    z = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0, -1.0]], requires_grad=True)
    ids = torch.tensor([[0, 3, 0, 0], [4, 1, 2, 0]])
    counts = torch.tensor([[2, 1, 0, 0], [1, 1, 1, 1]])
    loss = sampled_kl(z, ids, counts)
    loss.backward()
    q = torch.softmax(z.detach(), -1)
    f = torch.zeros(2, 5)
    f[0, 0], f[0, 3] = 2 / 3, 1 / 3
    f[1, [4, 1, 2, 0]] = 0.25
    want = -(f * q.log()).sum(-1).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(z.grad, (q - f) / 2)  # the gradient q − c/n, averaged over 2 rows
