"""One explicit training loop for every model distillery trains.

    mode="stored"  student from stored soft labels (StoredLabelStream through a DataLoader)
    mode="hard"    hard-label cross-entropy (the baseline; the teacher, with augmentation)
    mode="online"  classic KD: the teacher runs on every batch, same losses as "stored"

Read `train()` top to bottom: set up (device, DDP, data, optimizer, schedule, resume),
then `for epoch: for batch: forward, loss, backward, step`, then evaluate, keep the
best weights, log, checkpoint. Components (losses, streams, metrics) live elsewhere.

Resume: every epoch rank 0 writes a training checkpoint (model, optimizer, scheduler,
epoch, best state, per-rank RNG states, history) atomically. train(..., resume=True)
continues after the last completed epoch; because data order is a pure function of
(seed, epoch) and the RNG state is restored, the result is identical to a run that was
never interrupted (on CPU; CUDA kernels may not be bitwise deterministic).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import atomic_torch_save
from .data import ArrayDataset
from .device import resolve_device
from .evaluate import accuracy, predict_logits
from .losses import (HintLoss, _row_mean, distillation_loss, logit_mse, multi_teacher_probs, rkd_distance_loss,
                     soft_kl_loss, soft_target_cross_entropy, topk_kl_loss)
from .stream import HardLabelBatches, StoredLabelStream, keep_batch
from .views import ViewSpec

MODES = ("stored", "hard", "online")
LOSSES = ("kd", "soft_ce", "mse", "topk_kl")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("cpu", "cuda", "auto")
# Seeding torch's global RNG and drawing from it (model init) must not interleave between
# threads (a sweep trains students in parallel threads): whoever seeds or builds holds this.
GLOBAL_RNG_LOCK = threading.RLock()
# config fields that may change between an interrupted run and its resume
RESUME_FREE = ("num_workers", "worker_start", "device", "log_path", "ckpt_path", "eval_every")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"            # "adamw" | "sgd"
    weight_decay: float = 0.0
    momentum: float = 0.9               # sgd only
    schedule: str = "cosine"            # "cosine" | "step" | "constant", per optimizer step
    warmup_steps: int = 0               # linear warm-up before the schedule
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # "step": x step_gamma at these fractions of training
    step_gamma: float = 0.1
    loss: str = "kd"                    # "kd" | "soft_ce" | "mse" | "topk_kl" (ignored in mode "hard")
    temperature: float = 4.0            # distillation T (may differ from the stored T, except topk_kl)
    alpha: float = 0.0                  # weight of hard-label CE; soft term gets 1 - alpha
    hint_weight: float = 0.0            # + w * FitNets hint loss on the teacher feature (stored or online)
    rkd_weight: float = 0.0             # + w * RKD distance loss on the same features
    grad_clip: float | None = None      # max global grad norm
    patience: int | None = None         # early stopping: evaluations without val-acc gain
    seed: int = 0
    num_workers: int = 0                # DataLoader workers for mode "stored"
    worker_start: str = "fork"          # DataLoader worker start method: "fork" | "spawn" | "forkserver";
                                        # inside a Prefect task use "forkserver": a fork inherits its threads
    device: str = "auto"                # "cpu" | "cuda" | "auto"
    eval_every: int = 1                 # epochs between val evaluations (the last epoch always)
    log_path: str | None = None         # JSON lines, one record per epoch
    ckpt_path: str | None = None        # training checkpoint for resume

    def __post_init__(self):
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES),
                              ("device", DEVICES), ("worker_start", ("fork", "spawn", "forkserver"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "num_workers", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "momentum", "step_gamma", "hint_weight", "rkd_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"TrainConfig.temperature must be finite and > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TrainConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"TrainConfig.patience must be an int >= 1 or None, got {self.patience!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        self.step_milestones = tuple(float(m) for m in self.step_milestones)
        if any(not 0 < m <= 1 for m in self.step_milestones):
            raise ValueError(f"TrainConfig.step_milestones must be fractions in (0, 1], got {self.step_milestones}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists: JSON/weights_only safe


# ---------------------------------------------------------------- components

def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]  # frozen params (finetune) are not stepped
    if not params:
        raise ValueError("the model has no trainable parameters (everything frozen?)")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_schedule(opt, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = cfg.warmup_steps

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.step_gamma ** sum(step >= m * total_steps for m in cfg.step_milestones)
        progress = min((step - warm) / max(total_steps - warm, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _weighted_ce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), y, reduction="none")  # (B,) fp32
    return _row_mean(ce, w)  # the same weighting as every soft loss (pad rows 0)


def compute_loss(cfg: TrainConfig, mode: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Scalar fp32 loss; every term is a per-row mean weighted by batch["weight"] (pad rows 0)."""
    w, y = batch["weight"], batch["y"]
    if mode == "hard":
        return _weighted_ce(logits, y, w)
    T = cfg.temperature
    if cfg.loss == "kd" and "teacher_probs" in batch:  # the stream did the teachers' side at T
        soft = soft_kl_loss(logits, batch["teacher_probs"], temperature=T, weights=w,
                            teacher_neg_entropy=batch["teacher_neg_entropy"])
        return soft if cfg.alpha == 0 else cfg.alpha * _weighted_ce(logits, y, w) + (1 - cfg.alpha) * soft
    if "extra_teacher_logits" in batch:  # multi-teacher: average the teachers' probabilities at T
        teachers = [batch["teacher_logits"] / T, *(z / T for z in batch["extra_teacher_logits"])]
        soft = soft_kl_loss(logits, multi_teacher_probs(teachers), temperature=T, weights=w)
        return soft if cfg.alpha == 0 else cfg.alpha * _weighted_ce(logits, y, w) + (1 - cfg.alpha) * soft
    if cfg.loss == "kd":  # Hinton KD already mixes in alpha * CE
        return distillation_loss(logits, batch["teacher_logits"], y if cfg.alpha > 0 else None,
                                 temperature=T, alpha=cfg.alpha, weights=w)
    if cfg.loss == "topk_kl":
        soft = topk_kl_loss(logits, batch["topk_indices"], batch["topk_logits"], batch["logsumexp"],
                            temperature=T, weights=w)
    elif cfg.loss == "soft_ce":
        soft = soft_target_cross_entropy(logits, batch["teacher_logits"], temperature=T, weights=w)
    else:  # "mse" on raw logits (Ba & Caruana)
        soft = logit_mse(logits, batch["teacher_logits"], weights=w)
    return soft if cfg.alpha == 0 else cfg.alpha * _weighted_ce(logits, y, w) + (1 - cfg.alpha) * soft


