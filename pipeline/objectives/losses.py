"""The loss names a student learns with: one registry, one meaning per name for every task.

A loss is a function of the student's logits over rows, z (N, C) (a classifier's samples,
or a language model's real token positions with C = V), the teacher's targets for the same
rows and the student temperature T'. It is registered with the label families it learns
from (the manifest's representation kind: dense, topk / token_topk, token_sampled):

    name        labels   per row, fp32                                     citation
    kd          dense    T'²·KL(p ‖ softmax(z/T')), p = mean_m softmax(z_m/T')  Hinton et al. 2015
    soft_ce     dense    T'²·H(p, softmax(z/T')) = kd + T'²·H(p)            Hinton et al. 2015
    mse         dense    mean_c (z − z_teacher)² on raw logits (T' unused)  Ba & Caruana 2014
    topk_kl     topk     T'²·KL over the k kept ids + one tail bucket       Hinton 2015; Anshumann et al. 2025
    reverse_kl  topk     T'²·KL(q ‖ p) over the same buckets                Gu et al. 2024 (MiniLLM)
    jsd         topk     T'²·JSD_0.5(p, q) over the same buckets            Agarwal et al. 2024 (GKD)
    sampled_kl  sampled  −Σ_j (c_j/n)·log q(x_j), unbiased for CE(p, q)     Anshumann et al. 2025
    uld         topk*    Σ_i |p_(i) − q_(i)| sorted probs + tail bucket     Boizard et al. 2024
    gold        topk*    KL on ids of the same bytes + ULD on the rest     TRL GOLD (Hugging Face 2025)
    alm         topk*    binary KL of chunk likelihoods, Bern(e^a) ‖ Bern(e^b)  Minixhofer et al. 2025
    prefix_kl   topk*    KL of the teacher's top-k, given the bytes read, projected  Phan et al. 2024 (bytes);
                         onto the student's next token; kept mass renormalised  cf. Wan et al. 2024

(* cross-tokenizer: a student with its own tokenizer, rows = aligned chunks, for prefix_kl
every student position; objectives/xtok.py.)

One meaning for both tasks: `topk_kl` is exact at the stored temperature (a classifier's
label.temperature; 1 for token labels) and follows objectives/sparse.py's documented tail
convention at any other T'; `sampled_kl` is defined only at the stored temperature (draws
from p say nothing unbiased about p at another T). "ce", the hard-label (or next-token)
cross-entropy alone, is the objective's task term, the baseline: see objectives/objective.py.

Adding a loss: a function `fn(z, t, *, temperature, weights, chunk_size) -> scalar`
(with fused_ce=True it also takes targets=y and then returns (loss, next-token CE) from
one pass over the logits: the objective's α mix over a large vocabulary)
decorated with `register_loss` (here, or in your own module imported before the config is
read: the config accepts every registered name), plus a hand-computed test. `t` holds the
teacher's rows for the loss's family:
    dense    t["teachers"]: [(N, C) stored logits z_m/T_m], t["stored_temperatures"]: [T_m]
             (an online teacher: its raw logits at T = 1)
    topk     t["ids"] (N, k), t["logp"] (N, k) log-probs at T, t["missing"] (N,) or None,
             t["stored_temperature"]: T
    sampled  t["ids"] (N, s), t["counts"] (N, s), t["stored_temperature"]: T
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from pipeline.objectives.dense import logit_mse, rescale, soft_kl_loss, soft_target_cross_entropy, teacher_side
from pipeline.objectives.sparse import jsd_topk, reverse_kl_topk, sampled_kl, topk_tail_kl
from pipeline.objectives.xtok import alm_loss, hybrid_at, hybrid_loss, prefix_kl_at, uld_at, uld_loss

# the manifest's representation kind -> the family of targets a loss learns from
FAMILIES = {"dense": "dense", "topk": "topk", "token_topk": "topk", "token_sampled": "sampled"}


@dataclass(frozen=True)
class Loss:
    name: str
    labels: tuple[str, ...]  # families: "dense", "topk", "sampled"
    fn: Callable[..., Tensor]
    multi_teacher: bool = False  # defined on several teachers' dense labels (their mean p)
    exact_temperature: bool = False  # only at the stored temperature
    # fn(..., targets=y) returns (the loss, next-token CE) from one pass over the logits (T' = 1)
    fused_ce: bool = False
    # compares two tokenizations aligned by bytes (objectives/xtok.py): a student with its own tokenizer
    cross_tokenizer: bool = False


LOSSES: dict[str, Loss] = {}


def register_loss(
    name: str,
    *,
    labels: tuple[str, ...],
    multi_teacher: bool = False,
    exact_temperature: bool = False,
    fused_ce: bool = False,
    cross_tokenizer: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: make `fn` the loss `name` (see the module docstring for its signature)."""
    bad = sorted(set(labels) - set(FAMILIES.values()))
    if bad or not labels:
        raise ValueError(
            f"register_loss({name!r}): labels must be some of {sorted(set(FAMILIES.values()))}, got {labels!r}"
        )
    if name == "ce":
        raise ValueError("'ce' is the task term (hard labels, next tokens), not a KD loss")

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        LOSSES[name] = Loss(name, tuple(labels), fn, multi_teacher, exact_temperature, fused_ce, cross_tokenizer)
        return fn

    return deco


def loss_names() -> tuple[str, ...]:
    """Every name `students.losses` accepts: "ce" (the baseline) and the registered losses."""
    return ("ce", *LOSSES)


