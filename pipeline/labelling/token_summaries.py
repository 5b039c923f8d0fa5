"""Sparse per-token labels of a language-model teacher, computed on the logits' device.

For each token position the teacher's next-token distribution p = softmax(z) (T = 1) over
a vocabulary of V ids is summarised as one of

* top-k (`topk_token_labels`): the k most probable ids, their log-probs log p_i
  normalised over the FULL vocabulary (log_softmax in fp32), and the missing mass
  m = 1 - sum_i p_i, computed directly as the sum of the V - k other probabilities
  (logsumexp of the log-probs with the kept ids masked out), so it is exact even when tiny.
  The k largest logits come from an exact two-stage top-k (chunk maxima over chunks of
  128 ids, the k + 1 best chunks, then top-k over their ids only: ~23 us per position
  vs ~66 for torch.topk over V = 49,152 at k = 32 on 2 CPU cores). Tie rule: ids of EQUAL
  logits are ordered lowest id first, i.e. the ids are those of a stable descending sort of
  the row (-0.0 equals +0.0), on
  every device and for any chunk_size; rows with ties take a slower canonical path.
* sampled (`sampled_token_labels`; random-sampling KD, Anshumann et al., ACL 2025): s
  draws with replacement from p (torch.multinomial), stored as the unique drawn ids
  (ascending) and their counts; counts / s is an unbiased estimate of p.

Everything runs in torch on the logits' device (CPU or GPU), `chunk_size` positions at a
time, so a (chunk_size, V) fp32 block is the largest temporary; only the small results
leave the device. Input logits may be any float dtype ((B, L, V) or (N, V)); they are
upcast to fp32 chunk by chunk. Select the positions to label (e.g. drop padding) before
calling: every row is labelled.

Reproducibility of the draws: rows are grouped in fixed RNG blocks of `rng_block`
consecutive ABSOLUTE rows (row_offset + i); block b draws with its own torch.Generator on
the logits' device, seeded from (seed, b) by a fixed integer hash. So the draws depend on
(seed, rng_block, the absolute rows of each block and their logits), never on chunk_size,
and a corpus labelled in batches gives the same draws as one call when each batch's
row_offset is its absolute first row (a multiple of rng_block). CPU and CUDA generators
produce different streams: draws are reproducible per device type and torch version.

`reconstruction_kl` measures KL(reconstruction || teacher) = sum_j r_j log(r_j / p_j) per
position, the direction of DistillKit's reported numbers (formulas at the function).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _rows(logits: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch tensor")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (B, L, V) or (N, V), got shape {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


TOPK_CHUNK_WIDTH = 128  # ids per chunk of the two-stage top-k (see _top_m)


def _order_keys(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (value descending, id ascending) as key descending: the
    order-preserving int32 image of the fp32 value (sign-magnitude -> two's complement,
    -0.0 folded into +0.0) in the high 32 bits, 2**32 - 1 - id in the low 32."""
    b = (vals.float() + 0.0).view(torch.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (b.to(torch.int64) << 32) | (0xFFFFFFFF - ids)


def _top_m(z: torch.Tensor, m: int, width: int, canonical: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of each row of z (R, V) fp32 contiguous, sorted descending:
    (values (R, m), ids (R, m) int64). Two stages when the vocabulary holds more than m
    full chunks of `width` ids: the chunk maxima (R, C) (one amax pass), the m chunks
    with the largest maxima, then top-m over their m * width ids plus the < width ids of
    the ragged tail (always candidates). Exact: the i-th largest entry e lies in a chunk
    whose max is >= e, so if that chunk is not chosen, the m chosen chunks' maxima are m
    distinct entries >= e, so e is not among the m largest (and the values are those of
    a full top-m whatever the tie-breaks). canonical=True breaks ties by the lowest id
    in both stages (int64 keys, _order_keys; chunks by their max, then lowest index),
    which makes the ids those of a stable descending sort of the row."""
    r, v = z.shape
    full = v // width
    dev = z.device
    if m >= full:  # few chunks: one plain top-m
        if not canonical:
            return torch.topk(z, m, dim=1, largest=True, sorted=True)
        ids = torch.topk(_order_keys(z, torch.arange(v, device=dev)), m, dim=1, sorted=True).indices
        return z.gather(1, ids), ids
    blocks = z[:, : full * width].view(r, full, width)
    cmax = blocks.amax(dim=2)  # (R, C)
    if canonical:
        cmax = _order_keys(cmax, torch.arange(full, device=dev))
    chunks = torch.topk(cmax, m, dim=1, sorted=False).indices  # (R, m)
    cand = blocks[torch.arange(r, device=dev)[:, None], chunks].view(r, m * width)
    tail = v - full * width
    if tail:
        cand = torch.cat([cand, z[:, full * width :]], dim=1)
    if canonical:
        offs = torch.arange(width, device=dev)
        ids_c = (chunks[:, :, None] * width + offs).view(r, m * width)
        if tail:
            ids_c = torch.cat([ids_c, torch.arange(full * width, v, device=dev).expand(r, tail)], dim=1)
        pos = torch.topk(_order_keys(cand, ids_c), m, dim=1, sorted=True).indices
        return cand.gather(1, pos), ids_c.gather(1, pos)
    vals, pos = torch.topk(cand, m, dim=1, largest=True, sorted=True)
    inner = pos < m * width
    slot = torch.where(inner, pos, 0)
    ids = chunks.gather(1, slot // width) * width + slot % width
    return vals, torch.where(inner, ids, pos + (full - m) * width)  # tail: full*W + (pos - m*W)


def topk_token_labels(
    logits: torch.Tensor,
    *,
    k: int,
    chunk_size: int = 64,
    to_cpu: bool = True,
    overwrite: bool = False,
    chunk_width: int = TOPK_CHUNK_WIDTH,
) -> dict:
    """Top-k labels of every position: {"ids": (N, k) int64 (descending probability),
    "logprobs": (N, k) float32 (log p over the full vocabulary), "missing_mass": (N,)
    float32 (exact mass of the V - k other ids), "vocab_size": V, "k": k}.

    Over the raw logits z (fp32), per row:
        top, z_(k+1) = the k + 1 largest logits (two-stage top-k, _top_m; ids of equal
                       logits: the lowest ids first, as a stable descending sort)
        rest = logsumexp(z with the top k at -inf)   the other V - k ids (no 1 - Σp
               cancellation), shifted by z_(k+1), the max of those others, so it is
               exactly torch.logsumexp's arithmetic without its max pass
        lse  = logaddexp(rest, logsumexp(top))       the full normaliser, from k + 1 numbers
        logprobs = top - lse,  missing_mass = exp(rest - lse)
    Ties: rows whose k + 1 largest logits hold two equal values next to each other at
    ranks <= k + 1 (the only rows where the choice of ids is not unique) are recomputed
    with the canonical tie-break (value descending, then id ascending), so ids do not
    depend on the device, chunk_size or chunk_width. NaN logits are not supported.
    overwrite=True lets the function use `logits` as scratch when they are fp32 (the
    labelling path, whose logits are dropped next; their values are destroyed) instead of
    a copy of each chunk; a chunk upcast from fp16/bf16 is its own copy already.
    Chunks of 64 rows (12.6 MB at V = 49,152) stay in cache between the passes; the
    results do not depend on chunk_size. `chunk_width` is the two-stage top-k's chunk of
    ids (any >= 1; the results do not depend on it). Results are copied to the CPU chunk
    by chunk (to_cpu=True) or kept on the logits' device.
    """
    x = _rows(logits)
    n, v = x.shape
    if not 1 <= int(k) <= v:
        raise ValueError(f"k must be in 1..{v} (the vocabulary), got {k}")
    if int(chunk_width) < 1:
        raise ValueError(f"chunk_width must be >= 1, got {chunk_width}")
    k, chunk_size, width = int(k), _check_chunk(chunk_size), int(chunk_width)
    m = min(k + 1, v)  # k + 1: the rest's max too
    out_dev = torch.device("cpu") if to_cpu else x.device
    ids = torch.empty((n, k), dtype=torch.int64, device=out_dev)
    logp = torch.empty((n, k), dtype=torch.float32, device=out_dev)
    missing = torch.empty((n,), dtype=torch.float32, device=out_dev)
    with torch.no_grad():
        for a in range(0, n, chunk_size):
            src = x[a : a + chunk_size]
            z = src.float().contiguous()  # (R, V) fp32
            vals, idx = _top_m(z, m, width, canonical=False)  # (R, m) descending
            pairs = min(k, m - 1)
            tied = (vals[:, :pairs] == vals[:, 1 : pairs + 1]).any(dim=1)
            if bool(tied.any()):  # ties: canonical ids
                rows = tied.nonzero().squeeze(1)
                vals[rows], idx[rows] = _top_m(z[rows], m, width, canonical=True)
            top, idx = vals[:, :k], idx[:, :k]
            if k < v:
                shift = vals[:, k : k + 1]
                shift = shift.masked_fill(shift.abs() == float("inf"), 0.0)  # as torch.logsumexp
                if overwrite or z.data_ptr() != src.data_ptr():
                    rest = z.sub_(shift)  # scratch: no copy
                else:
                    rest = z - shift
                rest = rest.scatter_(1, idx, float("-inf")).exp_().sum(dim=1, keepdim=True).log_().add_(shift)
                lse = torch.logaddexp(rest, torch.logsumexp(top, dim=-1, keepdim=True))
                tail = (rest - lse).exp().squeeze(1)
            else:
                lse = torch.logsumexp(top, dim=-1, keepdim=True)
                tail = top.new_zeros(top.shape[0])  # 0 when k == V
            b = a + top.shape[0]
            ids[a:b], logp[a:b], missing[a:b] = idx, top - lse, tail
    return {"ids": ids, "logprobs": logp, "missing_mass": missing, "vocab_size": v, "k": k}


def _block_seed(seed: int, block: int) -> int:
    """A 63-bit seed for RNG block `block` of `seed` (splitmix64 finaliser; fixed forever)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(block) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _collapse(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, s) drawn ids -> unique ids ascending (R, s), counts (R, s) int32 (0 = padding,
    padding ids 0), number of unique ids (R,). Vectorised: sort + run boundaries + scatter."""
    srt = torch.sort(drawn, dim=1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    gid = new.cumsum(dim=1) - 1  # run index per draw
    ids = torch.zeros_like(srt).scatter_(1, gid, srt)  # equal values per run
    counts = torch.zeros(srt.shape, dtype=torch.int32, device=srt.device)
    counts.scatter_add_(1, gid, torch.ones_like(counts))
    return ids, counts, new.sum(dim=1, dtype=torch.int32)


def sampled_token_labels(
    logits: torch.Tensor,
    *,
    draws: int,
    seed: int = 0,
    row_offset: int = 0,
    rng_block: int = 128,
    chunk_size: int = 1024,
    to_cpu: bool = True,
) -> dict:
    """Random-sampling labels: `draws` samples per position with replacement from
    softmax(logits) (fp32), collapsed to unique ids with counts.

    Returns {"ids": (N, u_max) int64 ascending per row, "counts": (N, u_max) int32 (0 =
    padding, with id 0), "num_unique": (N,) int32, "draws", "seed", "rng_block",
    "row_offset", "vocab_size"}; u_max is the largest number of unique ids of any row and
    every row's counts sum to `draws`. Draws are reproducible as the module docstring says:
    independent of chunk_size; row_offset (the absolute index of the first row) must be a
    multiple of rng_block so that blocks are defined by absolute rows.
    """
    x = _rows(logits)
    n, v = x.shape
    draws, rng_block, chunk_size = int(draws), int(rng_block), _check_chunk(chunk_size)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if rng_block < 1 or row_offset < 0 or row_offset % rng_block:
        raise ValueError(f"row_offset ({row_offset}) must be a non-negative multiple of rng_block ({rng_block})")
    chunk = max(1, chunk_size // rng_block) * rng_block  # whole RNG blocks per chunk
    out_dev = torch.device("cpu") if to_cpu else x.device
    ids = torch.zeros((n, draws), dtype=torch.int64, device=out_dev)
    counts = torch.zeros((n, draws), dtype=torch.int32, device=out_dev)
    uniq = torch.zeros((n,), dtype=torch.int32, device=out_dev)
    gen = torch.Generator(device=x.device)
    with torch.no_grad():
        for a in range(0, n, chunk):
            p = torch.softmax(x[a : a + chunk].float(), dim=-1)  # (R, V) fp32
            drawn = torch.empty((p.shape[0], draws), dtype=torch.int64, device=x.device)
            for s in range(0, p.shape[0], rng_block):
                gen.manual_seed(_block_seed(seed, (row_offset + a + s) // rng_block))
                drawn[s : s + rng_block] = torch.multinomial(
                    p[s : s + rng_block], draws, replacement=True, generator=gen
                )
            i, c, u = _collapse(drawn)
            b = a + p.shape[0]
            ids[a:b], counts[a:b], uniq[a:b] = i, c, u
    u_max = int(uniq.max()) if n else 0
    return {
        "ids": ids[:, :u_max].contiguous(),
        "counts": counts[:, :u_max].contiguous(),
        "num_unique": uniq,
        "draws": draws,
        "seed": int(seed),
        "rng_block": rng_block,
        "row_offset": int(row_offset),
        "vocab_size": v,
    }


LOGPROB_STEP = 1.0 / 16  # the uint8 log-prob code's step (storage/token_packing.py LOGPROB_STEP)


def quantize_labels(labels: dict, value_dtype: str, *, step: float = LOGPROB_STEP) -> dict:
    """A copy of top-k labels with logprobs and missing_mass rounded through `value_dtype`
    and back to float32: what a reader of values stored that way sees. "float16" |
    "bfloat16" | "float32": a cast; "uint8": log-prob codes round(-x / step) clipped to
    0..255 (read back as -code * step), of the log-probs and of log(missing_mass) (the
    same formula as storage/token_packing.py logprob_codes)."""
    out = dict(labels)
    if value_dtype == "uint8":

        def code(lp):
            return -(torch.round(-lp.double() / step).clamp(0, 255) * step).float()

        out["logprobs"] = code(labels["logprobs"])
        out["missing_mass"] = code(torch.log(labels["missing_mass"].double())).exp()
        return out
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[value_dtype]
    out["logprobs"] = labels["logprobs"].to(dt).float()
    out["missing_mass"] = labels["missing_mass"].to(dt).float()
    return out


def reconstruction_kl(
    logits: torch.Tensor,
    labels: dict,
    kind: str,
    *,
    tail: str = "uniform",
    smoothing: float = 0.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """KL(r || p) = sum_j r_j (log r_j - log p_j) per position, (N,) float32 on the CPU,
    where p = softmax(logits) (fp32) and r is the distribution rebuilt from the labels:

    kind="topk": r_i = exp(logprobs_i) on the k kept ids, and the tail
        tail="uniform": the missing mass m spread evenly, r_j = m / (V - k), on the V - k
                        others (the max-entropy use of the one stored number);
        tail="drop":    nothing outside the kept ids (r = renormalised top-k; for exact
                        values KL = -log(1 - m), the least KL of any r on the kept ids).
      r is renormalised to sum 1 (it already does, up to rounding of stored values).
      k = V gives 0. Logits of -inf (masked ids) make the uniform tail's KL infinite.
    kind="sampled": r_j = counts_j / draws on the drawn ids, 0 elsewhere. Finite without
      smoothing, since r's support lies inside p's; smoothing=eps mixes in the uniform
      distribution, r = (1 - eps) r + eps / V (dense, (chunk, V) per chunk).
    """
    if kind not in ("topk", "sampled"):
        raise ValueError(f"kind must be 'topk' or 'sampled', got {kind!r}")
    if tail not in ("uniform", "drop"):
        raise ValueError(f"tail must be 'uniform' or 'drop', got {tail!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    x = _rows(logits)
    n, v = x.shape
    chunk_size = _check_chunk(chunk_size)
    ids_all = torch.as_tensor(labels["ids"])
    if ids_all.shape[0] != n:
        raise ValueError(f"labels have {ids_all.shape[0]} rows, logits {n}")
    out = torch.empty((n,), dtype=torch.float32)
    with torch.no_grad():
        for a in range(0, n, chunk_size):
            lp = torch.log_softmax(x[a : a + chunk_size].float(), dim=-1)  # (R, V) teacher log p
            b = a + lp.shape[0]
            ids = ids_all[a:b].to(lp.device, torch.int64)
            lp_at = lp.gather(1, ids)
            if kind == "topk":
                q = torch.as_tensor(labels["logprobs"][a:b]).to(lp.device, torch.float32).exp()
                m = torch.as_tensor(labels["missing_mass"][a:b]).to(lp.device, torch.float32).clamp_min(0.0)
                others = v - ids.shape[1]
                if tail == "drop" or others == 0:
                    m = torch.zeros_like(m)
                z = q.sum(dim=1) + m
                r, m = q / z[:, None], m / z
                kl = (torch.xlogy(r, r) - r * lp_at).sum(dim=1)
                if others:
                    sum_others = lp.sum(dim=1, dtype=torch.float64) - lp_at.sum(dim=1, dtype=torch.float64)
                    tail_kl = torch.xlogy(m, m / others) - (m / others) * sum_others.float()
                    kl = kl + torch.where(m > 0, tail_kl, torch.zeros_like(tail_kl))
            else:
                c = torch.as_tensor(labels["counts"][a:b]).to(lp.device, torch.float32)
                r = c / c.sum(dim=1, keepdim=True)
                if smoothing:
                    full = torch.full_like(lp, smoothing / v).scatter_add_(1, ids, (1.0 - smoothing) * r)
                    kl = (torch.xlogy(full, full) - full * lp).sum(dim=1)
                else:
                    kl = (torch.xlogy(r, r) - torch.where(r > 0, r * lp_at, torch.zeros_like(r))).sum(dim=1)
            out[a:b] = kl.float().cpu()
    return out