def _check_soft_source(cfg: TrainConfig, mode: str, stream: StoredLabelStream | None) -> None:
    if mode == "online" and cfg.loss == "topk_kl":
        raise ValueError("loss='topk_kl' needs stored top-k labels; online KD has the dense teacher: "
                         "use 'kd', 'soft_ce' or 'mse'")
    if stream is None:
        return
    if stream.kind == "topk" and cfg.loss != "topk_kl":
        raise ValueError(f"soft labels at {stream.uri} are top-k: only loss='topk_kl' can use them, got {cfg.loss!r}")
    if stream.kind == "dense" and cfg.loss == "topk_kl":
        raise ValueError(f"loss='topk_kl' needs top-k soft labels; {stream.uri} stores dense logits "
                         f"(use 'kd', 'soft_ce' or 'mse')")
    if cfg.loss == "topk_kl" and not math.isclose(cfg.temperature, stream.temperature, rel_tol=1e-9):
        raise ValueError(f"loss='topk_kl' is exact only at the stored temperature {stream.temperature}; "
                         f"got TrainConfig.temperature={cfg.temperature}")


def _feature_losses(cfg: TrainConfig, mode: str, model: nn.Module, stream, teacher, data, ddp: bool,
                    device) -> HintLoss | None:
    """The hint regressor (student feature -> teacher feature) when hint/RKD losses are on."""
    if cfg.hint_weight == 0 and cfg.rkd_weight == 0:
        return None
    if mode == "hard":
        raise ValueError("hint_weight/rkd_weight need a teacher feature: use mode 'stored' or 'online'")
    if ddp:
        raise ValueError("hint_weight/rkd_weight are not supported with DDP yet (they bypass the DDP wrapper)")
    if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ValueError("hint/RKD losses need a student with .features(x) and a Linear .head "
                         "(pipeline.models builders have both)")
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
            t_dim = teacher.features(torch.from_numpy(data.x[:1]).to(device)).reshape(1, -1).shape[1]
    return HintLoss(model.head.in_features, t_dim).to(device)


