"""Cross-tokenizer distillation from stored teacher labels: ULD, the GOLD hybrid, ALM, the projected
KL. Pure PyTorch.

Teacher and student tokenize the same text differently. An alignment (computed elsewhere) cuts the
text into chunks: byte ranges where both tokenizations have a boundary at both ends, each holding
>= 1 teacher and >= 1 student token. Per chunk c (a row here): the teacher's stored top-k at the
position predicting the chunk's first teacher token (ids, log-probs at T = 1, missing mass m_T);
the student's logits z at the position predicting its first student token (same bytes conditioned
on); and both models' log-likelihoods of the whole chunk, a_c (teacher) and b_c (student).

* ``uld_loss``: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", arXiv:2402.12030), the
  Wasserstein-1 distance between the sorted probability vectors (no shared vocabulary needed):
      Σ_{i<k} |p_(i) − q_(i)| + |m_T − m_S|,  m_S = 1 − Σ_{i<k} q_(i)
  p_(i) the teacher's k kept probabilities sorted descending, q_(i) the student's k largest
  (zeros past V_S when k > V_S).
* ``hybrid_loss``: the hybrid of TRL's GOLD trainer (Hugging Face, 2025): exact KL on the kept
  teacher ids j whose token has a byte-identical student twin π(j) (the set S), ULD on the rest:
      Σ_{j∈S} p_j (log p_j − log q_π(j)) + Σ_{i<k} |p~_(i) − q~_(i)| + |m_T − m~_S|
  p~ the kept probabilities of ids without a twin (twinned ones set to 0), q~ the student's
  probabilities with the twins of S set to 0, m~_S = 1 − Σ_{j∈S} q_π(j) − Σ_i q~_(i).
* ``alm_loss``: Approximate Likelihood Matching (Minixhofer, Vulić & Ponti 2025, "Universal
  Cross-Tokenizer Distillation via Approximate Likelihood Matching", arXiv:2503.20083): each
  chunk is a Bernoulli event; the binary KL between Bernoulli(e^x) and Bernoulli(e^y):
      f(x, y) = e^x (x − y) + (1 − e^x)(log(1 − e^x) − log(1 − e^y)),  x = a/τ, y = b/τ
  computed in log space (``log1mexp``), x and y clamped to <= −1e-6 (a chunk of probability 1
  would give log 0).
* ``prefix_kl_at``: not per chunk but at every student position: the teacher's top-k given the
  bytes the student has read of the teacher's current token, marginalised onto the student's
  next token (for a byte-level student: the teacher's next-byte distribution), KL; the formula
  and its citations are in its docstring.

Tail convention (ULD, GOLD): the teacher's mass beyond its k kept ids is ONE bucket m_T (the stored exact
missing mass, else 1 − Σ exp(logp), floored at 0), compared with the student's mass outside its
own compared entries. All four losses are defined at the stored temperature 1: no student temperature T'
and no rescale (a top-k summary is exact only where it was made); ALM's τ is its own knob, applied
to both chunk log-likelihoods.

Every loss computes in fp32 whatever the input dtype (float64 stays float64, for gradcheck) and
returns a 0-dim tensor: Σ_c w_c l_c / Σ_c w_c over the rows with w_c > 0 (all-zero weights give 0).
The forms taking logits z (``uld_loss``, ``hybrid_loss``) process rows ``chunk_size`` at a time, under
activation checkpointing when autograd is on and there is more than one block, so at most
chunk_size × V_S compute-dtype temporaries exist at once, in forward and in backward; the ``*_at``
forms read rows of log-probs the caller already has (the objective's, shared with its CE term) and
keep (rows, O(k)) temporaries.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.objectives.checks import check_int, shape_of

__all__ = ["uld_loss", "hybrid_loss", "alm_loss", "log1mexp", "uld_at", "hybrid_at", "prefix_kl_at"]

DEFAULT_CHUNK = 4096
_LN2 = math.log(2.0)
_ALM_MAX = -1e-6  # x, y clamp: log(1 − e^0) = −inf


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x <= 0, stable (Mächler 2012): log(−expm1(x)) if x > −ln 2 else log1p(−e^x).

    Each branch sees a safe input, so the branch not taken never puts nan into the gradient.
    """
    near = x > -_LN2
    a = torch.where(near, x, torch.full_like(x, -_LN2))  # near 0: expm1 keeps the digits
    b = torch.where(near, torch.full_like(x, -_LN2), x)  # far from 0: e^x small, log1p exact
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


