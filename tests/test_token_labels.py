"""pipeline/labelling/token_summaries.py: top-k and sampled per-token labels against numpy references,
dtype handling, chunk invariance, reproducible draws, and KL(reconstruction || teacher)."""

import numpy as np
import pytest
import torch

from pipeline.labelling.token_summaries import (
    quantize_labels,
    reconstruction_kl,
    sampled_token_labels,
    topk_token_labels,
)

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
    z[:, 0] = 30.0  # p0 = 1 - 49 e^-30: 1 - sum would round to 0
    m = topk_token_labels(z, k=1)["missing_mass"].double().numpy()
    want = 49 * np.exp(-30.0) / (1 + 49 * np.exp(-30.0))
    np.testing.assert_allclose(m, want, rtol=1e-5)


def test_batched_input_and_half_precision_logits_are_computed_in_fp32():
    z = logits(n=24).reshape(2, 12, V)
    for dt in (torch.bfloat16, torch.float16):
        zq = z.to(dt)
        lab = topk_token_labels(zq, k=5)
        ref = topk_token_labels(zq.float().reshape(-1, V), k=5)  # the same rounded logits, upcast first
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
        assert kept == sorted(set(kept)) and all(c > 0 for c in row_c[:n_u])  # unique, ascending
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
    parts = [sampled_token_labels(z[a : a + 32], draws=16, seed=2, rng_block=16, row_offset=a) for a in (0, 32)]
    for key in ("ids", "counts"):
        width = whole[key].shape[1]
        joined = torch.cat([torch.nn.functional.pad(p[key], (0, width - p[key].shape[1])) for p in parts])
        assert torch.equal(joined, whole[key])
    with pytest.raises(ValueError, match="multiple of rng_block"):
        sampled_token_labels(z, draws=4, row_offset=3, rng_block=16)


def test_sampled_frequencies_approach_p():
    z = logits(n=1, seed=5, scale=1.5).expand(4000, V).contiguous()  # one distribution, many rows
    s = sampled_token_labels(z, draws=50, seed=0)
    freq = torch.zeros(V, dtype=torch.float64).scatter_add_(0, s["ids"].reshape(-1), s["counts"].reshape(-1).double())
    freq /= freq.sum()
    p = torch.softmax(z[0].double(), 0)
    assert (freq - p).abs().max() < 0.005  # 200k draws: sd <= 0.0011 per id


def test_reconstruction_kl_topk_zero_at_full_vocab_and_decreasing_in_k():
    z = logits(n=200, seed=6, scale=4.0)  # peaked
    assert reconstruction_kl(z, topk_token_labels(z, k=V), "topk").abs().max() < 1e-5
    kls = {
        tail: [
            reconstruction_kl(z, topk_token_labels(z, k=k), "topk", tail=tail).mean().item()
            for k in (1, 2, 4, 8, 16, 32, 49)
        ]
        for tail in ("uniform", "drop")
    }
    for tail, seq in kls.items():
        assert all(x > y for x, y in zip(seq, seq[1:])), (tail, seq)
        assert seq[-1] >= 0
    # drop: exact values give KL = -log(1 - m)
    lab = topk_token_labels(z, k=4)
    np.testing.assert_allclose(
        reconstruction_kl(z, lab, "topk", tail="drop").numpy(),
        -np.log1p(-lab["missing_mass"].double().numpy()),
        rtol=1e-4,
        atol=1e-6,
    )


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
    np.add.at(
        r,
        (np.repeat(np.arange(100), s["ids"].shape[1]), s["ids"].reshape(-1).numpy()),
        s["counts"].reshape(-1).double().numpy() / 16,
    )
    want = np.where(r > 0, r * (np.log(np.where(r > 0, r, 1)) - lp), 0).sum(1)
    got = reconstruction_kl(z, s, "sampled")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got).all() and (got >= -1e-6).all()
    smooth = reconstruction_kl(z, s, "sampled", smoothing=1e-3)
    assert torch.isfinite(smooth).all() and (smooth - got).abs().max() < 0.05
    means = [
        reconstruction_kl(z, sampled_token_labels(z, draws=d, seed=0), "sampled").mean().item() for d in (4, 64, 1024)
    ]
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


# --- the two-stage top-k (pipeline.labelling.token_summaries._top_m) against a plain reference ----------