def _feature_loss(cfg: TrainConfig, hint: HintLoss, feats: torch.Tensor, batch: dict) -> torch.Tensor:
    """hint_weight * FitNets hint + rkd_weight * RKD distance, on rows with weight > 0."""
    keep = batch["weight"] > 0                        # pad rows carry no information
    s, t = feats[keep].flatten(1), batch["teacher_feature"][keep].flatten(1)
    loss = feats.new_zeros((), dtype=torch.float32)
    if cfg.hint_weight:
        loss = loss + cfg.hint_weight * hint(s, t)
    if cfg.rkd_weight and len(s) > 2:
        loss = loss + cfg.rkd_weight * rkd_distance_loss(s, t)
    return loss


def _freeze_frozen_norms(model: nn.Module) -> None:
    # A norm layer whose affine params are frozen keeps its running statistics frozen
    # too (eval mode), so a frozen backbone is really unchanged by fine-tuning.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            ps = list(m.parameters(recurse=False))
            if ps and not any(p.requires_grad for p in ps):
                m.eval()


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _append_jsonl(path: str, records: list[dict], *, truncate: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w" if truncate else "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def resume_key(cfg: TrainConfig) -> dict:
    """The training config as far as it decides the result (RESUME_FREE fields left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}


def lineage_diff(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts (a missing key differs)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in lineage_diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


def _load_resume(cfg: TrainConfig, lineage: dict | None = None) -> dict | None:
    if cfg.ckpt_path is None:
        raise ValueError("resume=True needs TrainConfig.ckpt_path")
    if not os.path.exists(cfg.ckpt_path):
        return None  # nothing to resume: a fresh run (makes retries idempotent)
    ck = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
    if lineage is not None and ck.get("lineage") != lineage:
        # another run's state (other data, labels, views...): continuing it would train, or
        # report as trained, a model of that run. Start over, and say so.
        why = (", ".join(lineage_diff(ck["lineage"], lineage)) + " differ" if ck.get("lineage") is not None
               else "it records no lineage")
        print(f"{cfg.ckpt_path}: not resuming, it belongs to another run ({why}); training from scratch")
        return None
    old, new = ck["config"], cfg.to_dict()
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {new[k]!r}" for k in new
            if k not in RESUME_FREE and old.get(k) != new[k]]
    if diff:
        raise ValueError(f"cannot resume {cfg.ckpt_path} with a different config:\n  " + "\n  ".join(diff))
    return ck


# ---------------------------------------------------------------- the loop

def train(model: nn.Module, cfg: TrainConfig, *, mode: str, train_data: ArrayDataset,
          val_data: ArrayDataset | None = None, soft_labels: str | list[str] | None = None,
          view_spec: ViewSpec | None = None, num_views: int | None = None,
          teacher: nn.Module | None = None, storage_options: dict | None = None,
          expect: dict | None = None, resume: bool = False, lineage: dict | None = None,
          on_batch: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` in place; at the end it holds the best (by val accuracy) weights.

    stored: soft_labels = URI of the stored labels (or a list: several teachers of the same
    inputs, whose probabilities are averaged); train_data = inputs holding their ids.
    hard / online: batches from train_data, augmented with view_spec (fresh views per
    epoch, or ids in [0, num_views)); online needs `teacher`.
    on_batch(epoch, batch) is called for every batch (tests, instrumentation).
    lineage: a JSON dict naming what the run is a function of (data fingerprints, labels,
    views...); it is written into the resume checkpoint, and resume=True continues only a
    checkpoint with the same lineage: any other starts from scratch (printing why).
    Returns {best_val_acc, best_epoch, epochs_run, epochs_trained (this call), steps,
    stopped_early, seconds, history}.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if (mode == "stored") != (soft_labels is not None):
        raise ValueError(f"soft_labels= is required for mode 'stored' and only allowed there (mode={mode!r})")
    if (mode == "online") != (teacher is not None):
        raise ValueError(f"teacher= is required for mode 'online' and only allowed there (mode={mode!r})")
    if (mode == "hard" or cfg.alpha > 0) and train_data.y is None:
        raise ValueError(f"dataset {train_data.name!r} is unlabeled: mode 'hard' and alpha > 0 need labels")
    if mode == "stored" and not isinstance(soft_labels, str) and len(soft_labels) > 1 and cfg.loss != "kd":
        # multi-teacher KD averages the teachers' probabilities; only the KL ("kd") is defined on them
        raise ValueError(f"loss={cfg.loss!r} cannot be used with several teachers' soft labels "
                         f"({len(soft_labels)} given): multi-teacher distillation is defined for loss='kd' only")
    if cfg.patience is not None and val_data is None:
        raise ValueError("early stopping (patience) needs val_data")

    # ---- setup: device, distributed, data
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = resolve_device(cfg.device)
    raw = model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    stream, numpy_batches = None, False
    if mode == "stored":
        uris = [soft_labels] if isinstance(soft_labels, str) else list(soft_labels)  # [primary, *more teachers]
        stream = StoredLabelStream(uris[0], train_data, view_spec, batch_size=cfg.batch_size, seed=cfg.seed,
                                   rank=rank, world_size=world, storage_options=storage_options, expect=expect,
                                   extra_soft_labels=uris[1:],
                                   kd_temperature=cfg.temperature if cfg.loss == "kd" else None)
        if cfg.num_workers == 0:  # iterate in-process: a DataLoader adds per-batch overhead and nothing else
            batches = stream
        else:  # own generator: DataLoader must not draw from the global RNG (resume equality)
            # on CPU workers hand over numpy arrays (pickled, no per-tensor fd passing); CUDA keeps
            # tensors so that the loader can pin them
            stream.worker_numpy = numpy_batches = device.type != "cuda"
            batches = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=True,
                                 pin_memory=device.type == "cuda", multiprocessing_context=cfg.worker_start,
                                 collate_fn=keep_batch if stream.worker_numpy else None,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        steps_per_epoch, sampler = stream.num_batches(cfg.num_workers), stream
    else:
        sampler = batches = HardLabelBatches(train_data, batch_size=cfg.batch_size, view_spec=view_spec,
                                             num_views=num_views, seed=cfg.seed, rank=rank, world_size=world)
        steps_per_epoch = batches.num_batches()
    _check_soft_source(cfg, mode, stream)
    hint = _feature_losses(cfg, mode, raw, stream, teacher, train_data, ddp, device)

    opt = make_optimizer(list(raw.parameters()) + (list(hint.parameters()) if hint is not None else []), cfg)
    sched = make_schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    with GLOBAL_RNG_LOCK:  # dropout etc.; model init happened before train()
        torch.manual_seed(cfg.seed + rank)

    # ---- resume
    start_epoch, step, seconds_before = 0, 0, 0.0
    best_acc, best_epoch, best_state, bad_evals, stopped, history = None, None, None, 0, False, []
    ck = _load_resume(cfg, lineage) if resume else None
    if ck is not None:
        raw.load_state_dict(ck["model"])
        if hint is not None:
            hint.load_state_dict(ck["hint"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, step, seconds_before = ck["epoch"], ck["step"], ck["seconds"]
        best_acc, best_epoch, best_state = ck["best_acc"], ck["best_epoch"], ck["best_state"]
        bad_evals, stopped, history = ck["bad_evals"], ck["stopped_early"], ck["history"]
        rngs = ck["rng"]
        _set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    if rank == 0 and cfg.log_path:  # the log always mirrors the checkpoint's history
        _append_jsonl(cfg.log_path, history, truncate=True)
    net = raw
    if ddp:
        net = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- epochs
    t_start = time.perf_counter()
    end_epoch = start_epoch if stopped else cfg.epochs  # a run that stopped early stays stopped
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        net.train()
        _freeze_frozen_norms(raw)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum_b loss_b * weight_b
        w_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            if numpy_batches:  # from CPU DataLoader workers (StoredLabelStream.worker_numpy); shares memory
                batch = {k: torch.from_numpy(v) for k, v in batch.items()}
            if on_batch is not None:
                on_batch(epoch, batch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if teacher is not None:  # online KD: same views as the student sees
                with torch.inference_mode():
                    t_feat = teacher.features(batch["x"]).float() if hint is not None else None
                    t_logits = teacher.head(t_feat) if hint is not None else teacher(batch["x"]).float()
                batch["teacher_logits"] = t_logits.float().clone()  # a normal tensor, usable in autograd
                if t_feat is not None:
                    batch["teacher_feature"] = t_feat.clone()
            if hint is None:
                logits = net(batch["x"])                     # (B, C)
                loss = compute_loss(cfg, mode, logits, batch)
            else:
                feats = raw.features(batch["x"])             # (B, F_s); DDP is refused with feature losses
                logits = raw.head(feats)                     # (B, C)
                loss = compute_loss(cfg, mode, logits, batch) + _feature_loss(cfg, hint, feats, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            bw = batch["weight"].sum()
            loss_sum += loss.detach().double() * bw
            w_sum += bw.double()
        if ddp:  # global mean loss and sample count over ranks
            dist.all_reduce(loss_sum)
            dist.all_reduce(w_sum)
        train_seconds = time.perf_counter() - t0

        # ---- evaluate (rank 0; the result is broadcast so every rank stops together)
        val_acc = None
        if val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            if rank == 0:
                val_acc = accuracy(predict_logits(raw, val_data.x, device=device), val_data.y)
            if ddp:
                box = [val_acc]
                dist.broadcast_object_list(box, src=0)
                val_acc = box[0]
            improved = best_acc is None or val_acc > best_acc
            if improved or val_acc == best_acc:  # a tie keeps the later, more trained weights...
                best_acc, best_epoch = val_acc, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
            bad_evals = 0 if improved else bad_evals + 1  # ...but only a gain resets patience
            stopped = cfg.patience is not None and bad_evals >= cfg.patience

        # ---- log + checkpoint
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "step": step, "train_loss": float(loss_sum / w_sum.clamp_min(1e-12)),
                  "val_acc": val_acc, "lr": lr, "seconds": seconds,
                  "samples_per_s": float(w_sum) / max(train_seconds, 1e-9), "best_val_acc": best_acc}
        history.append(record)
        rngs = [_rng_state()]
        if ddp and cfg.ckpt_path:  # each rank's RNG (dropout masks differ per rank)
            rngs = [None] * world
            dist.all_gather_object(rngs, _rng_state())
        if rank == 0:
            if cfg.ckpt_path:
                atomic_torch_save({
                    "model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "hint": hint.state_dict() if hint is not None else None,
                    "epoch": epoch + 1, "step": step, "seconds": seconds_before + time.perf_counter() - t_start,
                    "best_acc": best_acc, "best_epoch": best_epoch, "best_state": best_state,
                    "bad_evals": bad_evals, "stopped_early": stopped, "history": history, "rng": rngs,
                    "config": cfg.to_dict(), "lineage": lineage}, cfg.ckpt_path)
            if cfg.log_path:
                _append_jsonl(cfg.log_path, [record])
        if stopped:
            break

    # ---- finish: the best weights, not the last
    if best_state is not None:
        raw.load_state_dict(best_state)
    return {"best_val_acc": best_acc, "best_epoch": best_epoch, "epochs_run": len(history),
            "epochs_trained": len(history) - start_epoch, "steps": step,
            "stopped_early": stopped, "seconds": seconds_before + time.perf_counter() - t_start,
            "history": cfg.log_path, "last_epoch": history[-1] if history else None}