# ----------------------------------------------------------------------------- helpers


def _dtype(*xs: Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64 (never downcast)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_floating(name: str, x: Tensor, shape: tuple[int, ...] | None = None, ndim: int | None = None) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {shape_of(x)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {shape_of(x)}")


def _check_topk(z: Tensor, t_logp: Tensor, t_missing: Tensor | None, weights: Tensor, chunk_size: int) -> None:
    _check_floating("z", z, ndim=2)
    c = z.shape[0]
    _check_floating("t_logp", t_logp, ndim=2)
    if t_logp.shape[0] != c or t_logp.shape[1] < 1:
        raise ValueError(f"t_logp must be (C, k) with C={c} (z {shape_of(z)}) and k >= 1, got {shape_of(t_logp)}")
    if t_missing is not None:
        _check_floating("t_missing", t_missing, shape=(c,))
    _check_floating("weights", weights, shape=(c,))
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _weighted_mean(per_row: Tensor, weights: Tensor) -> Tensor:
    """(C,) -> 0-dim: Σ w l / Σ w over rows with w > 0 (a 0-weight row's value, even nan, never enters)."""
    w = weights.to(per_row.dtype)
    if torch.isnan(w).any().item() or (w < 0).any().item():
        raise ValueError("weights must be >= 0 (no nan)")
    keep = w > 0
    total = torch.where(keep, per_row * w, torch.zeros_like(per_row)).sum()
    return total / w.sum().clamp_min(torch.finfo(w.dtype).tiny)  # all-zero weights: 0, not nan


def _rows(fn, z: Tensor, *rows: Tensor, chunk_size: int) -> Tensor:
    """fn(z block, *row blocks) -> (c,) per block of ``chunk_size`` rows, concatenated: (C,)."""
    # checkpointing frees each block's (c, V) temporaries until backward recomputes them:
    # worth a second forward only when there is more than one block
    grad = torch.is_grad_enabled() and z.requires_grad and z.shape[0] > chunk_size
    out = []
    for s in range(0, z.shape[0], chunk_size):
        args = [z[s : s + chunk_size]] + [r[s : s + chunk_size] for r in rows]
        out.append(checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False) if grad else fn(*args))
    return torch.cat(out) if out else z.new_zeros(0, dtype=_dtype(z))


def _teacher(t_logp: Tensor, t_missing: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """p (c, k) and m_T (c,): the stored missing mass, else 1 − Σ p floored at 0."""
    p = t_logp.to(dtype).exp()
    m = (1.0 - p.sum(-1)).clamp_min(0.0) if t_missing is None else t_missing.to(dtype)
    return p, m


def _top_log(log_q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(c, V) log-probs -> the k largest probabilities per row, descending, zero-padded past V
    (c, k), and their ids (c, min(k, V)). Top-k of log q is top-k of q: only k values are
    exponentiated, no (c, V) softmax copy."""
    top = log_q.topk(min(k, log_q.shape[1]), dim=-1)
    return F.pad(top.values.exp(), (0, k - top.values.shape[1])), top.indices


def _sorted_l1(p: Tensor, q: Tensor, m_t: Tensor, m_s: Tensor) -> Tensor:
    """Σ_i |p_(i) − q_(i)| + |m_T − m_S| per row; p (c, k) unsorted, q (c, k) already descending."""
    p_sorted = p.sort(-1, descending=True).values
    return (p_sorted - q).abs().sum(-1) + (m_t - m_s).abs()


def _log_q(z: Tensor, log_probs: bool) -> Tensor:
    dt = _dtype(z)
    return z.to(dt) if log_probs else F.log_softmax(z.to(dt), -1)


# ----------------------------------------------------------------------------- ULD


def _uld_rows(z: Tensor, t_logp: Tensor, t_missing: Tensor | None = None, *, log_probs: bool = False) -> Tensor:
    log_q = _log_q(z, log_probs)  # (c, V_S)
    p, m_t = _teacher(t_logp, t_missing, log_q.dtype)  # (c, k), (c,)
    q_top, _ = _top_log(log_q, p.shape[1])  # (c, k) descending
    return _sorted_l1(p, q_top, m_t, 1.0 - q_top.sum(-1))


def uld_loss(
    z: Tensor,
    t_logp: Tensor,
    t_missing: Tensor | None = None,
    *,
    weights: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    log_probs: bool = False,
) -> Tensor:
    """Universal Logit Distillation over the stored top-k + one tail bucket (0-dim, weighted mean).

    per row: Σ_{i<k} |p_(i) − q_(i)| + |m_T − m_S|,  m_S = 1 − Σ_{i<k} q_(i)

    Boizard et al. 2024, arXiv:2402.12030: the Wasserstein-1 distance between sorted probability
    vectors, so no shared vocabulary is needed. p_(i) the teacher's k kept probabilities sorted
    descending; q_(i) the k largest of softmax(z) sorted descending (zeros past V_S when k > V_S).

    Shapes: z (C, V_S) student logits; t_logp (C, k) teacher log-probs at T = 1, any order;
    t_missing (C,) the teacher's exact mass outside the k ids, or None (1 − Σ exp(t_logp)); weights (C,).
    log_probs=True: z already holds log_softmax rows (the objective shares them with its CE term).
    """
    _check_topk(z, t_logp, t_missing, weights, chunk_size)
    rows = (t_logp,) if t_missing is None else (t_logp, t_missing)
    fn = partial(_uld_rows, log_probs=log_probs)
    return _weighted_mean(_rows(fn, z, *rows, chunk_size=chunk_size), weights)


# ----------------------------------------------------------------------------- GOLD hybrid


def _hybrid_rows(
    z: Tensor, t_ids: Tensor, t_logp: Tensor, t_missing: Tensor | None = None, *, twin: Tensor, log_probs: bool = False
) -> Tensor:
    log_q = _log_q(z, log_probs)  # (c, V_S)
    tw = twin[t_ids.long()]  # (c, k) student twin of each kept id, or -1
    q2, i2 = _top_log(log_q, 2 * t_logp.shape[1])  # (c, 2k) the 2k largest q, their ids
    return _hybrid_terms(log_q.gather(1, tw.clamp_min(0)), q2, i2, tw, t_logp, t_missing)


def _hybrid_terms(
    log_q_tw: Tensor, q2: Tensor, i2: Tensor, tw: Tensor, t_logp: Tensor, t_missing: Tensor | None
) -> Tensor:
    """The hybrid per row from what it needs of the student: log q at the twins (c, k) (any
    value where tw < 0) and q's 2k largest probabilities and ids (c, 2k)."""
    dt, k = log_q_tw.dtype, t_logp.shape[1]
    p, m_t = _teacher(t_logp, t_missing, dt)  # (c, k), (c,)
    log_p = t_logp.to(dt)  # (c, k)
    has = tw >= 0  # (c, k): j ∈ S
    # exact KL on S; 0·log 0 = 0 and nothing off S enters (no nan from −inf log-probs)
    on = has & (p > 0)
    kl = torch.where(on, p * (torch.where(on, log_p, 0.0) - log_q_tw), 0.0).sum(-1)  # (c,)
    q_s = torch.where(has, log_q_tw.exp(), 0.0).sum(-1)  # (c,) Σ_{j∈S} q_π(j)
    # q~'s k largest: S has at most k twins, so they are the 2k largest of q less the twins
    # of S (exact, without a (c, V) copy): drop those (−1 sorts them last), keep k
    hit = (i2[:, :, None] == torch.where(has, tw, -1)[:, None, :]).any(-1)  # (c, min(2k, V))
    hit = F.pad(hit, (0, q2.shape[1] - hit.shape[1]))
    q_top = torch.where(hit, -1.0, q2).topk(k, dim=-1).values.clamp_min(0.0)  # (c, k) descending
    p_rest = torch.where(has, 0.0, p)  # (c, k) p~
    return kl + _sorted_l1(p_rest, q_top, m_t, 1.0 - q_s - q_top.sum(-1))


def hybrid_at(
    log_q: Tensor,
    rows: Tensor,
    t_ids: Tensor,
    t_logp: Tensor,
    t_missing: Tensor | None,
    *,
    twin: Tensor,
    weights: Tensor,
) -> Tensor:
    """hybrid_loss over rows `rows` (C,) of log_q (N, V_S), the log-probs of every position
    of a batch (the objective's, shared with its CE term): the top-2k of all N rows, then only
    (C, 2k) and (C, k) gathers: no (C, V_S) copy of the rows (its backward is a scatter
    into (N, V_S) as slow as the loss). Same value and gradient as hybrid_loss(log_q[rows])."""
    k = t_logp.shape[1]
    tw = twin.long().to(log_q.device)[t_ids.long()]  # (C, k)
    with torch.no_grad():  # which ids: the values come from one gather below (one backward scatter)
        i2 = log_q.topk(min(2 * k, log_q.shape[1]), dim=-1).indices[rows]  # (C, min(2k, V))
    g = log_q[rows[:, None], torch.cat([i2, tw.clamp_min(0)], 1)]  # (C, min(2k, V) + k)
    q2 = F.pad(g[:, : i2.shape[1]].exp(), (0, 2 * k - i2.shape[1]))  # (C, 2k) descending
    return _weighted_mean(_hybrid_terms(g[:, i2.shape[1] :], q2, i2, tw, t_logp, t_missing), weights)


def uld_at(log_q: Tensor, rows: Tensor, t_logp: Tensor, t_missing: Tensor | None, *, weights: Tensor) -> Tensor:
    """uld_loss over rows `rows` (C,) of log_q (N, V_S), as hybrid_at."""
    p, m_t = _teacher(t_logp, t_missing, log_q.dtype)
    k = p.shape[1]
    with torch.no_grad():
        ids = log_q.topk(min(k, log_q.shape[1]), dim=-1).indices[rows]  # (C, min(k, V))
    q_top = F.pad(log_q[rows[:, None], ids].exp(), (0, k - ids.shape[1]))  # (C, k) descending
    return _weighted_mean(_sorted_l1(p, q_top, m_t, 1.0 - q_top.sum(-1)), weights)


def hybrid_loss(
    z: Tensor,
    t_ids: Tensor,
    t_logp: Tensor,
    t_missing: Tensor | None = None,
    *,
    twin: Tensor,
    weights: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    log_probs: bool = False,
) -> Tensor:
    """GOLD's hybrid: exact KL on byte-identical twins, ULD on the rest (0-dim, weighted mean).

    per row: Σ_{j∈S} p_j (log p_j − log q_π(j)) + Σ_{i<k} |p~_(i) − q~_(i)| + |m_T − m~_S|
             m~_S = 1 − Σ_{j∈S} q_π(j) − Σ_i q~_(i)

    TRL's GOLD trainer (Hugging Face, 2025); the ULD part as in ``uld_loss`` (Boizard et al. 2024).
    S = the kept teacher ids j with a twin π(j) = twin[j] >= 0; p~ = the kept probabilities with
    those of S set to 0, sorted descending; q~ = softmax(z) with the twins of S set to 0, its k
    largest descending. Two teacher ids sharing a twin are not special-cased. log q is a
    log_softmax, so the KL's gradient is finite however small q is.

    Shapes: z (C, V_S); t_ids (C, k) integer teacher ids in [0, V_T); t_logp (C, k); t_missing (C,)
    or None; twin (V_T,) integer, values in [-1, V_S); weights (C,). log_probs=True: z already
    holds log_softmax rows.
    """
    _check_topk(z, t_logp, t_missing, weights, chunk_size)
    check_int("t_ids", t_ids)
    check_int("twin", twin)
    if t_ids.shape != t_logp.shape:
        raise ValueError(f"t_ids must have the shape of t_logp {shape_of(t_logp)}, got {shape_of(t_ids)}")
    if twin.ndim != 1:
        raise ValueError(f"twin must be 1-D (V_T,), got shape {shape_of(twin)}")
    v_t, v_s = twin.shape[0], z.shape[1]
    if t_ids.numel() and (t_ids.min().item() < 0 or t_ids.max().item() >= v_t):
        raise ValueError(f"t_ids must lie in [0, V_T={v_t}) (twin {shape_of(twin)}), got max {t_ids.max().item()}")
    if twin.numel() and (twin.min().item() < -1 or twin.max().item() >= v_s):
        raise ValueError(
            f"twin ids must lie in [-1, V_S={v_s}) (z {shape_of(z)}), got min {twin.min().item()}, "
            f"max {twin.max().item()}"
        )
    fn = partial(_hybrid_rows, twin=twin.long().to(z.device), log_probs=log_probs)
    rows = (t_ids, t_logp) if t_missing is None else (t_ids, t_logp, t_missing)
    return _weighted_mean(_rows(fn, z, *rows, chunk_size=chunk_size), weights)


# ----------------------------------------------------------------------------- ALM


def alm_loss(a: Tensor, b: Tensor, *, weights: Tensor, tau: float = 1.0) -> Tensor:
    """Approximate Likelihood Matching: binary KL between chunk likelihoods (0-dim, weighted mean).

    per chunk: f(x, y) = e^x (x − y) + (1 − e^x)(log(1 − e^x) − log(1 − e^y)),  x = a/τ, y = b/τ

    Minixhofer, Vulić & Ponti 2025, arXiv:2503.20083: KL(Bernoulli(e^x) ‖ Bernoulli(e^y)), >= 0,
    0 iff x = y. log(1 − e^x) by ``log1mexp``; x, y clamped to <= −1e-6 (probability 1 gives log 0).

    Shapes: a (C,) teacher chunk log-likelihoods (<= 0); b (C,) student's (<= 0, with grad);
    weights (C,); tau > 0 the ALM temperature on both (not a logit temperature).
    """
    _check_floating("a", a, ndim=1)
    _check_floating("b", b, shape=tuple(a.shape))
    _check_floating("weights", weights, shape=tuple(a.shape))
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    dt = _dtype(a, b)
    x = (a.to(dt) / tau).clamp(max=_ALM_MAX)  # (C,)
    y = (b.to(dt) / tau).clamp(max=_ALM_MAX)  # (C,)
    px = x.exp()
    per_row = px * (x - y) + (-torch.expm1(x)) * (log1mexp(x) - log1mexp(y))  # (C,)
    return _weighted_mean(per_row, weights)


# ----------------------------------------------------------------------------- projected KL


def prefix_kl_at(
    log_q: Tensor,
    rows: Tensor,
    here: tuple[Tensor, Tensor, Tensor, Tensor],
    after: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    depth: Tensor,
    has_after: Tensor,
    prefix: Tensor,
    heads: Tensor,
    weights: Tensor,
) -> Tensor:
    """The teacher's next-token distribution turned into the student's, KL, at every student
    position.

    Student position r starts its token at byte d of teacher token a (the one it is reading,
    or at a teacher boundary the one just read, d = |a|); `here` is the teacher's row that
    predicted a, `after` the next row (predicting the token after a). Each row's candidates
    are its kept top-k (v, p_v) plus its actual token with its stored log-prob (the labels'
    target_logprob) when the top-k left it out. Per row:

        t ∝ Σ_{v ∈ here: v[:d] = a[:d], |v| > d} p_v δ(π_d(v))  +  E · G,
        E = Σ_{v ∈ here: v = a[:d]} p_v,   G ∝ Σ_{v ∈ after} p_v δ(π_0(v))
        loss = Σ_s t_s (log t_s − log q_s)

    π_d = `prefix[:, d]`: the longest student token that begins v's bytes from byte d (−1:
    none, left out). The first sum: the teacher's tokens that agree with the bytes read and
    go on (the rest of a word, or a longer word); E: those that end exactly here, followed
    by what the next row expects first (G, renormalised; its own context is a, the closest
    one stored). Together this is the teacher's distribution of the student's next token
    given the bytes read, marginalised over where the teacher's token ends: for a byte-level
    student its next-byte distribution (cf. the byte-level probabilities of a tokenized
    model, Phan et al. 2024, arXiv:2410.09303), up to the top-k; for another tokenizer its
    first token of the continuation approximated by the longest-prefix token (a vocabulary
    mapping in the spirit of Wan et al. 2024, FuseLLM). Neither where the teacher's actual
    token ends nor whether it goes on leaks into t. The actual token joins the candidates so
    that a rare word's kept look-alikes (" Jer…" for " Jehoshaphat") never take all the mass;
    the teacher's missing mass is spread like the kept mass (renormalised). A row with
    nothing mapped weighs 0, and so does one with E > 0 but no `after` row (the window's last
    teacher token: its target would leave out where a shorter token leads). KL as in Hinton
    et al. 2015.

    Shapes: log_q (N, V_S) the batch's log-probs; rows (R,) the student positions; here /
    after: (ids (R, k), logp (R, k), token (R,), token_logp (R,)); depth (R,); has_after (R,)
    bool; prefix (V_T, D) int; heads (V_T, D + 1) int, numbering each teacher token's first
    d bytes (pipeline/data/alignment.py head_ids); weights (R,). fp32 (fp64 kept).
    """
    dt = _dtype(log_q)
    dev = log_q.device
    prefix, heads = prefix.long().to(dev), heads.long().to(dev)
    D = prefix.shape[1]  # the teacher's longest token
    v, p = _candidates(*here, dt)  # (R, k + 1)
    a, d = here[2].long().to(dev)[:, None], depth.long().to(dev)[:, None]  # (R, 1), (R, 1)
    h = heads[v, d]  # (R, k + 1) the string of each candidate's first d bytes (-1: shorter)
    agree = (h == heads[a, d]) & (h >= 0)  # agrees with the d bytes read
    longer = (heads[v, (d + 1).clamp(max=D)] >= 0) & (d < D)  # goes on past them
    m_go = torch.where(agree & longer, prefix[v, d.clamp(max=D - 1)], -1)  # (R, k + 1) student id from byte d
    e = torch.where(agree & ~longer & (d > 0), p, 0.0).sum(-1, keepdim=True)  # (R, 1) E: ends at d
    v2, p2 = _candidates(*after, dt)
    m_next = torch.where(has_after.to(dev)[:, None], prefix[v2, 0], -1)  # (R, k + 1)
    p2 = torch.where(m_next >= 0, p2, 0.0)
    g = p2 / p2.sum(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)  # (R, k + 1) G
    m = torch.cat([m_go, m_next], 1)  # (R, 2k + 2) student ids (-1: none)
    w = torch.cat([torch.where(m_go >= 0, p, 0.0), e * g], 1)  # (R, 2k + 2) their mass
    # the mass of each distinct student id: sort the ids, sum each run (at its last entry)
    ms, order = m.sort(1)
    cs = w.gather(1, order).cumsum(1)
    last = torch.cat([ms[:, 1:] != ms[:, :-1], torch.ones_like(ms[:, :1], dtype=torch.bool)], 1)
    before = torch.cat([torch.zeros_like(cs[:, :1]), torch.where(last, cs, 0.0).cummax(1).values[:, :-1]], 1)
    mass = torch.where(last & (ms >= 0), cs - before, 0.0).clamp_min(0.0)  # (R, 2k + 2)
    total = mass.sum(-1, keepdim=True)  # (R, 1)
    t = mass / total.clamp_min(torch.finfo(dt).tiny)  # renormalised
    lq = log_q[rows[:, None], ms.clamp_min(0)].to(dt)  # (R, 2k + 2)
    on = t > 0
    per_row = torch.where(on, t * (torch.where(on, t, 1.0).log() - lq), 0.0).sum(-1)
    # no target: a row with nothing mapped, or whose tokens ending here have no next row to go on
    keep = (total[:, 0] > 0) & ((e[:, 0] == 0) | has_after.to(dev))
    return _weighted_mean(per_row, weights * keep)


def _candidates(ids: Tensor, logp: Tensor, token: Tensor, token_logp: Tensor, dt: torch.dtype):
    """A stored row's kept ids (R, k) and its actual token (R,), as (R, k + 1) ids and
    probabilities; the actual token's own entry is 0 when the top-k kept it already."""
    a = token.long().to(ids.device)
    kept = (ids.long() == a[:, None]).any(-1)
    v = torch.cat([ids.long(), a[:, None]], 1)
    p_a = torch.where(kept, 0.0, token_logp.to(dt).exp())
    return v, torch.cat([logp.to(dt).exp(), p_a[:, None]], 1)
