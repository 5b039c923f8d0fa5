"""Losses on dense logits (classifiers: every class is stored): pure PyTorch, fp32 math,
shape-checked. The building blocks of `kd`, `soft_ce`, `mse` and the feature losses.

Every loss casts its inputs with ``.float()`` first, so fp16/bf16 logits coming out of
a mixed-precision student (or a low-precision soft-label store) give an fp32 result.
Shapes: B = batch rows, C = classes, D = feature width.

Per-row losses accept ``weights`` of shape (B,): the result is sum_b w_b * l_b / sum_b w_b,
so a 0-weight (padding) row has no effect. An all-zero ``weights`` gives a loss of 0.

The temperature, from stored labels to the loss: the writer stores s = z / T (the one
division, storage/writer.py); `rescale` turns stored logits into those at the student's
temperature T', s·T/T' = z/T' (the one rescale); the top-k and sampled losses
(objectives/sparse.py) take the stored temperature instead, because a top-k summary is
exact only at the temperature it was made at.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.objectives.checks import (
    check_2d,
    check_rows,
    check_same,
    check_temperature,
    normalized_weights,
    row_mean,
    shape_of,
)

__all__ = [
    "soft_target_cross_entropy",
    "soft_kl_loss",
    "logit_mse",
    "cross_entropy",
    "rescale",
    "teacher_side",
    "rkd_distance_loss",
    "HintLoss",
]


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
    log_q = F.log_softmax(s * (1.0 / temperature), dim=-1)  # (B, C)
    cross = (p * w.unsqueeze(-1) * log_q).sum()  # Σ_b w_b Σ_c p log q
    return temperature**2 * (neg_entropy @ w - cross)


# ----------------------------------------------------------------------------- logit KD


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
    ``soft_kl_loss``, only the reported value differs.
    """
    check_2d("student_logits", student_logits)
    check_same("student_logits", student_logits, "teacher_probs_or_logits", teacher_probs_or_logits)
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
    mean of several teachers' softmax, ``teacher_side``); zero entries contribute 0 (0·log 0 = 0).

    ``teacher_neg_entropy`` (B,) = Σ_c p_c log p_c, if the caller has it (pipeline/objectives/objective.py
    computes it with p, see teacher_side), selects the cheaper form T²·(Σ p log p − Σ p log q):
    the gradient is the same, T·(q − p), and the value differs from the p·(log p − log q)
    form by fp32 rounding of the two terms (about 1e-7 of the teacher's entropy).
    """
    check_2d("student_logits", student_logits)
    check_same("student_logits", student_logits, "teacher_probs", teacher_probs)
    check_temperature(temperature)
    p = teacher_probs.float()
    if teacher_neg_entropy is not None:
        check_rows("teacher_neg_entropy", teacher_neg_entropy, p.shape[0])
        w = normalized_weights(weights, p.shape[0], p)
        return _kd_from_probs(student_logits.float(), p, teacher_neg_entropy.float(), w, float(temperature))
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_row = temperature**2 * _kl_rows(p, p.log(), log_q)
    return row_mean(per_row, weights)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Logit regression: mean over rows and classes of (s − t)².

    loss = 1/(B·C) · Σ_b Σ_c (s_bc − t_bc)²   (weighted over rows if ``weights`` given)

    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?" (they use ½Σ; we use the
    mean so the scale does not depend on C).
    """
    check_2d("student_logits", student_logits)
    check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    per_row = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)  # (B,)
    return row_mean(per_row, weights)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Hard-label cross-entropy at T = 1 (the task term), fp32, weighted per-row mean.

    loss = Σ_b w_b · (−log softmax(s_b)[y_b]) / Σ_b w_b

    Shapes: student_logits (B, C), labels (B,) int in [0, C), weights (B,).
    """
    check_2d("student_logits", student_logits)
    return row_mean(F.cross_entropy(student_logits.float(), labels.long(), reduction="none"), weights)


# ----------------------------------------------------------------------------- teacher targets


def rescale(scaled: Tensor, stored_temperature: float, temperature: float) -> Tensor:
    """Scaled logits at another temperature: s·(T/T') = z/T'. The one place a stored (or
    online, T = 1) teacher's logits change temperature."""
    factor = float(stored_temperature) / float(temperature)
    return scaled if factor == 1.0 else scaled * factor


def teacher_side(scaled: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Teachers' logits already at the student temperature, a_m = z_m/T' ((B, C) each) ->
    p = mean_m softmax(a_m) (B, C) and Σ_c p log p (B,), with 0·log 0 = 0; no gradient.

    Written out (max, exp, sum) rather than torch.softmax, whose kernel over a short last
    dimension (C = 10) measured 6x slower. Stored logits are finite (the writer refuses NaN/Inf);
    an online teacher may mask classes with −inf (p = 0). Multi-teacher averaging: Hinton et al.
    2015 (ensemble soft targets), You et al. 2017 ("Learning from Multiple Teacher Networks")."""
    if len(scaled) == 1:
        a = scaled[0].detach().float()
        a = a - a.amax(-1, keepdim=True)  # (B, C), max 0 per row
        e = a.exp()
        total = e.sum(-1, keepdim=True)  # (B, 1), >= 1
        p = e / total
        # Σ p (a − log Σe); a class masked with −inf has p = 0 and adds 0 (0·log 0 = 0), not nan
        neg_h = torch.where(p > 0, p * a, 0.0).sum(-1) - total[:, 0].log()
        return p, neg_h
    a = torch.stack([s.detach().float() for s in scaled])  # (M, B, C)
    a = a - a.amax(-1, keepdim=True)
    e = a.exp()
    p = (e / e.sum(-1, keepdim=True)).mean(0)  # the teachers' mixture
    neg_h = (p * p.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)
    return p, neg_h


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
    check_2d("student_emb", student_emb)
    check_2d("teacher_emb", teacher_emb)
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
