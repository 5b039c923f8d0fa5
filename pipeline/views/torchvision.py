"""TorchvisionViews: a torchvision `transforms.v2` pipeline as a deterministic view.

    views:
      num_views: 8
      transform:
        kind: torchvision
        seed: 0
        steps:                                   # each step: {ClassName: {its kwargs}}
          - RandomResizedCrop: {size: [64, 64], scale: [0.35, 1.0], antialias: true}
          - RandomHorizontalFlip: {}
          - ColorJitter: {brightness: 0.3, contrast: 0.3}
          - RandAugment: {num_ops: 2, magnitude: 9}

v2 transforms draw their parameters from torch's global CPU generator. To make view v of
sample s replay exactly (FKD and TinyViT store a crop's identity, not its pixels), each row
runs the pipeline right after the global generator is seeded from the row's key
(hash_row_keys(seed, sample_id, view), the key every view transform uses), under the
process's GLOBAL_RNG_LOCK, and the generator's state is restored afterwards. A transform that
draws from anywhere else (Python's `random`, numpy) is not replayable: `distill inspect
--replay N` and `check_deterministic` catch it. The result depends on torchvision's sampling
code, so the identity records the torchvision version and a different installed version is
refused when the views are regenerated.

Rows are images (C, H, W) with pixels in [0, 1]. With `dtype: uint8` (the default) a row is
quantized to 0..255 before the pipeline (exact for decoded 8-bit images; the photometric ops
of RandAugment are defined on uint8) and scaled back after; `dtype: float32` runs it on the
floats. Views must keep the row's shape (a RandomResizedCrop to the image's own size): the
size the model sees is the source's `image_size`. View 0 is the input unchanged.

Global-RNG hazard: a thread drawing from torch's global generator without the lock (dropout
in a student training in a parallel thread) could interleave with a row's draws. Labelling
runs teachers in eval mode (no draws) and DataLoader workers are processes of their own, so
the one case is students trained in parallel threads: the flows refuse `students.max_parallel`
> 1 with these views (`global_rng`); on a CPU one student already uses every core.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.views.base import check_keys, check_seed, transform_fingerprint
from pipeline.views.rng import GLOBAL_RNG_LOCK, MASK63, check_rows, hash_row_keys

DTYPES = ("uint8", "float32")


def torchvision_version() -> str:
    import torchvision

    return torchvision.__version__.split("+")[0]


def _v2_class(name: str):
    from torchvision.transforms import v2

    cls = getattr(v2, name, None)
    if not (isinstance(cls, type) and issubclass(cls, v2.Transform)) or name.startswith("_"):
        known = sorted(
            n for n in dir(v2) if isinstance(getattr(v2, n), type) and issubclass(getattr(v2, n), v2.Transform)
        )
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is not a torchvision.transforms.v2 transform{hint}")
    return cls


def _check_steps(steps) -> tuple[dict, ...]:
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ValueError(
            f"transform kind 'torchvision': steps must be a non-empty list of {{Name: {{kwargs}}}}, found {steps!r}"
        )
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(
                f"transform kind 'torchvision': steps[{i}] must be one {{Name: {{kwargs}}}} mapping, found {step!r}"
            )
        ((name, kwargs),) = step.items()
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict):
            raise ValueError(
                f"transform kind 'torchvision': steps[{i}].{name} kwargs must be a mapping, found {kwargs!r}"
            )
        try:  # JSON form: what the manifest records is what the pipeline is built from
            kwargs = json.loads(json.dumps(kwargs, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"transform kind 'torchvision': steps[{i}].{name} kwargs must be JSON: {e}") from None
        out.append({str(name): kwargs})
    return tuple(out)


@dataclass(frozen=True)
class TorchvisionViews:
    steps: tuple[dict, ...]
    seed: int = 0
    dtype: str = "uint8"
    torchvision: str | None = None  # the version the views were made with; None: the installed one

    kind = "torchvision"
    global_rng = True  # seeds and draws from torch's global generator (module docstring)

    def __post_init__(self):
        object.__setattr__(self, "steps", _check_steps(self.steps))
        object.__setattr__(self, "seed", check_seed("torchvision views seed", self.seed))
        if self.dtype not in DTYPES:
            raise ValueError(f"transform kind 'torchvision': dtype must be one of {list(DTYPES)}, found {self.dtype!r}")
        if self.torchvision is None:
            object.__setattr__(self, "torchvision", torchvision_version())

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def is_identity(self) -> bool:
        return False

    def pipeline(self):
        """The v2.Compose, built once; every step's name and kwargs are checked here (a bad one
        is a ValueError naming the step)."""
        cached = self.__dict__.get("_pipeline")
        if cached is None:
            from torchvision.transforms import v2

            parts = []
            for i, step in enumerate(self.steps):
                ((name, kwargs),) = step.items()
                try:
                    parts.append(_v2_class(name)(**kwargs))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"views.transform (torchvision) steps[{i}] {name}: {e}") from None
            cached = v2.Compose(parts)
            object.__setattr__(self, "_pipeline", cached)
        return cached

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "steps": json.loads(json.dumps(list(self.steps))),
            "seed": self.seed,
            "dtype": self.dtype,
            "torchvision": self.torchvision,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TorchvisionViews:
        d = dict(d)
        d.pop("kind", None)
        check_keys(cls.kind, d, {"steps", "seed", "dtype", "torchvision"})
        if "steps" not in d:
            raise ValueError("transform kind 'torchvision': steps is required")
        return cls(**d)

    @classmethod
    def from_config(cls, d: dict) -> TorchvisionViews:
        """From a config section: the version is the installed one (not a config key), and the
        pipeline is built at once, so a bad step fails before any work."""
        d = dict(d)
        d.pop("kind", None)
        check_keys(cls.kind, d, {"steps", "seed", "dtype"})
        t = cls(**d)
        t.pipeline()
        return t

    def fingerprint(self) -> str:
        return transform_fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = check_rows(x, sample_ids, views, "torchvision views")
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"torchvision views take image rows (B, C, H, W) of floats, found {tuple(x.shape)} {x.dtype}"
            )
        installed = torchvision_version()
        if self.torchvision != installed:
            raise ValueError(
                f"these torchvision views were made with torchvision {self.torchvision}, this is {installed}: "
                f"the crops would not replay exactly; install torchvision=={self.torchvision} or relabel"
            )
        from torchvision import tv_tensors

        pipe = self.pipeline()
        out = x.clone()
        rows = np.flatnonzero(vws > 0)
        keys = hash_row_keys(self.seed, sids, vws)
        src = x.detach().cpu()
        with GLOBAL_RNG_LOCK:
            state = torch.get_rng_state()
            try:
                for i in rows:
                    img = src[i]  # (C, H, W) in [0, 1]
                    if self.dtype == "uint8":
                        img = (img * 255).round_().clamp_(0, 255).to(torch.uint8)
                    torch.default_generator.manual_seed(int(keys[i]) & MASK63)
                    y = pipe(tv_tensors.Image(img)).as_subclass(torch.Tensor)
                    if y.shape != img.shape:
                        raise ValueError(
                            f"torchvision views changed sample_id {int(sids[i])} view {int(vws[i])} from shape "
                            f"{tuple(img.shape)} to {tuple(y.shape)}: views keep the image's shape (crop back to "
                            f"its size, e.g. RandomResizedCrop size {list(img.shape[1:])}; the model's input size "
                            f"is the source's image_size)"
                        )
                    out[i] = (y.float() / 255 if self.dtype == "uint8" else y.float()).to(x.device, x.dtype)
            finally:
                torch.set_rng_state(state)
        return out
