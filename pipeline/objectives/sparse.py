"""KD losses over sparse teacher summaries (top-k, sampled): pure PyTorch, fp32 math.

Per row (a classifier's sample, or a language model's (sequence, position)) only a sparse
summary of the teacher's distribution p over the C classes (V tokens) is kept, at the
stored temperature (1 for token labels):

* top-k: ``ids`` (N, k) and ``logp`` (N, k), log-probabilities normalised over the FULL
  vocabulary, so the missing mass p_tail = 1 − Σ_i exp(logp_i) is exact: one tail bucket;
* sampled (Anshumann et al., ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge
  Distillation in LLMs"): ``ids`` (N, s) drawn with replacement from p, ``counts`` (N, s)
  (0-count slots are padding, their ids ignored), n draws per row; counts/n estimates p.

The student gives ``student_logits`` (N, V). Rows are processed ``chunk_size`` at a time:
the fp32 log-softmax over V exists for one chunk only and no dense (N, V) teacher tensor is
ever built. With autograd on, each chunk runs under activation checkpointing, so backward
recomputes the chunk instead of keeping N·V fp32 intermediates alive (one extra forward of
the loss); the student's own gradient is (N, V) in its dtype. Per-row ``weights`` (N,) give
Σ w·l / Σ w (all-zero weights give 0). Labels are stored at T = 1: see ``topk_tail_kl``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.objectives.checks import check_int, check_temperature, normalized_weights, shape_of
from pipeline.objectives.sparse_ce import SparseTargetCE, per_row_fused

__all__ = ["topk_tail_kl", "sampled_kl", "next_token_ce", "reverse_kl_topk", "jsd_topk"]

DEFAULT_CHUNK = 512  # rows per chunk: 512 × 49,152 fp32 ≈ 100 MB per (chunk, V) intermediate
_LOG_EPS = math.log(torch.finfo(torch.float32).eps)  # resolution of 1 − Σp in fp32
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------- checks


def _check_student(x: Tensor) -> tuple[int, int]:
    if x.ndim != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"student_logits must be a floating (N, V) tensor, got {x.dtype} {shape_of(x)}")
    return x.shape[0], x.shape[1]


def _check_ids(name: str, ids: Tensor, n: int, v: int, valid: Tensor | None = None) -> None:
    """ids (n, k) integer in [0, v); only the slots where ``valid`` is True are checked."""
    check_int(name, ids)
    if ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"{name} must be (N, k) with N={n} (student_logits rows), got {shape_of(ids)}")
    ids = ids if ids.dtype in (torch.int64, torch.int32) else ids.long()  # uint16/uint8: no min/max kernels
    chk = ids if valid is None else torch.where(valid, ids, 0)
    if chk.numel() and (chk.min().item() < 0 or chk.max().item() >= v):
        raise ValueError(f"{name} must lie in [0, V={v}), got min {chk.min().item()}, max {chk.max().item()}")


def _check_distinct(name: str, ids: Tensor, valid: Tensor | None = None) -> None:
    x = (
        ids.long()
        if valid is None
        else torch.where(valid, ids.long(), -1 - torch.arange(ids.shape[1], device=ids.device))
    )
    x = x.sort(-1).values
    if x.shape[1] > 1 and (x[:, 1:] == x[:, :-1]).any().item():
        raise ValueError(f"{name} must hold distinct ids within each row")


QUANTIZED_SLACK = 0.07  # stored uint8 codes round each log-prob by up to 1/32: Σ exp can reach e^(1/32) ≈ 1.032


def _check_logp(ids: Tensor, logp: Tensor, missing: Tensor | None = None) -> None:
    if logp.shape != ids.shape or not logp.dtype.is_floating_point:
        raise ValueError(
            f"logp must be floating with the shape of ids {shape_of(ids)}, got {logp.dtype} {shape_of(logp)}"
        )
    lp = logp.float()
    if torch.isnan(lp).any().item() or (lp > 1e-4).any().item():
        raise ValueError(f"logp must be log-probabilities (<= 0, no nan), got max {lp.max().item():.4g}")
    mass = lp.exp().sum(-1).max().item() if lp.numel() else 0.0
    if missing is None and mass > 1 + 1e-3:
        raise ValueError(f"exp(logp) must sum to <= 1 per row (normalised over the full vocabulary), got {mass:.6g}")
    if missing is not None:
        if missing.shape != ids.shape[:1] or not missing.dtype.is_floating_point:
            raise ValueError(
                f"missing_mass must be floating (N,) = ({ids.shape[0]},), got {missing.dtype} {shape_of(missing)}"
            )
        m = missing.float()
        if torch.isnan(m).any().item() or (m < 0).any().item() or (m > 1 + 1e-3).any().item():
            raise ValueError("missing_mass must lie in [0, 1] (the teacher's probability outside the kept ids)")
        if mass > 1 + QUANTIZED_SLACK:
            raise ValueError(
                f"exp(logp) sums to {mass:.6g} in some row: more than stored log-probs can round to "
                f"(<= 1 + {QUANTIZED_SLACK})"
            )


# ----------------------------------------------------------------------------- chunking


def _per_row(fn, logits: Tensor, *row_tensors: Tensor, chunk_size: int) -> Tensor:
    """fn(logit_chunk, *tensor_chunks) -> (c,) for each chunk of rows, concatenated: (N,).

    split (not slicing) so backward concatenates the chunks' gradients once; checkpoint so
    only the chunk's inputs are kept for backward.
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    grad = torch.is_grad_enabled() and logits.requires_grad
    out, start = [], 0
    for z in logits.split(chunk_size):
        args = [t[start : start + z.shape[0]] for t in row_tensors]
        start += z.shape[0]
        out.append(checkpoint(fn, z, *args, use_reentrant=False, preserve_rng_state=False) if grad else fn(z, *args))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def _mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """(N,) -> scalar: mean, or Σ w·l / Σ w (0 for N = 0 or all-zero weights)."""
    if weights is None:
        return per_row.sum() / max(per_row.shape[0], 1)
    return per_row @ normalized_weights(weights, per_row.shape[0], per_row)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a (log a − log b) per row, 0·log 0 = 0 (log a replaced where a = 0: no nan)."""
    a = log_a.exp()
    log_a = torch.where(a > 0, log_a, torch.zeros_like(log_a))
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


# ----------------------------------------------------------------------------- fused CE helpers


def _neg_entropy(log_p: Tensor) -> Tensor:
    p = log_p.exp()
    return torch.where(p > 0, p * torch.where(p > 0, log_p, 0.0), 0.0).sum(-1)


def _teacher_buckets(logp: Tensor, tau: float, missing: Tensor | None, has_tail: bool) -> Tensor:
    """log p over the k kept ids (+ the tail bucket when k < V), tempered by tau = T/T' (stored
    over student temperature) and renormalised: (R, k[+1])."""
    log_p = logp.float()
    if has_tail:
        p_tail = (
            missing.float()[:, None]
            if missing is not None
            else (-torch.expm1(torch.logsumexp(log_p, -1, keepdim=True))).clamp_min(0.0)
        )
        log_p = torch.cat([log_p, p_tail.log()], 1)
    log_p = log_p * tau
    return log_p - torch.logsumexp(log_p, -1, keepdim=True)


def _forward_kl_fused(z, ids, logp, missing=None, *, temperature, stored_temperature=1.0, y=None):
    """T'² · KL(p ‖ q) over the k+1 buckets of ``_buckets``, with the fused CE: equal to
    ``_forward_kl`` (tests/test_lm_losses.py checks values and gradients). With next-token
    targets y (R,) (T' = 1 only: the same softmax): (R, 2) = [the KL, −log q_y], from one
    pass over the logits."""
    s = z.float() if temperature == 1.0 else z.float() * (1.0 / temperature)
    ids = ids.long()
    has_tail = ids.shape[1] < s.shape[1]
    log_p = _teacher_buckets(logp, stored_temperature / temperature, missing, has_tail)
    p = log_p.exp()
    w, w_t = (p[:, :-1], p[:, -1]) if has_tail else (p, None)
    if y is None:
        return temperature**2 * (_neg_entropy(log_p) + SparseTargetCE.apply(s, ids, w.contiguous(), w_t))
    both = SparseTargetCE.apply(s, ids, w.contiguous(), w_t, y.long())  # (R, 2)
    return torch.stack([_neg_entropy(log_p) + both[:, 0], both[:, 1]], 1)


# ----------------------------------------------------------------------------- top-k buckets


def _buckets(
    z: Tensor,
    ids: Tensor,
    logp: Tensor,
    temperature: float,
    missing: Tensor | None = None,
    stored_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(log p, log q) over the k kept tokens + one tail bucket (none when k = V): (c, k+1).

    Teacher: a = (logp_1..k, log p_tail) · T/T' (T the stored temperature), p_tail = the stored missing mass when given
    (exact, and what makes quantised log-probs consistent: the k+1 buckets are
    renormalised), else 1 − Σ exp(logp); log p = a − lse(a).
    Student: log q = log_softmax(z / T') merged into the same buckets, the tail as the
    logsumexp of the student's scaled logits with the kept ids masked to −inf.
    """
    s = z.float() * (1.0 / temperature)
    ids = ids.long()
    lse = torch.logsumexp(s, -1, keepdim=True)
    log_q = s.gather(1, ids) - lse
    log_p = logp.float()
    if ids.shape[1] < s.shape[1]:
        tail = torch.logsumexp(s.scatter(1, ids, -math.inf), -1, keepdim=True) - lse
        p_tail = (
            missing.float()[:, None]
            if missing is not None
            else (-torch.expm1(torch.logsumexp(log_p, -1, keepdim=True))).clamp_min(0.0)
        )
        log_q, log_p = torch.cat([log_q, tail], 1), torch.cat([log_p, p_tail.log()], 1)
    log_p = log_p * (stored_temperature / temperature)
    return log_p - torch.logsumexp(log_p, -1, keepdim=True), log_q


def _forward_kl(z, ids, logp, missing=None, *, temperature, stored_temperature=1.0):
    # the formula through plain autograd: the reference the fused path (_forward_kl_fused,
    # which topk_tail_kl runs) is tested against
    log_p, log_q = _buckets(z, ids, logp, temperature, missing, stored_temperature)
    return temperature**2 * _kl(log_p, log_q)


def _reverse_kl(z, ids, logp, missing=None, *, temperature, stored_temperature=1.0):
    log_p, log_q = _buckets(z, ids, logp, temperature, missing, stored_temperature)
    floor = torch.full((log_p.shape[1],), _LOG_TINY, device=log_p.device)
    if ids.shape[1] < z.shape[1]:
        floor[-1] = _LOG_EPS  # a tail under fp32's resolution of 1 − Σp is rounding, not 0
    return temperature**2 * _kl(log_q, torch.maximum(log_p, floor))


def _jsd(z, ids, logp, missing=None, *, temperature, beta, stored_temperature=1.0):
    log_p, log_q = _buckets(z, ids, logp, temperature, missing, stored_temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    return temperature**2 * (beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m))


def _check_targets(targets: Tensor, n: int, v: int, temperature: float = 1.0) -> None:
    check_int("targets", targets)
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},) (student_logits rows), got {shape_of(targets)}")
    if targets.numel() and (targets.min().item() < 0 or targets.max().item() >= v):
        raise ValueError(f"targets must lie in [0, V={v})")
    if temperature != 1.0:
        raise ValueError("the KD loss shares its softmax with the next-token CE only at T' = 1")