def losses_for(family: str, *, cross_tokenizer: bool = False) -> list[str]:
    """The losses that learn from a label family: for a student of the teacher's tokenizer,
    or (cross_tokenizer) one with its own."""
    return [n for n, loss in LOSSES.items() if family in loss.labels and loss.cross_tokenizer == cross_tokenizer]


# ----------------------------------------------------------------------------- dense


def _targets(t: dict, temperature: float):
    # the teachers' logits at T' (the one rescale), then p = mean_m softmax and Σ p log p
    return teacher_side([rescale(z, T, temperature) for z, T in zip(t["teachers"], t["stored_temperatures"])])


@register_loss("kd", labels=("dense",), multi_teacher=True)
def kd(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    p, neg_h = _targets(t, temperature)
    return soft_kl_loss(z, p, temperature=temperature, weights=weights, teacher_neg_entropy=neg_h)


@register_loss("soft_ce", labels=("dense",))
def soft_ce(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    p, _ = _targets(t, temperature)
    return soft_target_cross_entropy(z, p, temperature=temperature, from_logits=False, weights=weights)


@register_loss("mse", labels=("dense",))
def mse(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    # on RAW logits: the stored z/T rescaled to T' = 1
    return logit_mse(z, rescale(t["teachers"][0], t["stored_temperatures"][0], 1.0), weights=weights)


# ----------------------------------------------------------------------------- top-k and sampled


def _topk_args(t: dict, temperature: float, weights: Tensor, chunk_size: int) -> dict:
    return {
        "temperature": temperature,
        "stored_temperature": t["stored_temperature"],
        "weights": weights,
        "chunk_size": chunk_size,
        "missing_mass": t.get("missing"),
    }


@register_loss("topk_kl", labels=("topk",), fused_ce=True)
def topk_kl(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int, targets=None) -> Tensor:
    return topk_tail_kl(z, t["ids"], t["logp"], targets=targets, **_topk_args(t, temperature, weights, chunk_size))


@register_loss("reverse_kl", labels=("topk",))
def reverse_kl(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    return reverse_kl_topk(z, t["ids"], t["logp"], **_topk_args(t, temperature, weights, chunk_size))


@register_loss("jsd", labels=("topk",))
def jsd(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    return jsd_topk(z, t["ids"], t["logp"], beta=0.5, **_topk_args(t, temperature, weights, chunk_size))


@register_loss("sampled_kl", labels=("sampled",), exact_temperature=True, fused_ce=True)
def sampled(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int, targets=None) -> Tensor:
    return sampled_kl(z, t["ids"], t["counts"], weights=weights, chunk_size=chunk_size, targets=targets)


# ----------------------------------------------------------------------------- cross-tokenizer
# z: the student's logits at each aligned chunk's first position (C, V_S), or with t["rows"]
# (C,) the log-probs of every position of the batch (N, V_S) (the objective shares its CE
# term's log-softmax; the chunks' first rows are t["rows"]); t: the teacher's top-k there
# (ids, logp, missing), the stream's vocabulary maps (twin (V_T,): teacher id -> student id
# of the same bytes or -1; prefix (V_T, D); heads (V_T, D + 1)), the chunks' log-likelihoods
# of both sides (C,), and t["span"]: the teacher's rows for every student position
# (prefix_kl's; objective._position_rows). Formulas in objectives/xtok.py.


def _need_map(t: dict, key: str, loss: str) -> None:
    if t.get(key) is None:
        raise ValueError(f"loss {loss!r} needs the {key} map of the stream (Objective.for_labels(..., stream=stream))")


@register_loss("uld", labels=("topk",), exact_temperature=True, cross_tokenizer=True)
def uld(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    if "rows" in t:  # z: the batch's log-probs (N, V_S), the chunks' first rows t["rows"]
        return uld_at(z, t["rows"], t["logp"], t.get("missing"), weights=weights)
    return uld_loss(z, t["logp"], t.get("missing"), weights=weights, chunk_size=chunk_size)


@register_loss("gold", labels=("topk",), exact_temperature=True, cross_tokenizer=True)
def gold(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    _need_map(t, "twin", "gold")
    if "rows" in t:
        return hybrid_at(z, t["rows"], t["ids"], t["logp"], t.get("missing"), twin=t["twin"], weights=weights)
    return hybrid_loss(z, t["ids"], t["logp"], t.get("missing"), twin=t["twin"], weights=weights, chunk_size=chunk_size)


@register_loss("alm", labels=("topk",), exact_temperature=True, cross_tokenizer=True)
def alm(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    return alm_loss(t["teacher_chunk_logp"], t["student_chunk_logp"], weights=weights)


@register_loss("prefix_kl", labels=("topk",), exact_temperature=True, cross_tokenizer=True)
def prefix_kl(z: Tensor, t: dict, *, temperature: float, weights: Tensor, chunk_size: int) -> Tensor:
    # every student position, not only the chunks' first: t["span"] (objective._cross_terms)
    # holds each one's teacher rows (here, after), depth and weight; `weights` (per chunk) unused
    _need_map(t, "prefix", "prefix_kl")
    _need_map(t, "heads", "prefix_kl")
    s = t["span"]
    return prefix_kl_at(
        z,
        s["rows"],
        s["here"],
        s["after"],
        depth=s["depth"],
        has_after=s["has_after"],
        prefix=t["prefix"],
        heads=t["heads"],
        weights=s["weights"],
    )
