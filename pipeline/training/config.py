"""The one training schema: every field, default and check of a training run, for teachers
and students of every task. A config's training sections (`teacher.train`,
`students.train`) are generated from it (flows/config.py), so a key means the same thing
everywhere and its default is stated once, here."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from pipeline.objectives.losses import loss_names

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("cpu", "cuda", "auto")
WORKER_STARTS = ("fork", "spawn", "forkserver")
# set by the recipe, not by a config's training section: paths, and a student's loss,
# temperature, alpha and seed, which come from the sweep grid (flows/config.py builds the
# section from the other fields: one training schema)
RECIPE_FIELDS = ("loss", "temperature", "alpha", "log_path", "ckpt_path")
# config fields that may change between an interrupted run and its resume
RESUME_FREE = ("num_workers", "worker_start", "device", "log_path", "ckpt_path", "eval_every")


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (that epoch is the last)
    batch_size: int = 128  # rows per step: samples, or a language model's windows
    lr: float = 1e-3
    optimizer: str = "adamw"  # "adamw" | "sgd"
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # "cosine" | "step" | "constant", per optimizer step
    min_lr: float = 0.0  # "cosine" ends at min_lr x lr (a fraction in [0, 1])
    warmup_steps: int = 0  # linear warm-up before the schedule
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # "step": x step_gamma at these fractions of training
    step_gamma: float = 0.1
    loss: str = "ce"  # "ce" (hard labels / next tokens) or a KD loss (objectives/losses.py)
    temperature: float | None = None  # the student's T' (None: the stored labels' temperature)
    alpha: float = 0.0  # weight of the hard-label CE; the KD term gets 1 - alpha
    hint_weight: float = 0.0  # + w * FitNets hint loss on the teacher feature (stored or online)
    rkd_weight: float = 0.0  # + w * RKD distance loss on the same features
    grad_clip: float | None = None  # max global grad norm (None: off)
    patience: int | None = None  # early stopping: evaluations without a better validation metric
    seed: int = 0
    num_workers: int = 0  # DataLoader workers reading stored labels
    worker_start: str = "forkserver"  # DataLoader worker start method: "fork" | "spawn" | "forkserver";
    # not fork by default: a fork inherits the parent's threads (a Prefect
    # engine's, a storage pool's) in whatever state they are
    device: str = "auto"  # "cpu" | "cuda" | "auto"
    eval_every: int = 1  # epochs between validations (the last epoch always)
    chunk_size: int = 512  # loss rows per chunk over a large vocabulary (bounds fp32 (rows, V))
    log_path: str | None = None  # JSON lines, one record per epoch
    ckpt_path: str | None = None  # training checkpoint for resume

    def __post_init__(self):
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("loss", loss_names()),
            ("device", DEVICES),
            ("worker_start", WORKER_STARTS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "eval_every", "chunk_size"):
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
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"TrainConfig.temperature must be finite and > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TrainConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ValueError(f"TrainConfig.min_lr must be a fraction of lr in [0, 1], got {self.min_lr!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"TrainConfig.max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"TrainConfig.patience must be an int >= 1 or None, got {self.patience!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None (off), got {self.grad_clip!r}")
        self.step_milestones = tuple(float(m) for m in self.step_milestones)
        if any(not 0 < m <= 1 for m in self.step_milestones):
            raise ValueError(f"TrainConfig.step_milestones must be fractions in (0, 1], got {self.step_milestones}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists: JSON/weights_only safe


def resume_key(cfg: TrainConfig) -> dict:
    """The training config as far as it decides the result (RESUME_FREE fields left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