def reference_topk(z: torch.Tensor, k: int) -> dict:
    """Straightforward labels in float64: log_softmax over the full vocabulary, the ids of a
    stable descending sort (the documented tie rule: equal logits, lowest id first), and
    the missing mass as the explicit sum of the other V - k probabilities."""
    z = z.reshape(-1, z.shape[-1]).double()
    lp = torch.log_softmax(z, dim=-1)
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    rest = torch.ones_like(lp, dtype=torch.bool).scatter_(1, ids, False)
    missing = torch.where(rest, lp.exp(), torch.zeros_like(lp)).sum(dim=-1)
    return {"ids": ids, "logprobs": lp.gather(1, ids), "missing_mass": missing}


def assert_matches_reference(z, k, rtol=1e-5, **kw):
    lab = topk_token_labels(z, k=k, **kw)
    want = reference_topk(z.float(), k)
    v = z.shape[-1]
    assert lab["ids"].shape == (want["ids"].shape[0], k) and lab["vocab_size"] == v and lab["k"] == k
    ids = lab["ids"]
    assert ((ids >= 0) & (ids < v)).all()
    assert all(len(set(row)) == k for row in ids.tolist())  # distinct ids
    # the values at the ids are the k largest (the guaranteed part, whatever the ties) ...
    got_vals = z.reshape(-1, v).float().gather(1, ids)
    assert torch.equal(got_vals, torch.sort(z.reshape(-1, v).float(), dim=1, descending=True).values[:, :k])
    # ... and the ids follow the documented tie rule: a stable descending sort
    assert torch.equal(ids, want["ids"])
    np.testing.assert_allclose(lab["logprobs"].numpy(), want["logprobs"].numpy(), rtol=1e-6, atol=2e-5)
    np.testing.assert_allclose(
        lab["missing_mass"].double().numpy(), want["missing_mass"].numpy(), rtol=rtol, atol=1e-30
    )
    return lab


@pytest.mark.parametrize(
    "n,v,k,width",
    [
        (40, 5000, 32, 128),  # two stages, ragged tail (5000 = 39 * 128 + 8)
        (40, 4096, 32, 128),  # two stages, no tail
        (30, 1000, 8, 128),  # k + 1 >= number of chunks: plain top-k fallback
        (30, 300, 1, 7),  # tiny chunks, ragged tail of 6
        (30, 300, 40, 7),  # k + 1 = 41 chunks of 42: two stages, candidates = almost everything
        (30, 300, 41, 7),  # k + 1 = 42 full chunks: fallback
        (12, 97, 96, 4),  # k = V - 1: one id left over
        (12, 97, 97, 4),  # k = V
        (16, 49152, 32, None),  # the SmolLM2 vocabulary with the default chunk width
    ],
)
def test_topk_two_stage_matches_reference(n, v, k, width):
    kw = {} if width is None else {"chunk_width": width}
    z = logits(n=n, v=v, seed=n + v + k, scale=4.0)
    assert_matches_reference(z, k, **kw)


def test_topk_results_do_not_depend_on_chunk_width_or_chunk_size():
    z = logits(n=33, v=1000, seed=11, scale=3.0)
    zq = torch.round(z)  # many ties
    for x in (z, zq):
        base = topk_token_labels(x, k=16, chunk_width=1000)  # one chunk: plain top-k
        for width, cs in ((1, 64), (3, 7), (16, 1), (64, 1000), (128, 5)):
            other = topk_token_labels(x, k=16, chunk_width=width, chunk_size=cs)
            for key in ("ids", "logprobs", "missing_mass"):
                assert torch.equal(base[key], other[key]), (width, cs, key)
    with pytest.raises(ValueError, match="chunk_width"):
        topk_token_labels(z, k=4, chunk_width=0)


