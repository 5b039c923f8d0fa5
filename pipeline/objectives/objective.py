"""What the student minimises: one object, built from config, called once per step.

    objective = Objective.from_config(cfg, mode, stream=stream, teacher=teacher, model=model, ...)
    for batch in batches:
        logits, feats = objective.forward(net, raw, batch["x"])     # forward
        terms = objective(logits, batch, feats)                      # objective
        terms["loss"].backward()                                     # backward
        opt.step()                                                   # step

`terms` is {"loss": total, plus the named terms it is made of}: "task_loss" (hard-label
cross-entropy), "kd_loss" (the distillation term of `cfg.loss`), "hint_loss", "rkd_loss"
(unweighted; the total weighs them). A term is computed only when its weight is > 0:

    loss = α·task_loss + (1 − α)·kd_loss + hint_weight·hint_loss + rkd_weight·rkd_loss

(mode "hard": loss = task_loss). α is mixed here and nowhere else; every term is a
per-row mean weighted by batch["weight"] (pad rows 0), in fp32. The losses themselves
(formulas, citations) are the building blocks in pipeline/objectives/dense.py.

The label temperature, from YAML to the loss (one division, one rescale):

  1. flows/config.py:118        label.temperature (T, default 4.0) in the YAML config
  2. flows/recipes.py:201       label flow passes it to pipeline.labelling.classify.label_dataset(temperature=T)
  3. pipeline/labelling/classify.py:248      ... which opens storage's SoftLabelWriter(temperature=T)
  4. storage/writer.py:206      THE DIVISION: stored s = z / T (z = raw teacher logits);
     storage/writer.py:75       T is recorded in the manifest ("temperature")
  5. pipeline/training/stream.py:106     StoredLabelStream reads T from the manifest (and each extra
                                teacher's T_k) and yields s as stored ("stored_logits"),
                                no temperature math at all
  6. flows/config.py:146        students.temperatures: the student's T' (TrainConfig.temperature)
     pipeline/objectives/objective.py:173  Objective.from_config takes T' from the config, T (T_k) from the stream
  7. pipeline/objectives/objective.py:64   THE RESCALE, `rescale`: z / T' = s · (T / T'), once per step,
                                for kd / soft_ce at T', for mse at T' = 1 (raw logits),
                                per teacher for multi-teacher; an online teacher's raw z
                                enters with T = 1. topk_kl is exact only at T' = T (refused
                                otherwise), so its stored z/T go to the loss unscaled.
     storage/topk.py:60         storage.rescale is the numpy twin of `rescale` (same fp32
                                product; tests/test_objective.py checks them equal)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.objectives.dense import HintLoss, row_mean, logit_mse, rkd_distance_loss, soft_kl_loss, soft_target_cross_entropy, topk_kl_loss
from pipeline.data.datasets import model_inputs

__all__ = ["Objective", "rescale", "teacher_side", "LOSSES", "MULTI_TEACHER_LOSSES"]

LOSSES = ("kd", "soft_ce", "mse", "topk_kl")
# multi-teacher KD averages the teachers' probabilities; the KL to that mixture is the one loss
# defined on it (flows/config.py StudentsConfig._multi_teacher_losses refuses the rest too)
MULTI_TEACHER_LOSSES = ("kd",)


def rescale(scaled: Tensor, stored_temperature: float, temperature: float) -> Tensor:
    """Scaled logits at another temperature: s·(T/T') = z/T'. The one place a stored (or
    online, T = 1) teacher's logits change temperature; same fp32 product as storage.rescale."""
    factor = float(stored_temperature) / float(temperature)
    return scaled if factor == 1.0 else scaled * factor


def teacher_side(scaled: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Teachers' logits already at the student temperature, a_m = z_m/T' ((B, C) each) ->
    p = mean_m softmax(a_m) (B, C) and Σ_c p log p (B,), with 0·log 0 = 0; no gradient.

    Written out (max, exp, sum) rather than torch.softmax, whose kernel over a short last
    dimension (C = 10) measured 6x slower; logits are finite (the writer refuses NaN/Inf),
    so a − max is finite and p = 0 only by underflow. Multi-teacher averaging: Hinton et al.
    2015 (ensemble soft targets), You et al. 2017 ("Learning from Multiple Teacher Networks")."""
    if len(scaled) == 1:
        a = scaled[0].detach().float()
        a = a - a.amax(-1, keepdim=True)                         # (B, C), max 0 per row
        e = a.exp()
        total = e.sum(-1, keepdim=True)                          # (B, 1), >= 1
        p = e / total
        neg_h = (p * a).sum(-1) - total[:, 0].log()              # Σ p (a − log Σe)
        return p, neg_h
    a = torch.stack([s.detach().float() for s in scaled])                 # (M, B, C)
    a = a - a.amax(-1, keepdim=True)
    e = a.exp()
    p = (e / e.sum(-1, keepdim=True)).mean(0)                    # the teachers' mixture
    neg_h = (p * p.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)
    return p, neg_h


class Objective:
    """The student's loss for one training run. Build with `from_config`; see the module doc.

    mode: "hard" | "stored" | "online"; loss: one of LOSSES (ignored in mode "hard");
    temperature: the student's T'; stored_temperatures: the stored T of each teacher, primary
    first (mode "stored"); kind: "dense" | "topk" (mode "stored"); teacher: the online teacher;
    hint: the FitNets regressor when hint_weight or rkd_weight > 0; source: names the soft
    labels in error messages.
    """

    def __init__(self, *, mode: str, loss: str = "kd", temperature: float = 4.0, alpha: float = 0.0,
                 hint_weight: float = 0.0, rkd_weight: float = 0.0, stored_temperatures: Sequence[float] = (),
                 kind: str = "dense", teacher: nn.Module | None = None, hint: HintLoss | None = None,
                 source: str = "the soft labels"):
        if mode not in ("hard", "stored", "online"):
            raise ValueError(f"mode must be one of ['hard', 'stored', 'online'], got {mode!r}")
        if loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {list(LOSSES)}, got {loss!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"TrainConfig.temperature must be finite and > 0, got {temperature!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"TrainConfig.alpha must be in [0, 1], got {alpha!r}")
        self.mode, self.loss, self.temperature, self.alpha = mode, loss, float(temperature), float(alpha)
        self.hint_weight, self.rkd_weight = float(hint_weight), float(rkd_weight)
        self.stored_temperatures = [float(t) for t in stored_temperatures]
        self.kind, self.teacher, self.hint, self.source = kind, teacher, hint, source
        if mode == "stored" and not self.stored_temperatures:
            raise ValueError("mode 'stored' needs the stored temperature of each teacher (stored_temperatures)")
        if mode != "stored" and self.stored_temperatures:
            raise ValueError(f"stored_temperatures are for mode 'stored' only (mode={mode!r})")
        if (mode == "online") != (teacher is not None):
            raise ValueError(f"teacher= is required for mode 'online' and only allowed there (mode={mode!r})")
        if mode != "hard":
            self._check_loss()
        if (self.hint_weight or self.rkd_weight) and mode == "hard":
            raise ValueError("hint_weight/rkd_weight need a teacher feature: use mode 'stored' or 'online'")
        if (self.hint_weight or self.rkd_weight) and hint is None:
            raise ValueError("hint_weight/rkd_weight > 0 need the hint regressor (hint=HintLoss(...))")
        self.needs_features = hint is not None and mode != "hard"
        names = ["loss"]
        if mode == "hard" or self.alpha > 0:
            names.append("task_loss")
        if mode != "hard" and self.alpha < 1:
            names.append("kd_loss")
        if self.needs_features and self.hint_weight:
            names.append("hint_loss")
        if self.needs_features and self.rkd_weight:
            names.append("rkd_loss")
        self.term_names: tuple[str, ...] = tuple(names)

    def _check_loss(self) -> None:
        loss, n = self.loss, len(self.stored_temperatures)
        if self.mode == "online" and loss == "topk_kl":
            raise ValueError("loss='topk_kl' needs stored top-k labels; online KD has the dense teacher: "
                             "use 'kd', 'soft_ce' or 'mse' (TrainConfig.loss / students.losses)")
        if n > 1 and loss not in MULTI_TEACHER_LOSSES:
            raise ValueError(f"loss={loss!r} cannot be used with several teachers' soft labels ({n} given): "
                             f"multi-teacher distillation is defined for loss='kd' only "
                             f"(TrainConfig.loss / students.losses with students.extra_soft_labels)")
        if self.mode != "stored":
            return
        if self.kind == "topk" and loss != "topk_kl":
            raise ValueError(f"{self.source} are top-k: only loss='topk_kl' can use them, got {loss!r} "
                             f"(TrainConfig.loss / students.losses)")
        if self.kind == "dense" and loss == "topk_kl":
            raise ValueError(f"loss='topk_kl' needs top-k soft labels; {self.source} stores dense logits "
                             f"(use 'kd', 'soft_ce' or 'mse')")
        T = self.stored_temperatures[0]
        if loss == "topk_kl" and not math.isclose(self.temperature, T, rel_tol=1e-9):
            raise ValueError(f"loss='topk_kl' is exact only at the stored temperature {T}; "
                             f"got TrainConfig.temperature={self.temperature}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg, mode: str, *, stream=None, teacher: nn.Module | None = None,
                    model: nn.Module | None = None, data=None, ddp: bool = False, device=None) -> "Objective":
        """From a TrainConfig (loss, temperature, alpha, hint_weight, rkd_weight), the stream's
        stored temperatures and representation (mode "stored"), and the online teacher. Builds
        the hint regressor (student feature width -> teacher feature width) when needed."""
        kw = dict(mode=mode, loss=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha, teacher=teacher)
        if stream is not None:
            kw.update(stored_temperatures=[stream.temperature, *stream.extra_temperatures], kind=stream.kind,
                      source=f"soft labels at {stream.uri}")
        obj = cls(**kw)                       # the loss refusals first, before any hint set-up
        if cfg.hint_weight or cfg.rkd_weight:
            obj = cls(**kw, hint_weight=cfg.hint_weight, rkd_weight=cfg.rkd_weight,
                      hint=_build_hint(mode, model, stream, teacher, data, ddp, device))
        return obj

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective itself (the hint regressor), for the optimizer."""
        return list(self.hint.parameters()) if self.hint is not None else []

    def forward(self, net: nn.Module, raw: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The student's forward as this objective needs it: (logits, features or None).
        Feature losses run raw.features / raw.head (DDP is refused with them)."""
        if not self.needs_features:
            return net(x), None
        feats = raw.features(x)                                      # (B, F_s)
        return raw.head(feats), feats

    # ------------------------------------------------------------------ the loss

    def __call__(self, logits: Tensor, batch: dict, feats: Tensor | None = None) -> dict[str, Tensor]:
        w = batch["weight"]
        terms: dict[str, Tensor] = {}
        if self.mode == "hard":
            terms["task_loss"] = _task_loss(logits, batch["y"], w)
            return {"loss": terms["task_loss"], **terms}
        t_feat = batch.get("teacher_feature")
        teachers, temps = None, None                                 # top-k: the stored columns as they are
        if self.mode == "online":
            t_logits, t_feat = self._run_teacher(batch["x"])
            teachers, temps = [t_logits], [1.0]                      # raw z = z / 1
        elif self.kind == "dense":
            extra = batch.get("extra_stored_logits")
            teachers = [batch["stored_logits"], *(extra if extra is not None else ())]
            temps = self.stored_temperatures
            if len(teachers) != len(temps):
                raise ValueError(f"the batch holds {len(teachers)} teachers' logits, the objective was "
                                 f"built for {len(temps)}")
        alpha = self.alpha
        total = None
        if alpha > 0:
            terms["task_loss"] = _task_loss(logits, batch["y"], w)
            total = terms["task_loss"] if alpha == 1 else alpha * terms["task_loss"]
        if alpha < 1:
            kd = terms["kd_loss"] = self._kd_loss(logits, batch, w, teachers, temps)
            kd = kd if alpha == 0 else (1.0 - alpha) * kd
            total = kd if total is None else total + kd
        if self.needs_features:
            keep = w > 0                                             # pad rows carry no information
            s, t = feats[keep].flatten(1), t_feat[keep].flatten(1)
            if self.hint_weight:
                terms["hint_loss"] = self.hint(s, t)                 # FitNets (Romero et al. 2015)
                total = total + self.hint_weight * terms["hint_loss"]
            if self.rkd_weight:
                # RKD distance (Park et al. 2019) needs >= 3 rows for a non-trivial relation
                terms["rkd_loss"] = rkd_distance_loss(s, t) if len(s) > 2 else logits.new_zeros((), dtype=torch.float32)
                total = total + self.rkd_weight * terms["rkd_loss"]
        return {"loss": total, **terms}

    def _kd_loss(self, logits: Tensor, batch: dict, w: Tensor, teachers, temps) -> Tensor:
        """The distillation term of self.loss (formulas and citations in pipeline/objectives/dense.py)."""
        T = self.temperature
        if self.loss == "topk_kl":
            # T²·KL over k+1 buckets; stored z/T are exact only at T' = T (checked at construction)
            return topk_kl_loss(logits, batch["topk_indices"], batch["topk_logits"], batch["logsumexp"],
                                temperature=T, weights=w)
        if self.loss == "mse":
            # Ba & Caruana 2014: mean (s − z)² on RAW logits, z = s_stored · T (rescale to T' = 1)
            return logit_mse(logits, rescale(teachers[0], temps[0], 1.0), weights=w)
        # kd / soft_ce: the teachers' soft targets p = mean_m softmax(z_m / T')
        p, neg_h = teacher_side([rescale(z, t, T) for z, t in zip(teachers, temps)])
        if self.loss == "kd":
            # Hinton et al. 2015: T'²·KL(p ‖ softmax(s/T'))
            return soft_kl_loss(logits, p, temperature=T, weights=w, teacher_neg_entropy=neg_h)
        # soft_ce: T'²·H(p, softmax(s/T')) = kd + T'²·H(p) (same gradient, Hinton et al. 2015)
        return soft_target_cross_entropy(logits, p, temperature=T, from_logits=False, weights=w)

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


def _task_loss(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Hard-label cross-entropy at T = 1, fp32, weighted per-row mean: Σ_b w_b CE_b / Σ_b w_b."""
    return row_mean(F.cross_entropy(logits.float(), y.long(), reduction="none"), w)


def _build_hint(mode: str, model, stream, teacher, data, ddp: bool, device) -> HintLoss:
    """The hint regressor (student feature -> teacher feature) when hint/RKD losses are on."""
    if mode == "hard":
        raise ValueError("hint_weight/rkd_weight need a teacher feature: use mode 'stored' or 'online'")
    if ddp:
        raise ValueError("hint_weight/rkd_weight are not supported with DDP yet (they bypass the DDP wrapper)")
    if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ValueError("hint/RKD losses need a student with .features(x) and a Linear .head "
                         "(pipeline.models.registry builders have both)")
    if mode == "stored":
        feat = stream.manifest.get("feature")
        if not feat:
            raise ValueError(f"soft labels at {stream.uri} store no teacher feature; label with "
                             f"feature_layer=... to use hint_weight/rkd_weight")
        t_dim = int(np.prod(feat["shape"]))
    else:
        if not hasattr(teacher, "features"):
            raise ValueError("online hint/RKD losses need a teacher with .features(x)")
        with torch.inference_mode():
            t_dim = teacher.features(model_inputs(data, [0], [0]).to(device)).reshape(1, -1).shape[1]
    return HintLoss(model.head.in_features, t_dim).to(device)
