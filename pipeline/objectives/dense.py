"""Distillation losses: pure PyTorch, fp32 math, shape-checked.

Every loss casts its inputs with ``.float()`` first, so fp16/bf16 logits coming out of
a mixed-precision student (or a low-precision soft-label store) give an fp32 result.
Shapes: B = batch rows, C = classes, k = stored top-k, D = feature width.

Per-row losses accept ``weights`` of shape (B,): the result is sum_b w_b * l_b / sum_b w_b,
so a 0-weight (padding) row has no effect. An all-zero ``weights`` gives a loss of 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "distillation_loss",
    "soft_target_cross_entropy",
    "soft_kl_loss",
    "logit_mse",
    "topk_kl_loss",
    "multi_teacher_probs",
    "rkd_distance_loss",
    "HintLoss",
]


# ----------------------------------------------------------------------------- checks

def shape_of(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_2d(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, C), got shape {shape_of(x)}")


def _check_same(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape, "
            f"got {a_name} {shape_of(a)} and {b_name} {shape_of(b)}"
        )


def _check_rows(name: str, x: Tensor, batch: int) -> None:
    # x must be (B,) with the same B as the logits
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {shape_of(x)}")


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_int(name: str, x: Tensor) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def row_mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """(B,) -> scalar: plain mean, or weighted mean Σ w_b l_b / Σ w_b."""
    if weights is None:
        return per_row.mean()
    return per_row @ normalized_weights(weights, per_row.shape[0], per_row)


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, summed over classes: (B, C) -> (B,).

    p·(log p − log q) rather than Σp log p − Σp log q: no cancellation in fp32.
    Where p = 0 the term is 0 (0·log 0 = 0), with log p replaced so no inf/nan appears.
    """
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return (p * (log_p - log_q)).sum(-1)


def _kd_from_probs(s: Tensor, p: Tensor, neg_entropy: Tensor, w: Tensor, temperature: float) -> Tensor:
    """T² · Σ_b w_b · (Σ_c p log p − Σ_c p log q) for teacher terms computed beforehand:
    p = softmax(t/T) (B, C), Σ_c p log p (B,) (no gradient), weights w (B,) summing to 1.

    The difference form keeps the autograd graph as short as cross-entropy's (scale,
    log-softmax, product, sum: four C++ backward nodes), which measured faster than both
    autograd through p·(log p − log q) and a custom autograd.Function with a closed-form
    backward. The gradient, w_b · T · (q_b − p_b), is exact; the value rounds like the
    teacher's entropy (~1e-7 of it) rather than like the KL.
    """
    log_q = F.log_softmax(s * (1.0 / temperature), dim=-1)         # (B, C)
    cross = (p * w.unsqueeze(-1) * log_q).sum()                    # Σ_b w_b Σ_c p log q
    return temperature**2 * (neg_entropy @ w - cross)


def normalized_weights(weights: Tensor | None, rows: int, like: Tensor) -> Tensor:
    """(B,) weights summing to 1 (an all-zero ``weights`` stays all zero): uniform if None."""
    if weights is None:
        return torch.full((rows,), 1.0 / rows, dtype=torch.float32, device=like.device)
    _check_rows("weights", weights, rows)
    w = weights.float()
    return w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)  # clamp: all padding gives 0, not nan


# ----------------------------------------------------------------------------- logit KD