@pytest.mark.parametrize("levels", [1, 2, 5])
@pytest.mark.parametrize("v,width", [(3000, 128), (300, 16), (50, 128)])
def test_topk_ties_follow_the_lowest_id_rule(levels, v, width):
    g = torch.Generator().manual_seed(levels * v)
    z = torch.randint(0, levels, (24, v), generator=g).float()  # levels = 1: all equal
    lab = assert_matches_reference(z, 20, chunk_width=width)
    if levels == 1:
        assert torch.equal(lab["ids"], torch.arange(20).expand(24, 20))
        np.testing.assert_allclose(lab["missing_mass"].numpy(), (v - 20) / v, rtol=1e-5)
    # ties placed right at the boundary (ranks k and k + 1) and inside the top k
    z = logits(n=24, v=v, seed=levels, scale=1.0)
    z[:, v // 2] = z[:, 3] = z[:, v - 1] = 9.0  # three equal maxima, far apart
    z[:, [1, v // 3, v - 2]] = 7.5
    assert_matches_reference(z, 4, chunk_width=width)
    assert_matches_reference(z, 2, chunk_width=width)


def test_topk_signed_zeros_are_ties():
    z = torch.zeros((4, 300))
    z[:, ::2] = -0.0
    z[:, 10] = 1.0
    lab = assert_matches_reference(z, 5, chunk_width=16)
    assert lab["ids"][:, 0].eq(10).all() and torch.equal(lab["ids"][0, 1:], torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("width", [128, 16])
def test_topk_with_minus_infinity_logits(width):
    z = logits(n=20, v=2000, seed=12, scale=3.0)
    g = torch.Generator().manual_seed(1)
    z[torch.rand(z.shape, generator=g) < 0.5] = float("-inf")  # a masked vocabulary
    z[0, :] = float("-inf")
    z[0, [5, 1500, 1999]] = torch.tensor([1.0, 3.0, 2.0])  # fewer finite ids than k
    z[1, 100:] = float("-inf")  # exactly k + 1 finite ids... and more
    z[2, :] = float("-inf")
    z[2, 7] = 0.0  # one finite id
    lab = assert_matches_reference(z, 8, chunk_width=width)
    assert lab["ids"][0, :3].tolist() == [1500, 1999, 5] and lab["ids"][0, 3:].tolist() == [0, 1, 2, 3, 4]
    assert torch.isneginf(lab["logprobs"][0, 3:]).all() and lab["missing_mass"][0] == 0
    assert lab["missing_mass"][2] == 0 and lab["logprobs"][2, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_precision_logits_with_their_ties(dtype):
    z = logits(n=48, v=5000, seed=13, scale=4.0).to(dtype)  # bf16: ties in most rows
    vals = torch.sort(z.float(), dim=1, descending=True).values[:, :33]
    assert (vals[:, 1:] == vals[:, :-1]).any()  # the case is really exercised
    lab = assert_matches_reference(z, 32)
    assert torch.equal(topk_token_labels(z.reshape(4, 12, 5000), k=32)["ids"], lab["ids"])


def test_topk_peaked_rows_keep_a_tiny_missing_mass_exactly():
    z = logits(n=16, v=6000, seed=14, scale=1.0)
    z[:, 4321] = 60.0  # p(rest) ~ 6000 e^-60 ~ 1e-23
    z[8:, 17] = 59.0
    lab = assert_matches_reference(z, 2)
    assert (lab["missing_mass"] > 0).all() and (lab["missing_mass"] < 1e-20).all()
    lab1 = assert_matches_reference(z, 1)
    assert (lab1["missing_mass"][8:] > 0.2).all()


def test_topk_overwrite_and_input_preservation():
    z = logits(n=70, v=3000, seed=15, scale=3.0)
    keep = z.clone()
    a = topk_token_labels(z, k=10)
    assert torch.equal(z, keep)  # not overwritten by default
    t = z.t().contiguous().t()  # non-contiguous rows
    b = topk_token_labels(t, k=10, overwrite=True)
    assert torch.equal(z, keep)
    scratch = z.clone()
    c = topk_token_labels(scratch, k=10, overwrite=True)  # may use the logits as scratch
    for key in ("ids", "logprobs", "missing_mass"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    h = z.half()
    hk = h.clone()
    topk_token_labels(h, k=10)
    assert torch.equal(h, hk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_cuda_matches_cpu_including_ties():
    for z in (logits(n=300, v=49152, seed=16, scale=4.0), logits(n=300, v=49152, seed=17).bfloat16()):
        cpu = topk_token_labels(z, k=32)
        gpu = topk_token_labels(z.cuda(), k=32, to_cpu=False)
        assert gpu["ids"].is_cuda
        assert torch.equal(cpu["ids"], gpu["ids"].cpu())
        torch.testing.assert_close(cpu["logprobs"], gpu["logprobs"].cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu["missing_mass"], gpu["missing_mass"].cpu(), rtol=1e-4, atol=1e-7)
