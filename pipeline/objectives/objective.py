"""What a model minimises: one object for every task, built once, called once per step.

    objective = Objective.from_config(cfg, stream=stream, teacher=teacher, model=model, ...)
    for batch in batches:
        terms = objective(net, batch)            # forward + {"loss", "task_loss", "kd_loss", ...}
        terms["loss"].backward()

`terms` is {"loss": total, plus the named terms it is made of}: "task_loss" (hard-label or
next-token cross-entropy), "kd_loss" (the distillation term of the loss name, from
objectives/losses.py), "hint_loss", "rkd_loss" (unweighted; the total weighs them). A term
is computed only when its weight is > 0:

    loss = α·task_loss + (1 − α)·kd_loss + hint_weight·hint_loss + rkd_weight·rkd_loss

(loss "ce", the baseline and every teacher: loss = task_loss). α is mixed here and nowhere
else; every term is a weighted mean over rows in fp32, pad rows (weight 0) excluded.

Rows: a classifier's logits (B, C) are B rows; a language model's (B, L, V) are the real
positions of batch["mask"] (B, L), flattened once here: N = mask.sum() rows of V, and every
per-position target or label column (B, L, ...) is flattened the same way. The losses
never see the batch's layout.

The label temperature, from YAML to the loss (one division, one rescale):
  label.temperature T (flows/config.py) -> storage.SoftLabelWriter divides: stored s = z/T,
  T recorded in the manifest -> the stream yields s as stored (training/stream.py, no
  temperature math) -> here T' (students.temperatures) meets T: dense losses rescale once,
  s·T/T' = z/T' (objectives/dense.py `rescale`); top-k and sampled losses take T itself
  (objectives/sparse.py), since a top-k summary is exact only at the temperature it was made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.datasets import model_inputs
from pipeline.models.checkpoint import unwrap
from pipeline.objectives.dense import HintLoss, cross_entropy, rkd_distance_loss
from pipeline.objectives.losses import FAMILIES, LOSSES, loss_names, losses_for
from pipeline.objectives.sparse import DEFAULT_CHUNK, next_token_ce

if TYPE_CHECKING:
    from pipeline.training.config import TrainConfig
    from pipeline.training.stream import LabelStream

__all__ = ["Objective"]

# Above this many classes the task term runs the fused, chunked cross-entropy (no fp32
# (N, V) copy of a language model's logits); below it torch's own, faster for a few classes.
FUSED_CE_CLASSES = 1024


class Objective:
    """A model's loss for one training run. Build with `from_config`; see the module doc.

    loss: "ce" (hard labels / next tokens only) or a registered KD loss; temperature: the
    student's T'; kind: the stored labels' representation kind ("dense", "topk",
    "token_topk", "token_sampled"); stored_temperatures: the stored T of each teacher,
    primary first; teacher: an online teacher (raw logits at T = 1, dense); hint: the
    FitNets regressor when hint_weight or rkd_weight > 0; source names the labels in errors.
    """

    def __init__(
        self,
        *,
        loss: str = "ce",
        temperature: float = 1.0,
        alpha: float = 0.0,
        hint_weight: float = 0.0,
        rkd_weight: float = 0.0,
        kind: str | None = None,
        stored_temperatures: Sequence[float] = (),
        teacher: nn.Module | None = None,
        hint: HintLoss | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        source: str = "the soft labels",
    ):
        if loss not in loss_names():
            raise ValueError(f"TrainConfig.loss must be one of {list(loss_names())}, got {loss!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"TrainConfig.temperature must be finite and > 0, got {temperature!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"TrainConfig.alpha must be in [0, 1], got {alpha!r}")
        self.loss, self.temperature, self.alpha = loss, float(temperature), float(alpha)
        self.hint_weight, self.rkd_weight = float(hint_weight), float(rkd_weight)
        self.kind, self.teacher, self.hint, self.source = kind, teacher, hint, source
        self.stored_temperatures = [float(t) for t in stored_temperatures]
        self.chunk_size = int(chunk_size)
        self.mode = "hard" if loss == "ce" else "online" if teacher is not None else "stored"
        if self.mode == "stored" and (kind is None or not self.stored_temperatures):
            raise ValueError(
                f"loss {loss!r} learns from stored labels: give their kind and the stored temperature of each teacher"
            )
        if self.mode != "stored" and self.stored_temperatures:
            raise ValueError(f"stored_temperatures are for stored labels only (loss {loss!r})")
        if self.mode != "hard":
            self._check_loss()
        if (self.hint_weight or self.rkd_weight) and self.mode == "hard":
            raise ValueError(
                "hint_weight/rkd_weight need a teacher feature: learn from stored labels or an "
                "online teacher, not loss 'ce'"
            )
        if (self.hint_weight or self.rkd_weight) and hint is None:
            raise ValueError("hint_weight/rkd_weight > 0 need the hint regressor (hint=HintLoss(...))")
        self.needs_features = hint is not None and self.mode != "hard"
        # a student with its own tokenizer: terms over byte-aligned chunks (objectives/xtok.py)
        self.cross_tokenizer = self.mode == "stored" and LOSSES[loss].cross_tokenizer
        # the stream's vocabulary maps (pipeline/data/alignment.py vocab_maps): twin (V_T,),
        # prefix (V_T, D), heads (V_T, D + 1); each loss takes the ones it needs
        self.maps: dict[str, Tensor] | None = None
        names = ["loss"]
        if self.mode == "hard" or self.alpha > 0:
            names.append("task_loss")
        if self.mode != "hard" and self.alpha < 1:
            names.append("kd_loss")
        if self.needs_features and self.hint_weight:
            names.append("hint_loss")
        if self.needs_features and self.rkd_weight:
            names.append("rkd_loss")
        self.term_names: tuple[str, ...] = tuple(names)

    def _check_loss(self) -> None:
        spec, n = LOSSES[self.loss], len(self.stored_temperatures)
        family = "dense" if self.mode == "online" else FAMILIES.get(self.kind)
        if family is None:
            raise ValueError(f"{self.source}: unknown representation kind {self.kind!r}")
        if family not in spec.labels:
            where = (
                "an online teacher gives dense logits" if self.mode == "online" else f"{self.source} are {self.kind}"
            )
            raise ValueError(
                f"loss={self.loss!r} learns from {'/'.join(spec.labels)} labels, but {where}: use one "
                f"of {losses_for(family)} (TrainConfig.loss / students.losses)"
            )
        if n > 1 and not spec.multi_teacher:
            raise ValueError(
                f"loss={self.loss!r} cannot be used with several teachers' soft labels ({n} given): "
                f"multi-teacher distillation is defined for loss="
                f"{[k for k, v in LOSSES.items() if v.multi_teacher]} only "
                f"(TrainConfig.loss / students.losses with students.extra_soft_labels)"
            )
        if spec.exact_temperature and self.mode == "stored":
            T = self.stored_temperatures[0]
            if not math.isclose(self.temperature, T, rel_tol=1e-9):
                raise ValueError(
                    f"loss={self.loss!r} is defined only at the stored temperature {T:g}; got "
                    f"TrainConfig.temperature={self.temperature:g} (students.temperatures)"
                )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        *,
        stream: LabelStream | None = None,
        teacher: nn.Module | None = None,
        model: nn.Module | None = None,
        data: Any = None,
        ddp: bool = False,
        device: torch.device | str | None = None,
    ) -> Objective:
        """From a TrainConfig (loss, temperature, alpha, hint_weight, rkd_weight, chunk_size),
        the stream's stored temperatures and kind (stored labels), and the online teacher.
        The student's T' is cfg.temperature, else the stored temperature (else 1).
        Builds the hint regressor (student feature width -> teacher feature width) when needed."""
        T = cfg.temperature if cfg.temperature is not None else stream.temperature if stream is not None else 1.0
        kw = dict(
            loss=cfg.loss,
            temperature=T,
            alpha=cfg.alpha,
            chunk_size=cfg.chunk_size,
            teacher=teacher if cfg.loss != "ce" else None,
        )
        if stream is not None and cfg.loss != "ce":
            kw.update(
                stored_temperatures=[stream.temperature, *stream.extra_temperatures],
                kind=stream.kind,
                source=f"soft labels at {stream.uri}",
            )
        obj = cls(**kw)  # the loss refusals first, before any hint set-up
        if obj.cross_tokenizer:
            obj.maps = getattr(stream, "maps", None)
            if obj.maps is None:
                raise ValueError(
                    f"loss {cfg.loss!r} aligns two tokenizations by bytes: it needs a student with its own "
                    f"tokenizer (students.models[].tokenizer; distillery.aligned_windows)"
                )
        if cfg.hint_weight or cfg.rkd_weight:
            obj = cls(
                **kw,
                hint_weight=cfg.hint_weight,
                rkd_weight=cfg.rkd_weight,
                hint=_build_hint(obj.mode, model, stream, teacher, data, ddp, device),
            )
        return obj

    @classmethod
    def for_labels(
        cls,
        labels: Any = None,
        *,
        loss: str | None = None,
        temperature: float | None = None,
        alpha: float = 0.0,
        kind: str | None = None,
        stored_temperature: float | None = None,
        stream: LabelStream | None = None,
    ) -> Objective:
        """For stored labels in a user's own loop or Trainer: their kind and stored
        temperature T from `labels` (an opened dataset: its manifest and temperature) or
        given as kind= and stored_temperature=; the KD `loss` (default: the family's own:
        kd for dense, topk_kl for top-k, sampled_kl for sampled), the student's T'
        (default T) and α. A cross-tokenizer loss (uld, gold, alm, prefix_kl) takes the vocabulary maps of
        `stream` (open_stream over distillery.aligned_corpus)."""
        if labels is not None:
            kind, stored_temperature = labels.manifest["representation"]["kind"], labels.temperature
        if kind not in FAMILIES or stored_temperature is None:
            raise ValueError(
                "give labels=, or kind= (a representation kind: dense, topk, token_topk, token_sampled) "
                f"and stored_temperature=; got kind={kind!r}"
            )
        T = float(stored_temperature)
        obj = cls(
            loss=loss or losses_for(FAMILIES[kind])[0],
            temperature=T if temperature is None else temperature,
            alpha=alpha,
            kind=kind,
            stored_temperatures=[T],
            source=f"soft labels at {labels.uri}" if labels is not None else f"the {kind} labels",
        )
        obj.maps = getattr(stream, "maps", None)
        return obj

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective itself (the hint regressor), for the optimizer."""
        return list(self.hint.parameters()) if self.hint is not None else []

    # ------------------------------------------------------------------ the loss

    def __call__(self, net: nn.Module, batch: dict) -> dict[str, Tensor]:
        """The model's forward on batch["x"] and the terms of `terms`. Feature losses run
        the unwrapped model's .features / .head (they are refused under DDP)."""
        if not self.needs_features:
            return self.terms(net(batch["x"]), batch)
        raw = unwrap(net)
        feats = raw.features(batch["x"])  # (B, F_s)
        return self.terms(raw.head(feats), batch, feats)

    def terms(self, logits: Tensor, batch: dict, feats: Tensor | None = None) -> dict[str, Tensor]:
        """logits (B, C), or (B, L, V) with batch["mask"] (B, L): the named terms and their total."""
        if self.cross_tokenizer:
            return self._cross_terms(logits, batch)
        rows = Rows(logits, batch)
        z, w = rows.logits, rows.weights  # (N, C), (N,)
        terms: dict[str, Tensor] = {}
        if self.mode == "hard":
            terms["task_loss"] = self._task_loss(z, rows.take("y"), w)
            return {"loss": terms["task_loss"], **terms}
        t_feat = batch.get("teacher_feature")
        if self.mode == "online":
            t_logits, t_feat = self._run_teacher(batch["x"])
            targets = {"teachers": [t_logits], "stored_temperatures": [1.0]}  # raw z = z / 1
        else:
            targets = self._targets(rows, batch)
        total = None
        spec = LOSSES[self.loss]
        if 0 < self.alpha < 1 and spec.fused_ce and self.temperature == 1.0 and z.shape[1] > FUSED_CE_CLASSES:
            # one pass over a large vocabulary's logits gives both terms (objectives/sparse_ce.py)
            terms["task_loss"], terms["kd_loss"] = None, None  # the order of the named terms
            terms["kd_loss"], terms["task_loss"] = spec.fn(
                z, targets, temperature=1.0, weights=w, chunk_size=self.chunk_size, targets=rows.take("y")
            )
            total = self.alpha * terms["task_loss"] + (1.0 - self.alpha) * terms["kd_loss"]
        elif self.alpha > 0:
            terms["task_loss"] = self._task_loss(z, rows.take("y"), w)
            total = terms["task_loss"] if self.alpha == 1 else self.alpha * terms["task_loss"]
        if self.alpha < 1 and terms.get("kd_loss") is None:
            kd = terms["kd_loss"] = spec.fn(
                z, targets, temperature=self.temperature, weights=w, chunk_size=self.chunk_size
            )
            kd = kd if self.alpha == 0 else (1.0 - self.alpha) * kd
            total = kd if total is None else total + kd
        if self.needs_features:
            keep = w > 0  # pad rows carry no information
            s, t = feats[keep].flatten(1), t_feat[keep].flatten(1)
            if self.hint_weight:
                terms["hint_loss"] = self.hint(s, t)  # FitNets (Romero et al. 2015)
                total = total + self.hint_weight * terms["hint_loss"]
            if self.rkd_weight:
                # RKD distance (Park et al. 2019) needs >= 3 rows for a non-trivial relation
                terms["rkd_loss"] = rkd_distance_loss(s, t) if len(s) > 2 else logits.new_zeros((), dtype=torch.float32)
                total = total + self.rkd_weight * terms["rkd_loss"]
        return {"loss": total, **terms}

    def _cross_terms(self, logits: Tensor, batch: dict) -> dict[str, Tensor]:
        """A student with its own tokenizer: the task term is next-token CE in its own
        tokens; the KD term compares the teacher's stored labels with the student over the
        batch's C aligned chunks (training/cross_stream.py): xt_first_s / xt_first_t (C,)
        flat positions predicting each chunk's first student / teacher token, xt_chunk_s
        (B·Ls,) / xt_chunk_t (B·Lt,) the chunk of every target (-1: none); or, for
        prefix_kl, at every student position (`_position_rows`)."""
        B, L, V = logits.shape
        z, y = logits.reshape(-1, V), batch["y"].reshape(-1)  # (B·L, V), (B·L,)
        w_pos = (batch["weight"][:, None] * batch["mask"]).reshape(-1).float()  # real positions
        cs = self.chunk_size
        # log q over the student's vocabulary once, fp32, shared by every term: −log q(y) per
        # position (the CE term, ALM's b) and the chunk-first rows (ULD / GOLD)
        log_q = torch.cat([F.log_softmax(z[i : i + cs].float(), -1) for i in range(0, len(z), cs)])  # (B·L, V)
        nll = -log_q.gather(1, y[:, None])[:, 0]  # (B·L,)
        terms: dict[str, Tensor] = {}
        total = None
        if self.alpha > 0:
            terms["task_loss"] = (nll * w_pos).sum() / w_pos.sum().clamp_min(1e-12)
            total = self.alpha * terms["task_loss"]
        if self.alpha < 1:
            first_s, first_t = batch["xt_first_s"], batch["xt_first_t"]  # (C,)
            k = batch["topk_ids"].shape[-1]
            t = {
                "ids": batch["topk_ids"].reshape(-1, k)[first_t],  # (C, k) at each chunk's first teacher position
                "logp": batch["topk_logprobs"].reshape(-1, k)[first_t],
                "missing": batch["missing_mass"].reshape(-1)[first_t] if "missing_mass" in batch else None,
                "rows": first_s,  # the loss reads these rows of log_q (no (C, V) copy)
            }
            if self.maps is not None:  # the vocabulary maps: the loss takes the ones it needs
                self.maps = {name: m.to(z.device) for name, m in self.maps.items()}
                t |= self.maps
            t["span"] = _position_rows(batch, w_pos)  # every student position's teacher rows (prefix_kl's)
            # chunk log-likelihoods (ALM's): Σ of each side's token log-probs in the chunk, (C,) each
            C, ct, cst = len(first_s), batch["xt_chunk_t"].reshape(-1), batch["xt_chunk_s"].reshape(-1)
            a = batch["target_logprob"].reshape(-1).float()
            t["teacher_chunk_logp"] = z.new_zeros(C, dtype=torch.float32).index_add(0, ct[ct >= 0], a[ct >= 0])
            t["student_chunk_logp"] = z.new_zeros(C, dtype=torch.float32).index_add(0, cst[cst >= 0], -nll[cst >= 0])
            w_c = batch["weight"][first_s // L].float()  # each chunk weighs as its window
            kd = terms["kd_loss"] = LOSSES[self.loss].fn(
                log_q, t, temperature=self.temperature, weights=w_c, chunk_size=cs
            )
            total = kd if total is None else total + (1.0 - self.alpha) * kd
        return {"loss": total, **terms}

    def _task_loss(self, z: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Hard-label / next-token cross-entropy at T = 1, the weighted mean over rows."""
        if z.shape[1] > FUSED_CE_CLASSES:
            return next_token_ce(z, y, weights=w, chunk_size=self.chunk_size)
        return cross_entropy(z, y, weights=w)

    def _targets(self, rows: Rows, batch: dict) -> dict:
        """The stored labels' rows, as the loss family's `t` (objectives/losses.py)."""
        family, T = FAMILIES[self.kind], self.stored_temperatures
        if family == "dense":
            extra = batch.get("extra_stored_logits")
            teachers = [batch["stored_logits"], *(extra if extra is not None else ())]
            if len(teachers) != len(T):
                raise ValueError(
                    f"the batch holds {len(teachers)} teachers' logits, the objective was built for {len(T)}"
                )
            return {"teachers": teachers, "stored_temperatures": T}
        if family == "topk":
            return {
                "ids": rows.take("topk_ids"),
                "logp": rows.take("topk_logprobs"),
                "missing": rows.take("missing_mass") if "missing_mass" in batch else None,
                "stored_temperature": T[0],
            }
        return {"ids": rows.take("sample_ids"), "counts": rows.take("sample_counts"), "stored_temperature": T[0]}

    def _run_teacher(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Online KD: the teacher on the very views the student sees, frozen, fp32."""
        with torch.inference_mode():
            if self.needs_features:
                t_feat = self.teacher.features(x).float()
                t_logits = self.teacher.head(t_feat).float()
            else:
                t_feat, t_logits = None, self.teacher(x).float()
        # clone: inference tensors cannot enter autograd
        return t_logits.clone(), (t_feat.clone() if t_feat is not None else None)


class Rows:
    """A batch's logits and per-row (or per-position) tensors as N rows.

    logits (B, C) with batch["weight"] (B,): the B rows as they are. logits (B, L, V) with
    batch["mask"] (B, L) bool: the N = mask.sum() real positions in row-major order; a full
    mask takes views (no copies), a partial one copies the real rows once, in the student's
    dtype. weights: batch["weight"] per row, (N,)."""

    def __init__(self, logits: Tensor, batch: dict):
        self.mask = batch.get("mask") if logits.ndim == 3 else None
        if logits.ndim == 3:
            m = self.mask
            if m is None or m.shape != logits.shape[:2] or m.dtype != torch.bool:
                got = None if m is None else f"{m.dtype} {tuple(m.shape)}"
                raise ValueError(
                    f"logits (B, L, V) = {tuple(logits.shape)} need a bool batch['mask'] "
                    f"{tuple(logits.shape[:2])}, got {got}"
                )
            self.flat = m.reshape(-1)
            self.full = bool(self.flat.all())
            z = logits.reshape(-1, logits.shape[-1])
            self.logits = z if self.full else z[self.flat]
            self.weights = self.take(batch["weight"][:, None].expand(m.shape))
        elif logits.ndim == 2:
            self.logits, self.weights = logits, batch["weight"]
        else:
            raise ValueError(f"logits must be (B, C) or (B, L, V), got {tuple(logits.shape)}")
        self.batch = batch

    def take(self, t: Tensor | str) -> Tensor:
        """A batch tensor (B, ...) or, with a mask, (B, L, ...) as (N, ...) rows."""
        if isinstance(t, str):
            if t not in self.batch:
                raise ValueError(f"the batch has no {t!r} (keys {sorted(self.batch)})")
            t = self.batch[t]
        if self.mask is None:
            return t
        if t.shape[:2] != self.mask.shape:
            raise ValueError(
                f"a per-position tensor must start with the mask's shape {tuple(self.mask.shape)}, got {tuple(t.shape)}"
            )
        t = t.reshape(-1, *t.shape[2:])
        return t if self.full else t[self.flat]


def _build_hint(mode: str, model, stream, teacher, data, ddp: bool, device) -> HintLoss:
    """The hint regressor (student feature -> teacher feature) when hint/RKD losses are on."""
    if mode == "hard":
        raise ValueError(
            "hint_weight/rkd_weight need a teacher feature: learn from stored labels or an online "
            "teacher, not loss 'ce'"
        )
    if ddp:
        raise ValueError("hint_weight/rkd_weight are not supported with DDP yet (they bypass the DDP wrapper)")
    if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ValueError(
            "hint/RKD losses need a student with .features(x) and a Linear .head (pipeline.models builders have both)"
        )
    if mode == "stored":
        feat = stream.manifest.get("feature")
        if not feat:
            raise ValueError(
                f"soft labels at {stream.uri} store no teacher feature; label with "
                f"feature_layer=... to use hint_weight/rkd_weight"
            )
        t_dim = int(np.prod(feat["shape"]))
    else:
        if not hasattr(teacher, "features"):
            raise ValueError("online hint/RKD losses need a teacher with .features(x)")
        with torch.inference_mode():
            t_dim = teacher.features(model_inputs(data, [0], [0]).to(device)).reshape(1, -1).shape[1]
    return HintLoss(model.head.in_features, t_dim).to(device)


def _position_rows(batch: dict, w_pos: Tensor) -> dict:
    """The teacher's rows for every real student position (R of them): `here` predicted the
    teacher token the student is reading (or has just read, at a boundary), `after` the next
    one in the same window; each as (top-k ids (R, k), log-probs (R, k), the actual token
    (R,), its log-prob (R,)); the bytes of `here`'s token read (depth) and the weights."""
    B, Lt, k = batch["topk_ids"].shape
    row_t = batch["xt_row_t"].reshape(-1)  # (B·Ls,) flat in (B, Lt), -1: none
    at = torch.nonzero((row_t >= 0) & (w_pos > 0))[:, 0]  # (R,)
    r = row_t[at]
    nxt = torch.where(r % Lt + 1 < Lt, r + 1, r)  # (R,) the next row, in the same window
    target = batch["xt_target_t"].reshape(-1)  # (B·Lt,) the teacher's target ids, -1: none
    ids, lp = batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k)
    a_lp = batch["target_logprob"].reshape(-1)  # the teacher's log-prob of each target
    return {
        "rows": at,
        "here": (ids[r], lp[r], target[r], a_lp[r]),
        "after": (ids[nxt], lp[nxt], target[nxt].clamp_min(0), a_lp[nxt]),
        "has_after": (nxt != r) & (target[nxt] >= 0),
        "depth": batch["xt_depth"].reshape(-1)[at],  # (R,)
        "weights": w_pos[at],
    }