def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    weights: Tensor | None = None,
) -> Tensor:
    """Hinton knowledge-distillation loss (scalar, mean over rows).

    loss = α · CE(y, softmax(s)) + (1 − α) · T² · KL(softmax(t/T) ‖ softmax(s/T))

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".
    ``teacher_logits`` are RAW (unscaled) logits. The KL is summed over classes and
    averaged over rows. The soft-target gradient scales as 1/T², hence the T² factor
    (keeps its magnitude comparable across temperatures). The CE term uses T = 1.
    When ``labels`` is None, ``alpha`` is ignored and loss = T² · KL.
    With a constant teacher (no grad) the KL is computed as Σ p log p − Σ p log q with the
    teacher's side outside the autograd graph (see _kd_from_probs): exact gradient, value
    rounded like the teacher's entropy.

    Shapes: student_logits, teacher_logits (B, C); labels (B,) int; weights (B,).
    """
    _check_2d("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s, t = student_logits.float(), teacher_logits.float()  # (B, C) fp32

    if labels is not None:
        _check_rows("labels", labels, s.shape[0])
        check_int("labels", labels)
    if t.requires_grad:  # a teacher being trained too (mutual learning): gradients for both
        log_p = F.log_softmax(t / temperature, dim=-1)  # teacher soft targets
        log_q = F.log_softmax(s / temperature, dim=-1)
        per_row = temperature**2 * _kl_rows(log_p.exp(), log_p, log_q)  # (B,)
        if labels is not None:
            ce = F.cross_entropy(s, labels.long(), reduction="none")  # (B,)
            per_row = alpha * ce + (1.0 - alpha) * per_row
        return row_mean(per_row, weights)
    # a constant teacher: its side (p, Σ p log p) outside the graph, then the short form;
    # the weighted mean is linear, so α·mean(CE) + (1 − α)·mean(T²·KL)
    # -inf teacher logits (masked classes) give p = 0: clamp log p so 0·log p is 0, not nan
    log_p = F.log_softmax(t * (1.0 / temperature), dim=-1).clamp_min_(torch.finfo(torch.float32).min)
    p = log_p.exp()                                                # (B, C)
    w = normalized_weights(weights, s.shape[0], s)                # (B,)
    soft = _kd_from_probs(s, p, (p * log_p).sum(-1), w, float(temperature))
    if labels is None:
        return soft
    ce = F.cross_entropy(s, labels.long(), reduction="none") @ w
    return alpha * ce + (1.0 - alpha) * soft


def soft_target_cross_entropy(
    student_logits: Tensor,
    teacher_probs_or_logits: Tensor,
    *,
    temperature: float = 1.0,
    from_logits: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Soft-target cross-entropy (scalar, mean over rows).

    loss = T² · H(p_T, q_T) = −T² · Σ_c p_T,c · log q_T,c,  q_T = softmax(s/T),
    p_T = softmax(t/T) if ``from_logits`` else the given probabilities (used as-is).

    Hinton et al. 2015. The T² is kept so that this equals the KD soft term
    T²·KL(p_T ‖ q_T) plus the constant T²·H(p_T): same gradients as
    ``distillation_loss(..., alpha=0)``, only the reported value differs.
    """
    _check_2d("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_probs_or_logits", teacher_probs_or_logits)
    check_temperature(temperature)
    t = teacher_probs_or_logits.float()
    p = F.softmax(t / temperature, dim=-1) if from_logits else t  # (B, C)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_row = -(p * log_q).sum(-1) * temperature**2  # (B,)
    return row_mean(per_row, weights)


def soft_kl_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    *,
    temperature: float,
    weights: Tensor | None = None,
    teacher_neg_entropy: Tensor | None = None,
) -> Tensor:
    """KD against given teacher probabilities (scalar, mean over rows).

    loss = T² · KL(p ‖ softmax(s/T)) = T² · Σ_c [p_c log p_c − p_c log q_c]

    Hinton et al. 2015. ``teacher_probs`` (B, C) are already at temperature T (e.g. the
    output of ``multi_teacher_probs``); zero entries contribute 0 (0·log 0 = 0).

    ``teacher_neg_entropy`` (B,) = Σ_c p_c log p_c, if the caller has it (pipeline/objectives/objective.py
    computes it with p, see objective.teacher_side), selects the cheaper form T²·(Σ p log p − Σ p log q):
    the gradient is the same, T·(q − p), and the value differs from the p·(log p − log q)
    form by fp32 rounding of the two terms (about 1e-7 of the teacher's entropy).
    """
    _check_2d("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_probs", teacher_probs)
    check_temperature(temperature)
    p = teacher_probs.float()
    if teacher_neg_entropy is not None:
        _check_rows("teacher_neg_entropy", teacher_neg_entropy, p.shape[0])
        w = normalized_weights(weights, p.shape[0], p)
        return _kd_from_probs(student_logits.float(), p, teacher_neg_entropy.float(), w, float(temperature))
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_row = temperature**2 * _kl_rows(p, p.log(), log_q)
    return row_mean(per_row, weights)


def logit_mse(
    student_logits: Tensor, teacher_logits: Tensor, *, weights: Tensor | None = None
) -> Tensor:
    """Logit regression: mean over rows and classes of (s − t)².

    loss = 1/(B·C) · Σ_b Σ_c (s_bc − t_bc)²   (weighted over rows if ``weights`` given)

    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?" (they use ½Σ; we use the
    mean so the scale does not depend on C).
    """
    _check_2d("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    per_row = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)  # (B,)
    return row_mean(per_row, weights)


# ----------------------------------------------------------------------------- sparse (top-k) KD

def topk_kl_loss(
    student_logits: Tensor,
    topk_indices: Tensor,
    topk_logits: Tensor,
    logsumexp: Tensor,
    *,
    temperature: float,
    weights: Tensor | None = None,
) -> Tensor:
    """KD from a stored top-k teacher, with a tail bucket (scalar, mean over rows).

    Stored (teacher logits z already divided by T): ``topk_logits`` (B, k) = k largest z/T,
    ``topk_indices`` (B, k) their class ids (any int dtype), ``logsumexp`` (B,) =
    logsumexp of ALL C scaled logits. Over k+1 buckets (k classes + tail):
        p_i = exp(z_i/T − lse),   p_tail = 1 − Σ_i p_i
        q = softmax(s/T) merged the same way, q_tail = Σ_{c ∉ top-k} q_c
        loss = T² · Σ_b p_b (log p_b − log q_b)
    Hinton et al. 2015 for KD; storing top-k with the log-partition so the teacher
    probabilities are exact and the remaining mass goes to one tail bucket follows sparse
    logit KD (e.g. Anshumann et al. 2025, "Sparse Logit Sampling").
    The stored p is exact only at the stored temperature, so the student is scaled by the
    same T. Merging buckets can only lower KL (data processing): loss ≤ dense KD, and it
    equals dense KD when k = C.
    """
    _check_2d("student_logits", student_logits)
    _check_2d("topk_logits", topk_logits)
    _check_same("topk_indices", topk_indices, "topk_logits", topk_logits)
    check_int("topk_indices", topk_indices)
    B, C = student_logits.shape
    k = topk_logits.shape[1]
    if topk_logits.shape[0] != B or k > C:
        raise ValueError(
            f"topk_logits must be (B, k) with B={B} and k <= C={C}, got {shape_of(topk_logits)}"
        )
    _check_rows("logsumexp", logsumexp, B)
    check_temperature(temperature)
    idx = topk_indices.long()  # uint8/uint16/int32 -> int64 for gather

    # teacher buckets: exact log-probs of the k classes, tail = 1 - mass (via expm1, stable)
    log_p = topk_logits.float() - logsumexp.float()[:, None]  # (B, k)
    p = log_p.exp()
    p_tail = (-torch.expm1(torch.logsumexp(log_p, dim=-1))).clamp_min(0.0)  # (B,)

    # student buckets: gather the k classes, logsumexp over the rest (no 1-sum, no log 0)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_q_k = log_q.gather(1, idx)  # (B, k)
    in_tail = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, idx, False)  # (B, C)
    has_tail = in_tail.any(-1) & (p_tail > 0)  # rows with k = C have no tail bucket
    tail_in = log_q.masked_fill(~in_tail, -math.inf).masked_fill(~has_tail[:, None], 0.0)
    log_q_tail = torch.logsumexp(tail_in, dim=-1)  # (B,), finite on every row

    kl_k = (p * (log_p - log_q_k)).sum(-1)  # (B,)
    safe_p_tail = torch.where(has_tail, p_tail, torch.ones_like(p_tail))  # avoid log 0 grads
    kl_tail = torch.where(has_tail, p_tail * (safe_p_tail.log() - log_q_tail), 0.0)
    return row_mean(temperature**2 * (kl_k + kl_tail), weights)


# ----------------------------------------------------------------------------- multi-teacher

def multi_teacher_probs(
    teacher_scaled_logits: Sequence[Tensor],
    *,
    weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Weighted average of several teachers' softmax probabilities, (B, C) fp32.

    p = Σ_m w_m · softmax(z_m / T) / Σ_m w_m

    Inputs are temperature-SCALED logits z_m/T for the same rows. ``weights`` here are
    per-TEACHER (length M), not per-row. Hinton et al. 2015 (ensemble soft targets);
    You et al. 2017, "Learning from Multiple Teacher Networks". Feed to ``soft_kl_loss``.
    """
    if len(teacher_scaled_logits) == 0:
        raise ValueError("teacher_scaled_logits must hold at least one tensor, got 0")
    first = teacher_scaled_logits[0]
    _check_2d("teacher_scaled_logits[0]", first)
    for m, z in enumerate(teacher_scaled_logits[1:], start=1):
        _check_same("teacher_scaled_logits[0]", first, f"teacher_scaled_logits[{m}]", z)
    M = len(teacher_scaled_logits)
    if weights is None:
        w = torch.full((M,), 1.0 / M)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32).cpu()
        if w.shape != (M,):
            raise ValueError(f"weights must have shape ({M},) (one per teacher), got {shape_of(w)}")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
        w = w / w.sum()
    probs = torch.stack([F.softmax(z.float(), dim=-1) for z in teacher_scaled_logits])  # (M, B, C)
    return torch.einsum("m,mbc->bc", w.to(probs.device), probs)


# ----------------------------------------------------------------------------- feature KD

def _pairwise_dist(x: Tensor) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances via the Gram matrix (no (B, B, D) tensor)."""
    sq = x.pow(2).sum(-1)  # (B,)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(1e-12)  # clamp: sqrt grad at 0
    return d2.sqrt()


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Relational KD, distance-wise (scalar).

    ψ(a, b) = ‖a − b‖₂ / μ,  μ = mean of ‖a − b‖₂ over the B(B−1) off-diagonal pairs
    loss = mean over off-diagonal (i, j) of SmoothL1_δ=1(ψ_s(i, j) − ψ_t(i, j))

    Park et al. 2019, "Relational Knowledge Distillation". Normalising by μ makes the
    loss invariant to the embeddings' scale, so D_s and D_t may differ. Teacher side has
    no gradient. Shapes: student_emb (B, D_s), teacher_emb (B, D_t), B >= 2.
    """
    _check_2d("student_emb", student_emb)
    _check_2d("teacher_emb", teacher_emb)
    B = student_emb.shape[0]
    if teacher_emb.shape[0] != B or B < 2:
        raise ValueError(
            "student_emb and teacher_emb need the same batch size B >= 2, "
            f"got student_emb {shape_of(student_emb)} and teacher_emb {shape_of(teacher_emb)}"
        )
    off = ~torch.eye(B, dtype=torch.bool, device=student_emb.device)  # (B, B)
    with torch.no_grad():
        d_t = _pairwise_dist(teacher_emb.detach().float())[off]  # (B(B-1),)
        d_t = d_t / d_t.mean().clamp_min(1e-12)
    d_s = _pairwise_dist(student_emb.float())[off]
    d_s = d_s / d_s.mean().clamp_min(1e-12)
    return F.smooth_l1_loss(d_s, d_t, beta=1.0)


class HintLoss(nn.Module):
    """FitNets hint loss: MSE(regressor(student_feat), teacher_feat), mean over elements.

    loss = 1/N · Σ (r(f_s) − f_t)²,  r = learned nn.Linear (features (B, D)) or 1×1
    nn.Conv2d (feature maps (B, C, H, W), same H, W for student and teacher).

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets". The regressor maps the
    student width onto the teacher's; train it jointly with the student.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, conv: bool = False) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim, self.conv = student_dim, teacher_dim, conv
        if conv:
            self.regressor: nn.Module = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)
        else:
            self.regressor = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        ndim = 4 if self.conv else 2
        if student_feat.ndim != ndim or student_feat.shape[1] != self.student_dim:
            want = f"(B, {self.student_dim}, H, W)" if self.conv else f"(B, {self.student_dim})"
            raise ValueError(f"student_feat must be {want}, got {shape_of(student_feat)}")
        want_t = (student_feat.shape[0], self.teacher_dim, *student_feat.shape[2:])
        if shape_of(teacher_feat) != want_t:
            raise ValueError(f"teacher_feat must be {want_t}, got {shape_of(teacher_feat)}")
        # fp32 regardless of input/module dtype; .float() on params keeps their grads
        w, b = self.regressor.weight.float(), self.regressor.bias.float()
        x = student_feat.float()
        pred = F.conv2d(x, w, b) if self.conv else F.linear(x, w, b)
        return F.mse_loss(pred, teacher_feat.float())
