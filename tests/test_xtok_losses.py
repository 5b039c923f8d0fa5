"""Cross-tokenizer losses (pipeline/objectives/xtok.py: ULD, GOLD's hybrid, ALM) against a direct
float64 numpy / python computation written here, plus invariants, gradients and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.objectives.xtok import alm_loss, hybrid_loss, log1mexp, uld_loss

C, V_S, V_T, K = 7, 50, 80, 8
W = [1.0, 0.0, 2.0, 0.5, 0.0, 1.0, 3.0]  # rows 1 and 4 excluded


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _top_desc(x, k):
    s = np.sort(x)[::-1][:k]
    return np.concatenate([s, np.zeros(k - len(s))])


def _mean(per_row, w):
    w = np.asarray(w, dtype=np.float64)
    keep = w > 0
    return float((np.asarray(per_row)[keep] * w[keep]).sum() / w[keep].sum())


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    p_full = np.stack([_softmax(2.0 * rng.normal(size=V_T)) for _ in range(C)])  # (C, V_T)
    ids = np.stack([rng.permutation(np.argsort(-row)[:K]) for row in p_full])  # top-k, shuffled
    logp = np.log(np.take_along_axis(p_full, ids, 1))  # (C, K)
    missing = np.array([p_full[c][np.setdiff1d(np.arange(V_T), ids[c])].sum() for c in range(C)])
    z = 2.0 * rng.normal(size=(C, V_S))
    twin = np.full(V_T, -1)
    mapped = rng.choice(V_T, 40, replace=False)
    twin[mapped] = rng.choice(V_S, 40, replace=False)
    has = twin[ids] >= 0
    assert has.any() and (~has).any() and missing.min() > 0
    return dict(z=z, ids=ids, logp=logp, missing=missing, twin=twin)


def _t(d, dtype=torch.float32):
    return (
        torch.tensor(d["z"], dtype=dtype),
        torch.tensor(d["ids"]),
        torch.tensor(d["logp"], dtype=torch.float32),
        torch.tensor(d["missing"], dtype=torch.float32),
        torch.tensor(d["twin"]),
        torch.tensor(W),
    )


def ref_uld(z, logp, missing, w):
    rows = []
    for c in range(len(z)):
        q = _softmax(z[c])
        k = logp.shape[1]
        p = np.sort(np.exp(logp[c]))[::-1]
        qk = _top_desc(q, k)
        rows.append(np.abs(p - qk).sum() + abs(missing[c] - (1.0 - qk.sum())))
    return _mean(rows, w)


def ref_hybrid(z, ids, logp, missing, twin, w):
    rows = []
    for c in range(len(z)):
        q = _softmax(z[c])
        log_q = z[c] - z[c].max() - math.log(np.exp(z[c] - z[c].max()).sum())
        p = np.exp(logp[c])
        kl, q_s, p_rest, q_rest = 0.0, 0.0, p.copy(), q.copy()
        for i, j in enumerate(ids[c]):
            s = twin[j]
            if s >= 0:
                kl += p[i] * (logp[c, i] - log_q[s])
                q_s += q[s]
                p_rest[i] = 0.0
                q_rest[s] = 0.0
        k = len(p)
        pk, qk = np.sort(p_rest)[::-1], _top_desc(q_rest, k)
        rows.append(kl + np.abs(pk - qk).sum() + abs(missing[c] - (1.0 - q_s - qk.sum())))
    return _mean(rows, w)


def ref_alm(a, b, w, tau=1.0):
    rows = []
    for ac, bc in zip(a, b):
        x, y = min(ac / tau, -1e-6), min(bc / tau, -1e-6)
        rows.append(math.exp(x) * (x - y) + (1 - math.exp(x)) * (math.log(1 - math.exp(x)) - math.log(1 - math.exp(y))))
    return _mean(rows, w)


def _alm_inputs(dtype=torch.float32):
    rng = np.random.default_rng(1)
    a, b = -rng.uniform(0.01, 5.0, C), -rng.uniform(0.01, 5.0, C)
    return a, b, torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype, requires_grad=True)


def test_values_match_reference(data):
    z, ids, logp, missing, twin, w = _t(data)
    d = data
    want_uld = ref_uld(d["z"], d["logp"], d["missing"], W)
    assert uld_loss(z, logp, missing, weights=w).item() == pytest.approx(want_uld, abs=1e-5)
    assert uld_loss(z, logp, None, weights=w).item() == pytest.approx(want_uld, abs=1e-5)
    want_h = ref_hybrid(d["z"], d["ids"], d["logp"], d["missing"], d["twin"], W)
    assert hybrid_loss(z, ids, logp, missing, twin=twin, weights=w).item() == pytest.approx(want_h, abs=1e-5)
    assert hybrid_loss(z, ids, logp, twin=twin, weights=w).item() == pytest.approx(want_h, abs=1e-5)
    # k > V_S: the student's sorted vector is zero-padded
    small = d["z"][:, :5]
    assert uld_loss(z[:, :5], logp, missing, weights=w).item() == pytest.approx(
        ref_uld(small, d["logp"], d["missing"], W), abs=1e-5
    )
    a, b, ta, tb = _alm_inputs()
    for tau in (1.0, 2.5):
        assert alm_loss(ta, tb, weights=w, tau=tau).item() == pytest.approx(ref_alm(a, b, W, tau), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32(data, dtype):
    z, ids, logp, missing, twin, w = _t(data, dtype)
    zd = z.double().numpy()  # the rounded logits, exactly
    u = uld_loss(z, logp, missing, weights=w)
    h = hybrid_loss(z, ids, logp, missing, twin=twin, weights=w)
    assert u.dtype == h.dtype == torch.float32 and u.ndim == h.ndim == 0
    assert u.item() == pytest.approx(ref_uld(zd, data["logp"], data["missing"], W), abs=1e-5)
    d = data
    assert h.item() == pytest.approx(ref_hybrid(zd, d["ids"], d["logp"], d["missing"], d["twin"], W), abs=1e-5)
    a, b, ta, tb = _alm_inputs(dtype)
    out = alm_loss(ta, tb, weights=w)
    assert out.dtype == torch.float32 and out.ndim == 0
    assert out.item() == pytest.approx(ref_alm(ta.double().tolist(), tb.double().tolist(), W), abs=1e-5)


def test_gradients_finite_and_gradcheck(data):
    z, ids, logp, missing, twin, w = _t(data)
    for loss in (
        lambda z: uld_loss(z, logp, missing, weights=w),
        lambda z: hybrid_loss(z, ids, logp, missing, twin=twin, weights=w),
    ):
        zz = z.clone().requires_grad_(True)
        loss(zz).backward()
        assert torch.isfinite(zz.grad).all() and zz.grad[[1, 4]].abs().max() == 0  # 0-weight rows: no gradient
    zd = torch.tensor(data["z"], requires_grad=True)
    lp, m, wd = logp.double(), missing.double(), w.double()
    assert torch.autograd.gradcheck(lambda z: hybrid_loss(z, ids, lp, m, twin=twin, weights=wd), (zd,))
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, lp, m, weights=wd), (zd,))
    _, _, ta, tb = _alm_inputs(torch.float64)
    ta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: alm_loss(a, b, weights=wd, tau=1.5), (ta, tb))
    _, _, ta, tb = _alm_inputs()
    alm_loss(ta, tb, weights=w).backward()
    assert torch.isfinite(tb.grad).all() and tb.grad[[1, 4]].abs().max() == 0


def test_zero_when_student_equals_teacher():
    rng = np.random.default_rng(2)
    z = 2.0 * rng.normal(size=(C, V_S))
    ids = np.stack([rng.permutation(V_S) for _ in range(C)])  # k = V_S covers the distribution
    logp = np.stack([np.log(_softmax(z[c]))[ids[c]] for c in range(C)])
    zt, idt, lpt, w = torch.tensor(z, dtype=torch.float32), torch.tensor(ids), torch.tensor(logp), torch.tensor(W)
    zero = torch.zeros(C)
    assert uld_loss(zt, lpt.float(), zero, weights=w).item() == pytest.approx(0.0, abs=1e-6)
    identity = torch.arange(V_S)
    assert hybrid_loss(zt, idt, lpt.float(), zero, twin=identity, weights=w).item() == pytest.approx(0.0, abs=1e-6)
    a = torch.tensor(-rng.uniform(0.01, 5.0, C))
    assert alm_loss(a, a.clone(), weights=w).item() == 0.0
    assert alm_loss(a, a + 0.1, weights=w).item() > 0 and alm_loss(a, a - 0.1, weights=w).item() > 0
    assert alm_loss(torch.zeros(C), torch.zeros(C), weights=w).item() == 0.0  # probability 1: clamped, finite


def test_chunked_equals_unchunked(data):
    z, ids, logp, missing, twin, w = _t(data)
    for loss in (
        lambda z, cs: uld_loss(z, logp, missing, weights=w, chunk_size=cs),
        lambda z, cs: hybrid_loss(z, ids, logp, missing, twin=twin, weights=w, chunk_size=cs),
    ):
        z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        l1, l2 = loss(z1, 2), loss(z2, 4096)
        l1.backward(), l2.backward()
        assert l1.item() == pytest.approx(l2.item(), abs=1e-6)
        torch.testing.assert_close(z1.grad, z2.grad)


def test_hybrid_without_twins_is_uld(data):
    z, ids, logp, missing, _, w = _t(data)
    none = torch.full((V_T,), -1)
    h = hybrid_loss(z, ids, logp, missing, twin=none, weights=w)
    assert h.item() == pytest.approx(uld_loss(z, logp, missing, weights=w).item(), abs=1e-7)


def test_hybrid_is_kl_when_all_kept_ids_have_twins():
    # the teacher's mass lies on its k kept ids (m_T = 0); the student's on their twins (m~_S = 0, q~ = 0)
    rng = np.random.default_rng(3)
    twin = np.arange(V_T) % V_S  # every teacher id has a twin; j and j + V_S share one
    base = np.stack([rng.choice(V_S, K, replace=False) for _ in range(C)])
    ids = base + V_S * ((base < V_T - V_S) & (rng.random((C, K)) < 0.5))  # distinct twins within a row
    logp = np.stack([np.log(_softmax(rng.normal(size=K))) for _ in range(C)])
    z = np.full((C, V_S), -1e4)
    for c in range(C):
        z[c, twin[ids[c]]] = rng.normal(size=K)
    want = []
    for c in range(C):
        log_q = z[c] - z[c].max() - math.log(np.exp(z[c] - z[c].max()).sum())
        want.append(sum(math.exp(lp) * (lp - log_q[twin[j]]) for j, lp in zip(ids[c], logp[c])))
    got = hybrid_loss(
        torch.tensor(z, dtype=torch.float32),
        torch.tensor(ids),
        torch.tensor(logp, dtype=torch.float32),
        torch.zeros(C),
        twin=torch.tensor(twin),
        weights=torch.tensor(W),
    )
    assert got.item() == pytest.approx(_mean(want, W), abs=1e-5)


def test_log1mexp():
    x = torch.tensor([-1e-10, -1e-6, -0.3, -math.log(2), -0.7, -5.0, -50.0], dtype=torch.float64, requires_grad=True)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    x0 = torch.zeros(1, requires_grad=True)  # the branch not taken puts no nan into the gradient
    log1mexp(torch.cat([x0 - 1.0, x0 - 100.0])).sum().backward()
    assert torch.isfinite(x0.grad).all()


def test_bad_inputs_raise(data):
    z, ids, logp, missing, twin, w = _t(data)
    bad = [
        lambda: uld_loss(z[0], logp, missing, weights=w),  # z 1-D
        lambda: uld_loss(z[:5], logp, missing, weights=w),  # rows differ
        lambda: uld_loss(z, logp, missing[:3], weights=w),
        lambda: uld_loss(z, logp, missing, weights=w[:3]),
        lambda: uld_loss(z, logp, missing, weights=w, chunk_size=0),
        lambda: hybrid_loss(z, ids[:, :4], logp, missing, twin=twin, weights=w),
        lambda: hybrid_loss(z, ids, logp, missing, twin=torch.full((V_T,), V_S), weights=w),  # twin id >= V_S
        lambda: hybrid_loss(z, ids, logp, missing, twin=twin[:10], weights=w),  # t_ids beyond twin
        lambda: hybrid_loss(z, ids.float(), logp, missing, twin=twin, weights=w),
        lambda: alm_loss(torch.zeros(3), torch.zeros(4), weights=torch.ones(3)),
        lambda: alm_loss(torch.zeros(3), torch.zeros(3), weights=torch.ones(3), tau=0.0),
        lambda: uld_loss(z, logp, missing, weights=-w),
    ]
    for fn in bad:
        with pytest.raises(ValueError):
            fn()
    with pytest.raises(ValueError, match=r"\(5, 50\)"):
        uld_loss(z[:5], logp, missing, weights=w)


def test_row_forms_equal_the_losses(data):
    """uld_at / hybrid_at (the objective's: rows of a batch's log-probs, one gather) give the
    value and gradient of uld_loss / hybrid_loss on those rows' logits."""
    from pipeline.objectives.xtok import hybrid_at, uld_at

    z, ids, logp, missing, twin, w = _t(data, torch.float64)
    rows = torch.tensor([4, 0, 2, 6, 1, 5, 3][: len(z)])
    big = torch.cat([z, 3.0 * torch.randn(5, z.shape[1], dtype=torch.float64)])  # rows not read
    for at, direct in (
        (
            lambda x: uld_at(torch.log_softmax(x, -1), rows, logp, missing, weights=w),
            lambda x: uld_loss(x[rows], logp, missing, weights=w),
        ),
        (
            lambda x: hybrid_at(torch.log_softmax(x, -1), rows, ids, logp, missing, twin=twin, weights=w),
            lambda x: hybrid_loss(x[rows], ids, logp, missing, twin=twin, weights=w),
        ),
    ):
        a, b = big.clone().requires_grad_(), big.clone().requires_grad_()
        va, vb = at(a), direct(b)
        va.backward()
        vb.backward()
        assert float(va) == pytest.approx(float(vb), rel=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_prefix_kl_by_hand(data):
    """prefix_kl_at against a float64 loop over strings. Row r reads token a to depth d;
    its candidates (the kept ids, and a with its own log-prob when the top-k left it out)
    that agree with a's first d bytes and go on past them give their mass to the student
    token beginning the rest (the longest; ids with none left out); those ending exactly
    at d give theirs to the next row's first tokens (its candidates, renormalised); the
    sum renormalised, KL. Gradcheck in float64."""
    from pipeline.objectives.xtok import prefix_kl_at

    z, ids, logp, _, _, w = _t(data, torch.float64)
    rng = np.random.default_rng(5)
    t_str = [bytes(rng.choice(list(b"aaabbbc"), int(rng.integers(1, 5))).tolist()) for _ in range(V_T)]
    s_str = sorted({bytes(rng.choice(list(b"ab"), int(rng.integers(1, 3))).tolist()) for _ in range(40)})  # no "c"
    D = max(map(len, t_str))
    heads, prefix = np.full((V_T, D + 1), -1), np.full((V_T, D), -1)
    for v, b in enumerate(t_str):
        heads[v, : len(b) + 1] = [hash(b[:d]) % 2**40 for d in range(len(b) + 1)]  # equal iff the same head
        for d in range(len(b)):
            fits = [i for i, sb in enumerate(s_str) if b[d:].startswith(sb)]
            prefix[v, d] = max(fits, key=lambda i: len(s_str[i])) if fits else -1

    def row(shift):  # the stored rows, and an actual token each: kept (odd rows) or left out
        r_ids, r_lp = np.roll(data["ids"], shift, 0), np.roll(data["logp"], shift, 0)
        tok = np.array([r_ids[c][int(rng.integers(K))] if c % 2 else int(rng.integers(V_T)) for c in range(C)])
        tok_lp = np.log(rng.uniform(0.001, 0.05, C))
        for c in range(C):
            hit = np.flatnonzero(r_ids[c] == tok[c])
            tok_lp[c] = r_lp[c][hit[0]] if len(hit) else tok_lp[c]
        return r_ids, r_lp, tok, tok_lp

    here, after = row(0), row(3)
    has_after = np.arange(C) != 2
    # depth: inside a (0 <= d < |a|) or, at a boundary, all of it (d = |a|)
    n_a = [len(t_str[a]) for a in here[2]]
    depth = np.array([0 if c == 0 else n_a[c] if c % 3 == 2 else int(rng.integers(n_a[c])) for c in range(C)])
    rows = torch.arange(C)
    log_q = torch.log_softmax(z, -1)

    def as_t(r):
        return torch.tensor(r[0]), torch.tensor(r[1], dtype=torch.float32), torch.tensor(r[2]), torch.tensor(r[3])

    kw = dict(depth=torch.tensor(depth), has_after=torch.tensor(has_after), prefix=torch.tensor(prefix))
    kw |= dict(heads=torch.tensor(heads), weights=w)
    got = prefix_kl_at(log_q, rows, as_t(here), as_t(after), **kw)

    def cands(r, c):
        out = dict(zip(r[0][c].tolist(), np.exp(r[1][c].astype(np.float32).astype(np.float64)).tolist()))
        out.setdefault(int(r[2][c]), math.exp(r[3][c]))
        return out

    def first(b, d):
        fits = [i for i, sb in enumerate(s_str) if b[d:].startswith(sb)]
        return max(fits, key=lambda i: len(s_str[i])) if fits else -1

    per, on, ends = [], [], 0
    lq = log_q.numpy()
    for c in range(C):
        d, read = depth[c], t_str[here[2][c]]
        buckets, e = {}, 0.0
        for v, pv in cands(here, c).items():
            b = t_str[v]
            if b[:d] == read[:d] and len(b) > d and first(b, d) >= 0:
                buckets[first(b, d)] = buckets.get(first(b, d), 0.0) + pv
            elif b == read[:d] and d > 0:
                e += pv
        g = {}
        for v, pv in cands(after, c).items() if has_after[c] else ():
            if first(t_str[v], 0) >= 0:
                g[first(t_str[v], 0)] = g.get(first(t_str[v], 0), 0.0) + pv
        for s, pv in g.items():
            buckets[s] = buckets.get(s, 0.0) + e * pv / sum(g.values())
        ends += e > 0 and bool(g)
        buckets = {s: b for s, b in buckets.items() if b > 0}
        norm = sum(buckets.values())
        per.append(sum(b / norm * (math.log(b / norm) - lq[c, s]) for s, b in buckets.items()) if norm else 0.0)
        on.append(norm > 0 and (e == 0 or has_after[c]))  # ending here with no next row: no target
    # some rows have no target (weight 0), row 2 among them (it ends at a boundary, no next row);
    # some hand mass to the next row
    assert sum(on) >= 3 and not on[2] and ends >= 1
    on = np.array(on)
    want = (np.array(per) * W * on).sum() / (W * on).sum()
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert torch.autograd.gradcheck(
        lambda x: prefix_kl_at(torch.log_softmax(x, -1), rows, as_t(here), as_t(after), **kw),
        (z.clone().requires_grad_(),),
    )
