"""The objective's α mix over a large vocabulary in one pass: topk_kl / sampled_kl with
next-token targets return (KD, CE) equal, in value and gradient, to the two losses computed
apart (each tested against hand-computed values in test_lm_losses.py), and the Objective
uses that path exactly when it is defined (T' = 1, V > FUSED_CE_CLASSES)."""

import pytest
import torch

from pipeline.objectives.objective import FUSED_CE_CLASSES, Objective
from pipeline.objectives.sparse import next_token_ce, sampled_kl, topk_tail_kl

N, V, K = 37, 2 * FUSED_CE_CLASSES + 3, 8


def _topk_batch(g):
    z = torch.randn(N, V, generator=g) * 3
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    p = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
    logp = p.gather(1, ids).log()
    missing = 1 - p.gather(1, ids).sum(-1)
    y = torch.randint(0, V, (N,), generator=g)
    y[:5] = ids[:5, 0]  # some targets among the kept ids, most in the tail
    return z, ids, logp, missing, y


def _grads(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    out.backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("chunk", [7, 512])
def test_topk_kl_with_targets_equals_the_two_losses(chunk):
    g = torch.Generator().manual_seed(0)
    z, ids, logp, missing, y = _topk_batch(g)
    w = torch.rand(N, generator=g)
    a = 0.3

    def fused(x):
        kd, ce = topk_tail_kl(x, ids, logp, missing_mass=missing, weights=w, chunk_size=chunk, targets=y)
        return a * ce + (1 - a) * kd

    def apart(x):
        kd = topk_tail_kl(x, ids, logp, missing_mass=missing, weights=w, chunk_size=chunk)
        return a * next_token_ce(x, y, weights=w, chunk_size=chunk) + (1 - a) * kd

    (v1, g1), (v2, g2) = _grads(fused, z), _grads(apart, z)
    assert torch.allclose(v1, v2, rtol=1e-6) and torch.allclose(g1, g2, atol=1e-7, rtol=1e-5)
    kd, ce = topk_tail_kl(z, ids, logp, missing_mass=missing, weights=w, targets=y)
    assert torch.allclose(ce, next_token_ce(z, y, weights=w), rtol=1e-6)


def test_sampled_kl_with_targets_equals_the_two_losses():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, V, generator=g) * 3
    ids = torch.randint(0, V, (N, 6), generator=g)
    counts = torch.randint(0, 4, (N, 6), generator=g)
    counts[:, 0] += 1  # every row has a draw
    y = torch.randint(0, V, (N,), generator=g)

    def fused(x):
        kd, ce = sampled_kl(x, ids, counts, targets=y, chunk_size=9)
        return 0.5 * kd + 0.5 * ce

    def apart(x):
        return 0.5 * sampled_kl(x, ids, counts, chunk_size=9) + 0.5 * next_token_ce(x, y, chunk_size=9)

    (v1, g1), (v2, g2) = _grads(fused, z), _grads(apart, z)
    assert torch.allclose(v1, v2, rtol=1e-6) and torch.allclose(g1, g2, atol=1e-7, rtol=1e-5)


def test_the_objective_fuses_only_where_it_is_defined(monkeypatch):
    import pipeline.objectives.sparse as sparse

    g = torch.Generator().manual_seed(2)
    z, ids, logp, missing, y = _topk_batch(g)
    B, L = 1, N
    batch = {
        "y": y.view(B, L),
        "mask": torch.ones(B, L, dtype=torch.bool),
        "weight": torch.ones(B),
        "topk_ids": ids.view(B, L, K),
        "topk_logprobs": logp.view(B, L, K),
        "missing_mass": missing.view(B, L),
    }
    calls = []
    real = sparse.next_token_ce
    monkeypatch.setattr("pipeline.objectives.objective.next_token_ce", lambda *a, **k: calls.append(1) or real(*a, **k))
    obj = Objective(loss="topk_kl", alpha=0.5, kind="token_topk", stored_temperatures=[1.0])
    t = obj.terms(z.view(B, L, V), batch)
    assert not calls  # one pass: no separate CE
    want_kd = topk_tail_kl(z, ids, logp, missing_mass=missing)
    want_ce = real(z, y)
    assert torch.allclose(t["kd_loss"], want_kd, rtol=1e-6) and torch.allclose(t["task_loss"], want_ce, rtol=1e-6)
    assert list(t) == ["loss", "task_loss", "kd_loss"]
    # at T' = 2 the KD softmax is another one: the terms are computed apart
    Objective(loss="topk_kl", alpha=0.5, temperature=2.0, kind="token_topk", stored_temperatures=[1.0]).terms(
        z.view(B, L, V), batch
    )
    assert calls
