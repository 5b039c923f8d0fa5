"""One explicit training loop for every model distillery trains.

    mode="stored"  student from stored soft labels (StoredLabelStream through a DataLoader)
    mode="hard"    hard-label cross-entropy (the baseline; the teacher, with augmentation)
    mode="online"  classic KD: the teacher runs on every batch, same losses as "stored"

Read `train()` top to bottom: set up (device, DDP, data, optimizer, schedule, resume),
then `for epoch: for batch: forward, objective, backward, step`, then evaluate, keep the
best weights, log, checkpoint. Components live elsewhere: what the student minimises in
pipeline/objectives/objective.py (built once from the config), the losses in pipeline/objectives/dense.py, the
batches in pipeline/training/stream.py.

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

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from pipeline.models.checkpoint import atomic_torch_save
from pipeline.data.datasets import Source
from pipeline.device import resolve_device
from pipeline.evaluate import accuracy, predict_logits
from pipeline.objectives.objective import LOSSES, Objective
from pipeline.training.stream import HardLabelBatches, StoredLabelStream, keep_batch
from pipeline.views.images import ViewSpec

MODES = ("stored", "hard", "online")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("cpu", "cuda", "auto")
WORKER_STARTS = ("fork", "spawn", "forkserver")
# set by the recipe, not by a config's training section: paths, and a student's loss,
# temperature and alpha, which come from the sweep grid (flows/config.py builds the
# section from the other fields of TrainConfig: one training schema)
RECIPE_FIELDS = ("loss", "temperature", "alpha", "log_path", "ckpt_path")
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
    worker_start: str = "forkserver"    # DataLoader worker start method: "fork" | "spawn" | "forkserver";
                                        # not fork by default: a fork inherits the parent's threads (a Prefect
                                        # engine's, a storage pool's) in whatever state they are
    device: str = "auto"                # "cpu" | "cuda" | "auto"
    eval_every: int = 1                 # epochs between val evaluations (the last epoch always)
    log_path: str | None = None         # JSON lines, one record per epoch
    ckpt_path: str | None = None        # training checkpoint for resume

    def __post_init__(self):
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES),
                              ("device", DEVICES), ("worker_start", WORKER_STARTS)):
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

def train(model: nn.Module, cfg: TrainConfig, *, mode: str, train_data: Source,
          val_data: Source | None = None, soft_labels: str | list[str] | None = None,
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
                                   extra_soft_labels=uris[1:])
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
    # what the student minimises (loss, T', alpha, hint/RKD, teachers); refuses what is undefined
    objective = Objective.from_config(cfg, mode, stream=stream, teacher=teacher, model=raw, data=train_data,
                                      ddp=ddp, device=device)
    hint = objective.hint
    names = objective.term_names                          # ("loss", "task_loss"?, "kd_loss"?, ...)

    opt = make_optimizer(list(raw.parameters()) + objective.parameters(), cfg)
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
        term_sums = torch.zeros(len(names), dtype=torch.float64, device=device)  # Σ_batches term · Σ weight
        w_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            if numpy_batches:  # from CPU DataLoader workers (StoredLabelStream.worker_numpy); shares memory
                batch = {k: torch.from_numpy(v) for k, v in batch.items()}
            if on_batch is not None:
                on_batch(epoch, batch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits, feats = objective.forward(net, raw, batch["x"])   # (B, C), features if hint/RKD
            terms = objective(logits, batch, feats)                   # {"loss", "task_loss", "kd_loss", ...}
            loss = terms["loss"]                                      # (an online teacher runs in there)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            bw = batch["weight"].sum()
            vals = [terms[k] for k in names]                          # alpha 0: kd_loss is the loss itself
            term_sums += (loss.detach().double() if all(v is loss for v in vals)
                          else torch.stack(vals).detach().double()) * bw
            w_sum += bw.double()
        if ddp:  # global mean loss and sample count over ranks
            dist.all_reduce(term_sums)
            dist.all_reduce(w_sum)
        train_seconds = time.perf_counter() - t0

        # ---- evaluate (rank 0; the result is broadcast so every rank stops together)
        val_acc = None
        if val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            if rank == 0:
                val_acc = accuracy(predict_logits(raw, val_data, device=device), val_data.y)
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
        means = (term_sums / w_sum.clamp_min(1e-12)).tolist()  # per-row means over the epoch
        record = {"epoch": epoch, "step": step, "train_loss": means[0],
                  "val_acc": val_acc, "lr": lr, "seconds": seconds,
                  "samples_per_s": float(w_sum) / max(train_seconds, 1e-9), "best_val_acc": best_acc,
                  **dict(zip(names[1:], means[1:]))}    # the named terms: task_loss, kd_loss, hint_loss, rkd_loss
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
