"""The fused sparse-target cross-entropy behind the language-model losses (pipeline/objectives/sparse.py).

Per row: −Σ_{i∈K} w_i log q_i − w_t log q_t, q = softmax(s) over the full vocabulary, q_t
the mass of the ids outside K. With w the teacher's top-k bucket probabilities (and w_t
its tail) it is the cross-entropy part of the top-k + tail KL (Hinton et al. 2015; sparse
logit KD, Anshumann et al. 2025); with w = counts / n and no tail, the sampled estimator;
with one target of weight 1, next-token CE. The gradient is written out, so a chunk of R
rows costs one logsumexp forward and one softmax backward over (R, V), in fp32, and
backward keeps only the chunk's small tensors and a view of its logits (no activation
checkpointing needed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_TAIL_EXACT_BELOW = 1e-3  # 1 − Σ q_kept under this is recomputed as a masked logsumexp (no cancellation)


class SparseTargetCE(torch.autograd.Function):
    """Per row: −Σ_{i∈K} w_i log q_i − w_t log q_t,  q = softmax(s), q_t = Σ_{j∉K} q_j.

    The cross-entropy part of the top-k + tail KL and of the sampled estimator, with its
    gradient written out so a chunk costs one logsumexp forward and one softmax backward
    over (R, V) instead of autograd's saved intermediates:
        ∂/∂s_j = q_j · (Σw + w_t) − w_j [j ∈ K] − w_t · q_j / q_t [j ∉ K]
    s (R, V) fp32 student logits (already divided by T'), ids (R, k) (distinct per row
    when there is a tail), w (R, k) and w_t (R,) >= 0 target weights (w_t None: no tail
    bucket). fp32 math.
    """

    @staticmethod
    def forward(ctx, s, ids, w, w_t, y=None):
        lse = torch.logsumexp(s, -1, keepdim=True)  # (R, 1)
        log_qk = s.gather(1, ids) - lse  # (R, k)
        loss = -(w * log_qk).sum(-1)
        q_t = None
        if w_t is not None:
            q_t = (-torch.expm1(torch.logsumexp(log_qk, -1))).clamp_min(0.0)  # (R,) 1 − Σ q_kept
            small = q_t < _TAIL_EXACT_BELOW
            if bool(small.any()):  # exact for tiny tails: the other ids' logsumexp
                rows = small.nonzero().squeeze(1)
                rest = torch.logsumexp(s[rows].scatter(1, ids[rows], -math.inf), -1) - lse[rows, 0]
                q_t = q_t.index_put((rows,), rest.exp())
            q_t = q_t.clamp_min(torch.finfo(torch.float32).tiny)
            loss = loss - w_t * q_t.log()
        ctx.save_for_backward(
            s,
            ids,
            w,
            lse,
            log_qk,
            w_t if w_t is not None else lse.new_zeros(0),
            q_t if q_t is not None else lse.new_zeros(0),
            y if y is not None else ids.new_zeros(0),
        )
        ctx.has_tail, ctx.has_y = w_t is not None, y is not None
        if y is None:
            return loss
        # the hard-label CE of the same softmax beside it: (R, 2) = [sparse-target CE, −log q_y]
        return torch.stack([loss, lse[:, 0] - s.gather(1, y[:, None])[:, 0]], 1)

    @staticmethod
    def backward(ctx, g):
        s, ids, w, lse, log_qk, w_t, q_t, y = ctx.saved_tensors
        g1, g2 = (g[:, :1], g[:, 1:]) if ctx.has_y else (g[:, None], None)  # (R, 1) each
        total = w.sum(-1, keepdim=True)  # (R, 1)
        grad = (s - lse).exp_()  # q, (R, V)
        # the hard-label term adds g2·(q − onehot(y)): g2 joins every id's q factor, then −g2 at y
        extra = 0.0 if g2 is None else g2
        if ctx.has_tail:  # ids distinct per row here (checked by the top-k losses)
            ratio = (w_t / q_t)[:, None]
            grad.mul_(g1 * (total + w_t[:, None] - ratio) + extra)  # the V − k other ids
            kept = log_qk.exp()
            grad.scatter_(1, ids, g1 * (kept * (total + w_t[:, None]) - w) + extra * kept)  # written: no cancellation
        else:  # repeated ids (sampled padding, weight 0) add per slot: exact
            grad.mul_(g1 * total + extra)
            grad.scatter_add_(1, ids, -g1 * w)
        if g2 is not None:
            grad.scatter_add_(1, y[:, None], -g2)
        return grad, None, None, None, None


def per_row_fused(fn, logits: Tensor, *row_tensors: Tensor, chunk_size: int) -> Tensor:
    """As _per_row, without activation checkpointing: the fused loss keeps only a chunk's
    small tensors (and a view of its logits) for backward."""
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    out, start = [], 0
    for z in logits.split(chunk_size):
        out.append(fn(z, *[t[start : start + z.shape[0]] for t in row_tensors]))
        start += z.shape[0]
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
