"""Deterministic augmented views: pixels are a pure function of (spec, sample_id, view).

The teacher labels view v of sample s once; months later the student regenerates
EXACTLY the same pixels for (s, v) and trains on the stored soft label ("consistent
teaching", Beyer et al. 2022; the TinyViT / FKD trick of storing augmentation params).

Everything random comes from a counter-based hash (splitmix64) of
(spec.seed, sample_id, view, stream, element index), computed with exact integer
arithmetic in numpy. So a row's result never depends on the rest of the batch, its
order, the process, the platform or the torch/numpy version's RNG streams.

View 0 is ALWAYS the identity. For view > 0, in this order:
  1. hflip      (if spec.hflip, with probability 1/2)
  2. shift      by (dx, dy) uniform in [-shift, shift], zero fill; +dx moves content
                right (larger column index), +dy moves content down (larger row index)
  3. noise      additive, approximately N(0, noise_std^2), clipped to [0, 1]
Images are (B, C, H, W). Tabular rows (B, D) only get noise, and are NOT clipped
(features are not bounded to [0, 1]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.views.rng import check_ids, hash_row_keys, hash_stream, irwin_hall_noise

VIEWS_VERSION = 1  # bump when the algorithm changes; part of every fingerprint


# independent hash streams per row
_S_DX, _S_DY, _S_FLIP, _S_NOISE = 1, 2, 3, 4


@dataclass(frozen=True)
class ViewSpec:
    shift: int = 0  # max translation in pixels (zero padded)
    hflip: bool = False  # random horizontal flip
    noise_std: float = 0.0  # additive noise std, on [0, 1] pixel scale
    seed: int = 0  # augmentation seed, independent of any training seed

    def __post_init__(self):
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"ViewSpec.shift must be an int >= 0, found {self.shift!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"ViewSpec.hflip must be a bool, found {self.hflip!r}")
        if (
            isinstance(self.noise_std, bool)
            or not isinstance(self.noise_std, (int, float))
            or not math.isfinite(self.noise_std)
            or self.noise_std < 0
        ):
            raise ValueError(f"ViewSpec.noise_std must be a finite float >= 0, found {self.noise_std!r}")
        object.__setattr__(self, "noise_std", float(self.noise_std))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"ViewSpec.seed must be an int in [0, 2**63), found {self.seed!r}")

    @property
    def is_identity(self) -> bool:
        return self.shift == 0 and not self.hflip and self.noise_std == 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViewSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ViewSpec: unknown key(s) {unknown}, expected some of {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        blob = json.dumps({"version": VIEWS_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        """The transform protocol (pipeline/views/transforms.py): apply_views(x, sample_ids, views, self)."""
        return apply_views(x, sample_ids, views, self)


# ---------------------------------------------------------------- counter-based hash


def view_params(spec: ViewSpec, sample_ids, views) -> dict[str, np.ndarray]:
    """Per-row augmentation params, each (B,): dx, dy (int64), flip (bool), noise_key (uint64).

    View-0 rows get the identity (0, 0, False, 0).
    """
    sids, vws = check_ids(sample_ids, views)
    keys = hash_row_keys(spec.seed, sids, vws)
    aug = vws > 0
    span = np.uint64(2 * spec.shift + 1)
    # modulo bias is ~span / 2**64: irrelevant
    dx = (hash_stream(keys, _S_DX) % span).astype(np.int64) - spec.shift
    dy = (hash_stream(keys, _S_DY) % span).astype(np.int64) - spec.shift
    flip = (hash_stream(keys, _S_FLIP) & np.uint64(1)).astype(bool) & spec.hflip
    noise_key = hash_stream(keys, _S_NOISE)
    return {
        "dx": np.where(aug, dx, 0),
        "dy": np.where(aug, dy, 0),
        "flip": flip & aug,
        "noise_key": np.where(aug & (spec.noise_std > 0), noise_key, np.uint64(0)),
    }


def _shift(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, s: int) -> torch.Tensor:
    # x (B, C, H, W); out[b, :, i, j] = x[b, :, i - dy[b], j - dx[b]], zero outside.
    # Zero-pad by s, then one gather of each row's shifted HxW window from the flattened
    # padded image: a pure copy, bit-exact (and ~2.5x faster than 4-D fancy indexing).
    B, C, H, W = x.shape
    xp = torch.nn.functional.pad(x, (s, s, s, s))  # (B, C, H+2s, W+2s)
    rows = torch.arange(H, device=x.device)[None, :] + s - dy[:, None]  # (B, H)
    cols = torch.arange(W, device=x.device)[None, :] + s - dx[:, None]  # (B, W)
    flat = rows[:, :, None] * (W + 2 * s) + cols[:, None, :]  # (B, H, W) offsets into a padded plane
    idx = flat.reshape(B, 1, H * W).expand(B, C, H * W)
    return xp.reshape(B, C, -1).gather(2, idx).view(B, C, H, W)


def apply_views(x: torch.Tensor, sample_ids, views, spec: ViewSpec) -> torch.Tensor:
    """Augment rows of x (B, C, H, W) or (B, D) as views `views` of samples `sample_ids`.

    Returns a new tensor of the same shape; rows with view == 0 are returned unchanged.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, found {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.ndim not in (2, 4):
        raise ValueError(f"x must be (B, C, H, W) or (B, D), found shape {tuple(x.shape)}")
    sids, vws = check_ids(sample_ids, views)
    if len(sids) != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but {len(sids)} sample_ids")
    if spec.is_identity or not (vws > 0).any():
        return x.clone()
    p = view_params(spec, sids, vws)
    out = x
    if x.ndim == 4:
        if spec.hflip:
            flip = torch.from_numpy(p["flip"]).to(x.device)[:, None, None, None]
            out = torch.where(flip, out.flip(-1), out)
        if spec.shift:
            out = _shift(
                out, torch.from_numpy(p["dx"]).to(x.device), torch.from_numpy(p["dy"]).to(x.device), spec.shift
            )
    if spec.noise_std > 0:
        aug = vws > 0
        z = np.zeros((len(sids), int(np.prod(x.shape[1:]))), np.float32)  # (B, C*H*W | D)
        z[aug] = irwin_hall_noise(p["noise_key"][aug], z.shape[1]) * np.float32(spec.noise_std)
        out = out + torch.from_numpy(z).view(x.shape).to(device=x.device, dtype=x.dtype)
        if x.ndim == 4:
            out = out.clamp(0.0, 1.0)
    # view-0 rows: exactly the input (clamping or +0.0 could otherwise touch them)
    keep = torch.from_numpy(vws == 0).to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(keep, x, out)