def _both(per_row: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(N, 2) [KD, CE] rows -> (KD, CE) weighted means."""
    return _mean(per_row[:, 0], weights), _mean(per_row[:, 1], weights)


def _topk(
    fn,
    student_logits,
    ids,
    logp,
    temperature,
    weights,
    chunk_size,
    missing=None,
    stored_temperature: float = 1.0,
    targets: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    n, v = _check_student(student_logits)
    if ids.ndim == 2 and ids.shape[1] > v:
        raise ValueError(f"ids has k={ids.shape[1]} > V={v} (student_logits {(n, v)})")
    _check_ids("ids", ids, n, v)
    _check_distinct("ids", ids)
    _check_logp(ids, logp, missing)
    check_temperature(temperature)
    check_temperature(stored_temperature)
    rows = (ids, logp) if missing is None else (ids, logp, missing)
    run = per_row_fused if fn is _forward_kl_fused else _per_row
    f = partial(fn, temperature=float(temperature), stored_temperature=float(stored_temperature))
    if targets is not None:  # the fused forward KL and next-token CE, one pass (_forward_kl_fused)
        if fn is not _forward_kl_fused:
            raise ValueError("only the forward top-k KL computes the next-token CE in the same pass")
        _check_targets(targets, n, v, temperature)
        g = f
        f = lambda z, *a: g(z, *a[:-1], y=a[-1])  # noqa: E731  (y: the last row tensor)
        return _both(run(f, student_logits, *rows, targets, chunk_size=chunk_size), weights)
    return _mean(run(f, student_logits, *rows, chunk_size=chunk_size), weights)


def topk_tail_kl(
    student_logits: Tensor,
    ids: Tensor,
    logp: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    missing_mass: Tensor | None = None,
    stored_temperature: float = 1.0,
    targets: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Forward KL over k+1 buckets (scalar, mean over rows).

    loss = T'² · Σ_b p_b (log p_b − log q_b),  b ∈ {kept ids} ∪ {tail}

    Hinton et al. 2015 (KD); top-k plus a tail bucket as in sparse logit KD (Anshumann et al.
    2025). Buckets: p_tail = 1 − Σ exp(logp); q_tail = Σ_{v ∉ ids} q_v as a logsumexp of the
    student's logits with the kept ids masked to −inf (no 1 − Σq cancellation). Exact at the
    stored temperature T' = T (1 for token labels; a classifier's label.temperature), where
    merging classes can only lower a KL (data processing): 0 ≤ loss ≤ dense KL, equal at k = V.
    Convention at T' ≠ T: the kept log-probs are tempered exactly relative to each other
    (logp·T/T'), the tail as ONE class of mass p_tail (p_tail^(T/T')), and the k+1 buckets
    renormalised; the student is softmax(z/T') merged into the same buckets; times T'². That
    tail is an approximation: its shape is not stored (a tail of many small tokens gains more
    mass at T' > T than one token would). That is why token labels are stored at T = 1: a
    top-32 cut of SmolLM2 misses 16% of the mass at T = 1 but 78% at T = 2.

    Shapes: student_logits (N, V); ids (N, k) distinct per row, any int dtype, k <= V; logp
    (N, k) teacher log-probs at the stored temperature, normalised over the full V
    (a classifier's stored top-k: topk_logits − logsumexp); weights (N,); missing_mass
    (N,) the stored exact tail (then the k+1 buckets are renormalised, so log-probs stored
    rounded, e.g. as uint8 codes, stay a distribution; without it p_tail = 1 − Σ exp(logp)).
    targets (N,) next tokens, at T' = 1: returns (this loss, next_token_ce(student_logits,
    targets)) from one pass over the logits (the α mix of the objective costs no second pass).
    """
    return _topk(
        _forward_kl_fused,
        student_logits,
        ids,
        logp,
        temperature,
        weights,
        chunk_size,
        missing_mass,
        stored_temperature,
        targets,
    )


def reverse_kl_topk(
    student_logits: Tensor,
    ids: Tensor,
    logp: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    missing_mass: Tensor | None = None,
    stored_temperature: float = 1.0,
) -> Tensor:
    """Reverse (mode-seeking) KL over the k+1 buckets of ``topk_tail_kl`` (scalar, mean).

    loss = T'² · Σ_b q_b (log q_b − log p_b)

    Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models". Buckets,
    shapes and the T' convention as in ``topk_tail_kl``. The teacher's bucket log-probs are
    floored (the tail at fp32 eps, the resolution of 1 − Σp; kept ids at the smallest normal
    float) so an empty teacher tail gives a large finite loss, not inf.
    """
    return _topk(
        _reverse_kl, student_logits, ids, logp, temperature, weights, chunk_size, missing_mass, stored_temperature
    )


def jsd_topk(
    student_logits: Tensor,
    ids: Tensor,
    logp: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    missing_mass: Tensor | None = None,
    stored_temperature: float = 1.0,
) -> Tensor:
    """Generalised Jensen-Shannon divergence over the k+1 buckets (scalar, mean over rows).

    m = β p + (1 − β) q,  loss = T'² · (β · KL(p ‖ m) + (1 − β) · KL(q ‖ m)),  0 < β < 1

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD). Buckets, shapes and the T' convention as in
    ``topk_tail_kl``. Bounded by T'² · log 2 at β = 0.5, and symmetric in p, q there. The
    value vanishes as β → 0 or 1, so those are refused: use the (reverse) KL instead.
    """
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    return _topk(
        partial(_jsd, beta=float(beta)),
        student_logits,
        ids,
        logp,
        temperature,
        weights,
        chunk_size,
        missing_mass,
        stored_temperature,
    )


# ----------------------------------------------------------------------------- sampled KD


def _sampled_ce_fused(z: Tensor, ids: Tensor, frac: Tensor, y: Tensor | None = None) -> Tensor:
    """−Σ_j f_j log q(x_j) with the fused CE. Padding slots (id 0, f 0) may repeat id 0
    beside a real draw of it: the backward adds per slot (scatter_add), so that is exact.
    With next-token targets y: (R, 2) = [that, −log q_y], one pass."""
    return SparseTargetCE.apply(z.float(), ids, frac, None, None if y is None else y.long())


def sampled_kl(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    *,
    num_draws: int | Tensor | None = None,
    baseline: str | Tensor | None = None,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    targets: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Random-sampling KD: unbiased estimate of the cross-entropy CE(p, q) (scalar, mean).

    per row: −Σ_j (c_j / n) · log q(x_j),  q = softmax(z),  n = Σ_j c_j unless ``num_draws``

    Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in
    LLMs". E[c_j / n] = p(x_j), so the value is unbiased for CE(p, q) = KL(p ‖ q) + H(p) and its
    gradient, (q − c/n) per row, is unbiased for the KL's gradient q − p. H(p) is not known
    from samples, so ``baseline`` only moves the reported value (gradient unchanged):
    None (CE estimate); a (N,) tensor of stored teacher entropies H(p) (unbiased KL estimate);
    "empirical" (subtracts the plug-in entropy of counts/n, giving KL(counts/n ‖ q) >= 0:
    biased, as the plug-in entropy underestimates H(p); needs distinct ids per row).
    Temperature 1 only: draws from p say nothing unbiased about softmax(log p / T').

    Shapes: ids (N, s) any int dtype, counts (N, s) >= 0 (0-count slots are padding, their
    ids ignored), num_draws an int or (N,) >= Σ counts (n > 0 on every row), weights (N,).
    targets (N,) next tokens: returns (this loss, next_token_ce(student_logits, targets))
    from one pass over the logits.
    """
    n_rows, v = _check_student(student_logits)
    if counts.shape != ids.shape or counts.dtype == torch.bool:
        raise ValueError(
            f"counts must be numeric with the shape of ids {shape_of(ids)}, got {counts.dtype} {shape_of(counts)}"
        )
    c = counts.float()
    if torch.isnan(c).any().item() or (c < 0).any().item():
        raise ValueError("counts must be >= 0 (no nan)")
    _check_ids("ids", ids, n_rows, v, valid=c > 0)
    empirical = isinstance(baseline, str) and baseline == "empirical"
    if not (baseline is None or empirical or isinstance(baseline, Tensor)):
        raise ValueError(f"baseline must be None, 'empirical' or a (N,) tensor, got {baseline!r}")
    if isinstance(baseline, Tensor) and baseline.shape != (n_rows,):
        raise ValueError(f"baseline must be (N,) = ({n_rows},) teacher entropies, got {shape_of(baseline)}")
    if empirical:
        _check_distinct("ids", ids, valid=c > 0)
    total = c.sum(-1)
    n = total if num_draws is None else torch.as_tensor(num_draws, dtype=torch.float32, device=c.device)
    n = n.expand(n_rows) if n.ndim == 0 else n
    if n.shape != (n_rows,):
        raise ValueError(f"num_draws must be an int or ({n_rows},), got {shape_of(n)}")
    if n_rows and ((n <= 0).any().item() or (total > n * (1 + 1e-6)).any().item()):
        raise ValueError("every row needs n > 0 draws and sum(counts) <= num_draws (drop rows with no draws)")
    frac = c / n[:, None]
    safe_ids = torch.where(c > 0, ids.long(), 0)
    ce = None
    if targets is not None:
        _check_targets(targets, n_rows, v)
        both = per_row_fused(_sampled_ce_fused, student_logits, safe_ids, frac, targets, chunk_size=chunk_size)
        per_row, ce = both[:, 0], _mean(both[:, 1], weights)
    else:
        per_row = per_row_fused(_sampled_ce_fused, student_logits, safe_ids, frac, chunk_size=chunk_size)
    if empirical:  # minus the plug-in entropy: Σ f log f over the draws' frequencies
        per_row = per_row + torch.where(frac > 0, frac * frac.clamp_min(1e-30).log(), 0.0).sum(-1)
    elif baseline is not None:
        per_row = per_row - baseline.float()
    return _mean(per_row, weights) if ce is None else (_mean(per_row, weights), ce)


# ----------------------------------------------------------------------------- task CE


def _ce_rows(z: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """−log q[y] per row with the fused CE (one target of weight 1; ignored rows weight 0)."""
    keep = targets != ignore_index
    ids = torch.where(keep, targets, 0)[:, None]
    return SparseTargetCE.apply(z.float(), ids, keep.float()[:, None], None)


def next_token_ce(
    student_logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Next-token cross-entropy on the data (the α term; scalar, mean over counted rows).

    per row: −log softmax(z)[y],  mean over rows with y ≠ ``ignore_index``: Σ w·l / Σ w
    (0 when no row counts). Shapes: student_logits (N, V), targets (N,) int, weights (N,).
    """
    n, v = _check_student(student_logits)
    check_int("targets", targets)
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},) (student_logits rows), got {shape_of(targets)}")
    keep = targets != ignore_index
    t = targets[keep]
    if t.numel() and (t.min().item() < 0 or t.max().item() >= v):
        raise ValueError(f"targets must lie in [0, V={v}) or equal ignore_index={ignore_index}")
    per_row = per_row_fused(
        partial(_ce_rows, ignore_index=ignore_index), student_logits, targets.long(), chunk_size=chunk_size
    )
    w = keep.float() if weights is None else normalized_weights(weights, n, per_row) * keep
    return per_row @ (w / w.sum().clamp_min(torch.finfo(torch.float32).tiny))
