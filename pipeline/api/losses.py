"""The distillation losses as plain functions of a student's logits and a batch of stored
labels: the very functions the built-in loop runs (pipeline/objectives/losses.py owns
each formula; these only name it), for a user's own loop.

    from distillery import losses
    loss = losses.topk_kl(student(batch["x"]), batch)                  # token labels, T = 1
    loss = losses.kd(student(x), target, temperature=4.0, stored_temperature=4.0, alpha=0.5, y=y)

Logits (B, C) for a classifier, or (B, L, V) with the batch's mask (B, L) for a language
model (only real positions count). The batch holds the label fields the stream,
StoredLabels and collate_tokens give (distillery.open_stream's docs list them), and its
rows' weights (default ones). Every loss is a weighted mean over rows, computed in fp32.
α > 0 mixes in the hard-label (or next-token) cross-entropy: α·CE(y, q) + (1 − α)·KD;
y comes from the batch or the argument. T: the temperature the labels were stored at
(a dataset's `temperature`; token labels are stored at T = 1); T': the student's.
"""

from __future__ import annotations

import torch

from pipeline.api.labels import distill_loss


def _loss(name: str, kind: str, z, batch, temperature, stored_temperature, alpha, y) -> torch.Tensor:
    T = 1.0 if stored_temperature is None else stored_temperature
    return distill_loss(
        z,
        batch,
        loss=name,
        kind=kind,
        stored_temperature=T,
        temperature=temperature,
        alpha=alpha,
        y=y,
    )


def kd(
    student_logits: torch.Tensor,
    batch: dict,
    *,
    temperature: float | None = None,
    stored_temperature: float | None = None,
    alpha: float = 0.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """T'²·KL(p ‖ softmax(z/T')), p = softmax(s·T/T') from the stored dense s = z_t/T
    (batch["stored_logits"]). Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network"."""
    return _loss("kd", "dense", student_logits, batch, temperature, stored_temperature, alpha, y)


def topk_kl(
    student_logits: torch.Tensor,
    batch: dict,
    *,
    temperature: float | None = None,
    stored_temperature: float | None = None,
    alpha: float = 0.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """T'²·KL(p ‖ q) over the k stored ids plus one tail bucket holding the rest of each
    distribution (the stored missing mass, or 1 − Σ p_k): exact at the stored T (batch:
    topk_ids, topk_logprobs, optional missing_mass). Hinton et al. 2015; the tail bucket as
    in Anshumann et al. 2025, "Sparse Logit Sampling"."""
    return _loss("topk_kl", "topk", student_logits, batch, temperature, stored_temperature, alpha, y)


def reverse_kl(
    student_logits: torch.Tensor,
    batch: dict,
    *,
    temperature: float | None = None,
    stored_temperature: float | None = None,
    alpha: float = 0.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """T'²·KL(q ‖ p) over the same k + 1 buckets as topk_kl: mode-seeking. Gu et al. 2024,
    "MiniLLM: Knowledge Distillation of Large Language Models"."""
    return _loss("reverse_kl", "topk", student_logits, batch, temperature, stored_temperature, alpha, y)


def jsd(
    student_logits: torch.Tensor,
    batch: dict,
    *,
    temperature: float | None = None,
    stored_temperature: float | None = None,
    alpha: float = 0.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """T'²·JSD_0.5(p, q) = T'²·(½KL(p ‖ m) + ½KL(q ‖ m)), m = ½(p + q), over the same
    k + 1 buckets. Agarwal et al. 2024, "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes" (GKD)."""
    return _loss("jsd", "topk", student_logits, batch, temperature, stored_temperature, alpha, y)


def sampled_kl(
    student_logits: torch.Tensor,
    batch: dict,
    *,
    alpha: float = 0.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """−Σ_j (c_j / n)·log q(x_j) over the stored draws x_j ~ p with counts c_j (batch:
    sample_ids, sample_counts; n = Σ c_j): an unbiased estimate of CE(p, q), so of KL(p ‖ q)
    up to the teacher's entropy; defined at the stored temperature only. Anshumann et al.
    2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs"."""
    return _loss("sampled_kl", "token_sampled", student_logits, batch, None, 1.0, alpha, y)
