"""pipeline/token_labels.py: top-k and sampled per-token labels against numpy references,
dtype handling, chunk invariance, reproducible draws, and KL(reconstruction || teacher)."""
import numpy as np
import pytest
import torch

from pipeline.token_labels import (quantize_labels, reconstruction_kl, sampled_token_labels, topk_token_labels)

V = 50


def logits(n=64, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, v), generator=g) * scale


def np_logp(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("k", [1, 8, V])
def test_topk_matches_numpy_reference(k):
    z = logits()
    lab = topk_token_labels(z, k=k)
    lp = np_logp(z.numpy())
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    assert lab["ids"].dtype == torch.int64 and lab["logprobs"].dtype == torch.float32
    assert lab["missing_mass"].dtype == torch.float32 and lab["vocab_size"] == V
    assert np.array_equal(lab["ids"].numpy(), order)
    np.testing.assert_allclose(lab["logprobs"].numpy(), np.take_along_axis(lp, order, 1), atol=1e-5)
    mask = np.ones_like(lp, bool)
    np.put_along_axis(mask, order, False, 1)
    exact_tail = np.where(mask, np.exp(lp), 0.0).sum(axis=1)
    m = lab["missing_mass"].numpy()
    np.testing.assert_allclose(m, exact_tail, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(m, 1.0 - np.exp(lab["logprobs"].double().numpy()).sum(axis=1), atol=2e-6)
    if k == V:
        assert (m == 0).all()


def test_topk_tiny_tail_is_exact_not_cancelled():
    z = torch.zeros((2, V))
    z[:, 0] = 30.0                                           # p0 = 1 - 49 e^-30: 1 - sum would round to 0
    m = topk_token_labels(z, k=1)["missing_mass"].double().numpy()
    want = 49 * np.exp(-30.0) / (1 + 49 * np.exp(-30.0))
    np.testing.assert_allclose(m, want, rtol=1e-5)


def test_batched_input_and_half_precision_logits_are_computed_in_fp32():
    z = logits(n=24).reshape(2, 12, V)
    for dt in (torch.bfloat16, torch.float16):
        zq = z.to(dt)
        lab = topk_token_labels(zq, k=5)
        ref = topk_token_labels(zq.float().reshape(-1, V), k=5)   # the same rounded logits, upcast first
        assert lab["ids"].shape == (24, 5) and lab["logprobs"].dtype == torch.float32
        assert torch.equal(lab["ids"], ref["ids"]) and torch.equal(lab["logprobs"], ref["logprobs"])
        assert torch.equal(lab["missing_mass"], ref["missing_mass"])
        s = sampled_token_labels(zq, draws=8, seed=1)
        assert torch.equal(s["counts"].sum(1), torch.full((24,), 8, dtype=torch.int64))


def test_topk_chunking_invariance_and_device_flag():
    z = logits(n=37)
    a, b = topk_token_labels(z, k=7, chunk_size=1), topk_token_labels(z, k=7, chunk_size=1000)
    for key in ("ids", "logprobs", "missing_mass"):
        assert torch.equal(a[key], b[key])
    c = topk_token_labels(z, k=7, to_cpu=False)
    assert c["ids"].device == z.device
    with pytest.raises(ValueError):
        topk_token_labels(z, k=V + 1)


def test_sampled_counts_ids_and_determinism():
    z = logits(n=300, seed=3)
    s = sampled_token_labels(z, draws=32, seed=7, rng_block=16)
    ids, counts, u = s["ids"], s["counts"], s["num_unique"]
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and ids.shape == counts.shape
    assert ids.shape[1] == int(u.max()) <= 32
    assert (counts.sum(1) == 32).all() and (counts > 0).sum(1).eq(u).all()
    for row_ids, row_c, n_u in zip(ids.tolist(), counts.tolist(), u.tolist()):
        kept = row_ids[:n_u]
        assert kept == sorted(set(kept)) and all(c > 0 for c in row_c[:n_u])     # unique, ascending
        assert all(c == 0 and i == 0 for i, c in zip(row_ids[n_u:], row_c[n_u:]))  # padding
        assert all(0 <= i < V for i in kept)
    again = sampled_token_labels(z, draws=32, seed=7, rng_block=16, chunk_size=1)
    other = sampled_token_labels(z, draws=32, seed=7, rng_block=16, chunk_size=1000)
    assert torch.equal(again["ids"], ids) and torch.equal(again["counts"], counts)
    assert torch.equal(other["ids"], ids) and torch.equal(other["counts"], counts)
    assert not torch.equal(sampled_token_labels(z, draws=32, seed=8, rng_block=16)["counts"], counts)


def test_sampled_batches_with_row_offset_equal_one_call():
    z = logits(n=64, seed=4)
    whole = sampled_token_labels(z, draws=16, seed=2, rng_block=16)
    parts = [sampled_token_labels(z[a:a + 32], draws=16, seed=2, rng_block=16, row_offset=a) for a in (0, 32)]
    for key in ("ids", "counts"):
        width = whole[key].shape[1]
        joined = torch.cat([torch.nn.functional.pad(p[key], (0, width - p[key].shape[1])) for p in parts])
        assert torch.equal(joined, whole[key])
    with pytest.raises(ValueError, match="multiple of rng_block"):
        sampled_token_labels(z, draws=4, row_offset=3, rng_block=16)


def test_sampled_frequencies_approach_p():
    z = logits(n=1, seed=5, scale=1.5).expand(4000, V).contiguous()   # one distribution, many rows
    s = sampled_token_labels(z, draws=50, seed=0)
    freq = torch.zeros(V, dtype=torch.float64).scatter_add_(0, s["ids"].reshape(-1), s["counts"].reshape(-1).double())
    freq /= freq.sum()
    p = torch.softmax(z[0].double(), 0)
    assert (freq - p).abs().max() < 0.005                      # 200k draws: sd <= 0.0011 per id


def test_reconstruction_kl_topk_zero_at_full_vocab_and_decreasing_in_k():
    z = logits(n=200, seed=6, scale=4.0)                       # peaked
    assert reconstruction_kl(z, topk_token_labels(z, k=V), "topk").abs().max() < 1e-5
    kls = {tail: [reconstruction_kl(z, topk_token_labels(z, k=k), "topk", tail=tail).mean().item()
                  for k in (1, 2, 4, 8, 16, 32, 49)] for tail in ("uniform", "drop")}
    for tail, seq in kls.items():
        assert all(x > y for x, y in zip(seq, seq[1:])), (tail, seq)
        assert seq[-1] >= 0
    # drop: exact values give KL = -log(1 - m)
    lab = topk_token_labels(z, k=4)
    np.testing.assert_allclose(reconstruction_kl(z, lab, "topk", tail="drop").numpy(),
                               -np.log1p(-lab["missing_mass"].double().numpy()), rtol=1e-4, atol=1e-6)


def test_reconstruction_kl_topk_matches_dense_numpy():
    z = logits(n=16, seed=8)
    lab = quantize_labels(topk_token_labels(z, k=6), "bfloat16")
    lp = np_logp(z.numpy())
    ids, q, m = lab["ids"].numpy(), np.exp(lab["logprobs"].double().numpy()), lab["missing_mass"].double().numpy()
    r = np.repeat((m / (V - 6))[:, None], V, 1)
    np.put_along_axis(r, ids, q, 1)
    r /= r.sum(1, keepdims=True)
    want = (r * (np.log(r) - lp)).sum(1)
    np.testing.assert_allclose(reconstruction_kl(z, lab, "topk", chunk_size=5).numpy(), want, rtol=1e-4, atol=1e-6)


def test_reconstruction_kl_sampled_matches_dense_and_shrinks_with_draws():
    z = logits(n=100, seed=9, scale=4.0)
    s = sampled_token_labels(z, draws=16, seed=0)
    lp = np_logp(z.numpy())
    r = np.zeros_like(lp)
    np.add.at(r, (np.repeat(np.arange(100), s["ids"].shape[1]), s["ids"].reshape(-1).numpy()),
              s["counts"].reshape(-1).double().numpy() / 16)
    want = np.where(r > 0, r * (np.log(np.where(r > 0, r, 1)) - lp), 0).sum(1)
    got = reconstruction_kl(z, s, "sampled")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got).all() and (got >= -1e-6).all()
    smooth = reconstruction_kl(z, s, "sampled", smoothing=1e-3)
    assert torch.isfinite(smooth).all() and (smooth - got).abs().max() < 0.05
    means = [reconstruction_kl(z, sampled_token_labels(z, draws=d, seed=0), "sampled").mean().item()
             for d in (4, 64, 1024)]
    assert means[0] > means[1] > means[2]


def test_uint8_log_codes_match_storage_and_cost_little_kl():
    from storage.token_packing import from_logprob_codes, logprob_codes
    z = logits(n=64, seed=10, scale=4.0)
    lab = topk_token_labels(z, k=8)
    q = quantize_labels(lab, "uint8")
    want = from_logprob_codes(logprob_codes(lab["logprobs"].numpy()))
    assert np.array_equal(q["logprobs"].numpy(), want)
    exact = reconstruction_kl(z, lab, "topk", tail="drop")
    coded = reconstruction_kl(z, q, "topk", tail="drop")
    assert (coded - exact).abs().max() < 2e-3
    assert ((q["missing_mass"] - lab["missing_mass"]).abs() <= 0.033 * lab["missing_mass"]).all()
