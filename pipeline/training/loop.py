"""One explicit training loop for every model distillery trains, of every task.

    labels=URI     a student from stored soft labels (a LabelStream through a DataLoader)
    loss "ce"      hard labels / next tokens (a baseline; the teacher, with augmentation)
    teacher=model  classic online KD: the teacher runs on every batch, same losses as stored

Read `train()` top to bottom: set up (device, DDP, data, objective, optimizer, schedule,
resume), then `for epoch: for batch: objective (forward + loss), backward, step`, then
validate, keep the best weights, log, checkpoint. The task (pipeline/tasks: what a batch
holds, what a row counts, the validation metric and its direction) comes from the data;
what the model minimises from pipeline/objectives (built once from the config); the
batches from pipeline/training/stream.py and batches.py.

Resume: every epoch rank 0 writes a training checkpoint (model, optimizer, scheduler,
epoch, best state, per-rank RNG states, history) atomically. train(..., resume=True)
continues after the last completed epoch; because data order is a pure function of
(seed, epoch) and the RNG state is restored, the result is identical to a run that was
never interrupted (on CPU; CUDA kernels may not be bitwise deterministic).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from pipeline.device import resolve_device
from pipeline.models.checkpoint import atomic_torch_save
from pipeline.objectives.objective import Objective
from pipeline.tasks import task_of
from pipeline.training.batches import HardLabelBatches
from pipeline.training.config import RESUME_FREE, TrainConfig
from pipeline.training.stream import from_wire, keep_batch, open_label_stream
from pipeline.views.rng import GLOBAL_RNG_LOCK

if TYPE_CHECKING:
    from pipeline.views.base import Transform

# ---------------------------------------------------------------- components


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]  # frozen params (finetune) are not stepped
    if not params:
        raise ValueError("the model has no trainable parameters (everything frozen?)")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per optimizer step: linear warm-up to lr over warmup_steps, then constant, step
    decay (x step_gamma at step_milestones), or cosine from lr down to min_lr x lr."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.step_gamma ** sum(step >= m * total_steps for m in cfg.step_milestones)
        progress = min((step - warm) / max(total_steps - warm, 1), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cosine if cfg.min_lr == 0 else cfg.min_lr + (1.0 - cfg.min_lr) * cosine

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


def append_jsonl(path: str, records: list[dict], *, truncate: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w" if truncate else "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def lineage_diff(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts (a missing key differs)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in lineage_diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
        ]
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
        why = (
            ", ".join(lineage_diff(ck["lineage"], lineage)) + " differ"
            if ck.get("lineage") is not None
            else "it records no lineage"
        )
        print(f"{cfg.ckpt_path}: not resuming, it belongs to another run ({why}); training from scratch")
        return None
    old, new = ck["config"], cfg.to_dict()
    diff = [
        f"{k}: checkpoint {old.get(k)!r}, now {new[k]!r}" for k in new if k not in RESUME_FREE and old.get(k) != new[k]
    ]
    if diff:
        raise ValueError(f"cannot resume {cfg.ckpt_path} with a different config:\n  " + "\n  ".join(diff))
    return ck


def _better(task, value: float, best: float | None) -> bool:
    return best is None or (value > best if task.higher_is_better else value < best)


# ---------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    train_data: Any,
    val_data: Any = None,
    labels: str | list[str] | None = None,
    transform: Transform | None = None,
    num_views: int | None = None,
    teacher: nn.Module | None = None,
    storage_options: dict | None = None,
    expect: dict | None = None,
    public_key: str | bytes | None = None,
    resume: bool = False,
    lineage: dict | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train `model` in place; at the end it holds the best weights by the task's
    validation metric (accuracy, perplexity) on val_data.

    cfg.loss "ce": hard labels (next tokens) of train_data, augmented with `transform`
    (fresh views per epoch, or ids in [0, num_views)). Any other loss learns from
    `labels` (the URI of stored labels of train_data's rows, or a list: several teachers
    of the same inputs, whose probabilities are averaged) or from an online `teacher`.
    on_batch(epoch, batch) is called for every batch (progress, tests). public_key: the
    stored labels must be signed by this Ed25519 key (storage/signing.py).
    lineage: a JSON dict naming what the run is a function of (data fingerprints, labels,
    views...); it is written into the resume checkpoint, and resume=True continues only a
    checkpoint with the same lineage: any other starts from scratch (printing why).
    Returns {metric, best_val, best_epoch, epochs_run, epochs_trained (this call), steps,
    units (samples or tokens trained on, all epochs), stopped_early, seconds, history}.
    """
    hard = cfg.loss == "ce"
    if hard and (labels is not None or teacher is not None):
        raise ValueError("loss 'ce' trains on hard labels: give no labels= or teacher=")
    if not hard and (labels is None) == (teacher is None):
        raise ValueError(
            f"loss {cfg.loss!r} learns from a teacher: give stored labels= or an online teacher=, exactly one"
        )
    task = task_of(train_data)
    if (hard or cfg.alpha > 0) and not task.labelled(train_data):
        raise ValueError(f"dataset {train_data.name!r} is unlabeled: loss 'ce' and alpha > 0 need labels")
    if cfg.patience is not None and val_data is None:
        raise ValueError("early stopping (patience) needs val_data")
    task.prepare()

    # ---- setup: device, distributed, data
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = resolve_device(cfg.device)
    raw = model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    stream, numpy_batches = None, False
    if labels is not None:
        uris = [labels] if isinstance(labels, str) else list(labels)  # [primary, *more teachers]
        stream = open_label_stream(
            uris[0],
            train_data,
            transform,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
            storage_options=storage_options,
            expect=expect,
            extra_soft_labels=uris[1:],
            public_key=public_key,
        )
        if cfg.num_workers == 0:  # iterate in-process: a DataLoader adds per-batch overhead and nothing else
            batches = stream
        else:  # own generator: DataLoader must not draw from the global RNG (resume equality)
            # on CPU workers hand over numpy arrays (pickled, no per-tensor fd passing); CUDA keeps
            # tensors so that the loader can pin them
            stream.worker_numpy = numpy_batches = device.type != "cuda"
            batches = DataLoader(
                stream,
                batch_size=None,
                num_workers=cfg.num_workers,
                persistent_workers=True,
                pin_memory=device.type == "cuda",
                multiprocessing_context=cfg.worker_start,
                collate_fn=keep_batch if stream.worker_numpy else None,
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        steps_per_epoch, sampler = stream.num_batches(cfg.num_workers), stream
    else:
        sampler = batches = HardLabelBatches(
            train_data,
            batch_size=cfg.batch_size,
            transform=transform,
            num_views=num_views,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
        )
        steps_per_epoch = batches.num_batches()
    # what the model minimises (loss, T', alpha, hint/RKD, teachers); refuses what is undefined
    objective = Objective.from_config(
        cfg, stream=stream, teacher=teacher, model=raw, data=train_data, ddp=ddp, device=device
    )
    hint = objective.hint
    names = objective.term_names  # ("loss", "task_loss"?, "kd_loss"?, ...)

    opt = make_optimizer(list(raw.parameters()) + objective.parameters(), cfg)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:  # the schedule runs its course in max_steps
        total_steps = min(total_steps, cfg.max_steps)
    sched = make_schedule(opt, cfg, total_steps)
    with GLOBAL_RNG_LOCK:  # dropout etc.; model init happened before train()
        torch.manual_seed(cfg.seed + rank)

    # ---- resume
    start_epoch, step, units, seconds_before = 0, 0, 0.0, 0.0
    best, best_epoch, best_state, bad_evals, stopped, history = None, None, None, 0, False, []
    ck = _load_resume(cfg, lineage) if resume else None
    if ck is not None:
        raw.load_state_dict(ck["model"])
        if hint is not None:
            hint.load_state_dict(ck["hint"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, step, units, seconds_before = ck["epoch"], ck["step"], ck["units"], ck["seconds"]
        best, best_epoch, best_state = ck["best"], ck["best_epoch"], ck["best_state"]
        bad_evals, stopped, history = ck["bad_evals"], ck["stopped_early"], ck["history"]
        rngs = ck["rng"]
        _set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        if start_epoch < cfg.epochs and not stopped:
            print(f"{cfg.ckpt_path}: resuming after epoch {start_epoch} of {cfg.epochs} (step {step} of {total_steps})")
    if rank == 0 and cfg.log_path:  # the log always mirrors the checkpoint's history
        append_jsonl(cfg.log_path, history, truncate=True)
    net = raw
    if ddp:
        net = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- epochs
    t_start = time.perf_counter()
    # a run that stopped early (or reached max_steps) stays stopped
    end_epoch = start_epoch if stopped or step >= total_steps else cfg.epochs
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        net.train()
        _freeze_frozen_norms(raw)
        term_sums = torch.zeros(len(names), dtype=torch.float64, device=device)  # Σ_batches term · Σ weight
        w_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            if numpy_batches:  # from CPU DataLoader workers (LabelStream.worker_numpy); shares memory
                batch = from_wire(batch)
            if on_batch is not None:
                on_batch(epoch, batch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            terms = objective(net, batch)  # forward + {"loss", "task_loss", ...}
            loss = terms["loss"]  # (an online teacher runs in there)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            bw = task.units(batch)  # samples, or real tokens
            vals = [terms[k] for k in names]  # alpha 0: kd_loss is the loss itself
            term_sums += (
                loss.detach().double() if all(v is loss for v in vals) else torch.stack(vals).detach().double()
            ) * bw
            w_sum += bw.double()
            if step >= total_steps:  # max_steps: this epoch is the last
                break
        if ddp:  # global mean loss and unit count over ranks
            dist.all_reduce(term_sums)
            dist.all_reduce(w_sum)
        train_seconds = time.perf_counter() - t0
        units += float(w_sum)

        # ---- validate (rank 0; the result is broadcast so every rank stops together)
        val = None
        last = epoch + 1 == cfg.epochs or step >= total_steps
        if val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            if rank == 0:
                val = task.score(raw, val_data, device=device)
            if ddp:
                box = [val]
                dist.broadcast_object_list(box, src=0)
                val = box[0]
            improved = _better(task, val, best)
            if improved or val == best:  # a tie keeps the later, more trained weights...
                best, best_epoch = val, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
            bad_evals = 0 if improved else bad_evals + 1  # ...but only a gain resets patience
            stopped = cfg.patience is not None and bad_evals >= cfg.patience

        # ---- log + checkpoint
        seconds = time.perf_counter() - t0
        means = (term_sums / w_sum.clamp_min(1e-12)).tolist()  # per-unit means over the epoch
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": means[0],
            "val": val,
            "metric": task.metric,
            "lr": lr,
            "seconds": seconds,
            "throughput": float(w_sum) / max(train_seconds, 1e-9),
            "unit": task.unit,
            "best_val": best,
            **dict(zip(names[1:], means[1:])),
        }  # the named terms: task_loss, kd_loss, hint_loss, rkd_loss
        history.append(record)
        rngs = [_rng_state()]
        if ddp and cfg.ckpt_path:  # each rank's RNG (dropout masks differ per rank)
            rngs = [None] * world
            dist.all_gather_object(rngs, _rng_state())
        if rank == 0:
            if cfg.ckpt_path:
                atomic_torch_save(
                    {
                        "model": raw.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "hint": hint.state_dict() if hint is not None else None,
                        "epoch": epoch + 1,
                        "step": step,
                        "units": units,
                        "seconds": seconds_before + time.perf_counter() - t_start,
                        "best": best,
                        "best_epoch": best_epoch,
                        "best_state": best_state,
                        "bad_evals": bad_evals,
                        "stopped_early": stopped,
                        "history": history,
                        "rng": rngs,
                        "config": cfg.to_dict(),
                        "lineage": lineage,
                    },
                    cfg.ckpt_path,
                )
            if cfg.log_path:
                append_jsonl(cfg.log_path, [record])
        if stopped or step >= total_steps:
            break

    # ---- finish: the best weights, not the last
    if best_state is not None:
        raw.load_state_dict(best_state)
    seconds = seconds_before + time.perf_counter() - t_start
    return {
        "metric": task.metric,
        "best_val": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "epochs_trained": len(history) - start_epoch,
        "steps": step,
        "units": units,
        "unit": task.unit,
        "stopped_early": stopped,
        "seconds": seconds,
        "throughput": units / sum(h["seconds"] for h in history) if history else 0.0,
        "history": cfg.log_path,
        "last_epoch": history[-1] if history else None,
    }
