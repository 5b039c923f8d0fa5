"""Deterministic view transforms: a view's input is a pure function of
(transform, sample_id, view, the row's own input).

The teacher labels view v of sample s once; later the student regenerates EXACTLY the
same input for (s, v) and trains on the stored soft label (TinyViT / FKD: store the
augmentation's identity, not its output). `pipeline/views/images.py` `ViewSpec` (image shift /
flip / noise, tabular noise) is the first transform; this module adds the others and the
protocol they share.

The protocol (`Transform`):

    apply(x, sample_ids, views) -> tensor   rows with view 0 returned unchanged; a row's
                                            result depends only on (transform, sample_id,
                                            view, its own input), never on the rest of the
                                            batch, its order, the process or global RNG
    to_dict() -> dict                       JSON: the transform's identity, recorded in the
                                            manifest (its lineage)
    fingerprint() -> str                    sha256 of the versioned to_dict
    is_identity: bool                       every view equals view 0

Randomness comes from the counter-based splitmix64 hash of views.py: a 64-bit key per
row (`row_keys(seed, sample_ids, views)`), then one hash per (key, stream, element).
Decisions are exact integer comparisons (a 53-bit slice of the hash against
round(p * 2**53)), so they are bit-identical on every platform and torch version.

Kinds (`to_dict()["kind"]`): "tokens" (TokenViews), "signal" (SignalViews), "function"
(FunctionView), "compose" (Compose), "torchvision" (TorchvisionViews: a transforms.v2
pipeline, pipeline/views/torchvision.py). A dict without "kind" is a ViewSpec (its dict
predates this module and is stored in existing datasets, so it stays as it is).
`transform_from_dict` rebuilds any of them from a manifest; `transform_from_config`
builds one from a YAML config section (token ids filled from the tokenizer).

Layout: the protocol, per-row randomness and argument checks are in transform_base.py,
FunctionView in function_view.py; TokenViews, SignalViews, Compose and the rebuild from
a dict are here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.views.base import (  # noqa: F401
    KINDS,
    S_SIG_NOISE,
    S_SIG_SCALE,
    S_SIG_SHIFT,
    S_TOK_DROP,
    S_TOK_MASK,
    TRANSFORMS_VERSION,
    Transform,
    check_int,
    check_keys,
    check_number,
    check_prob,
    check_seed,
    transform_fingerprint,
)
from pipeline.views.function import FunctionView
from pipeline.views.images import ViewSpec
from pipeline.views.rng import (  # noqa: F401
    P_ONE,
    bernoulli,
    check_ids,
    check_rows,
    hash_row_keys,
    hash_stream,
    irwin_hall_noise,
    row_generators,
    row_keys,
)
from pipeline.views.torchvision import TorchvisionViews

# ---------------------------------------------------------------- tokens


@dataclass(frozen=True, kw_only=True)
class TokenViews:
    """Views of token-id rows (B, L) padded with pad_id: token masking and deletion.

    The transfer-set augmentation of Tang et al. 2019, "Distilling Task-Specific Knowledge
    from BERT into Simple Neural Networks" (arXiv:1903.12136, section 3.1): masking words
    with [MASK] and n-gram sampling to enlarge the set the teacher labels; deletion here
    plays the part of their n-gram sampling (the student sees a shorter sub-sequence).

    For a row with view > 0, each token that is neither pad_id nor in special_ids is
      - deleted with probability drop_prob (the row is re-packed to the left and padded on
        the right with pad_id), otherwise
      - replaced by mask_id with probability mask_prob.
    Decisions hash (row key, the token's position among the row's non-pad tokens), so they
    do not depend on how much padding the batch has (or on its side): the same sample
    padded to 20 or 50 columns gives the same non-pad tokens. With drop_prob > 0 the
    columns that deletion emptied at the end of the batch are trimmed (at least 1 column
    stays; padding the input already had beyond its longest row is kept). View-0 rows are
    returned unchanged. Token ids keep their dtype.
    """

    pad_id: int
    mask_prob: float = 0.0
    drop_prob: float = 0.0
    mask_id: int | None = None
    special_ids: tuple[int, ...] = ()
    seed: int = 0

    kind = "tokens"

    def __post_init__(self):
        object.__setattr__(self, "pad_id", check_int("TokenViews.pad_id", self.pad_id))
        object.__setattr__(self, "mask_prob", check_prob("TokenViews.mask_prob", self.mask_prob))
        object.__setattr__(self, "drop_prob", check_prob("TokenViews.drop_prob", self.drop_prob))
        if self.mask_id is not None:
            object.__setattr__(self, "mask_id", check_int("TokenViews.mask_id", self.mask_id))
        elif self.mask_prob > 0:
            raise ValueError(
                f"TokenViews.mask_id is required when mask_prob > 0 "
                f"(mask_prob={self.mask_prob}); the tokenizer has no mask token?"
            )
        if isinstance(self.special_ids, (str, bytes)) or not hasattr(self.special_ids, "__iter__"):
            raise ValueError(f"TokenViews.special_ids must be a list of ints, found {self.special_ids!r}")
        object.__setattr__(
            self, "special_ids", tuple(sorted({check_int("TokenViews.special_ids[]", i) for i in self.special_ids}))
        )
        object.__setattr__(self, "seed", check_seed("TokenViews.seed", self.seed))

    @property
    def is_identity(self) -> bool:
        return self.mask_prob == 0.0 and self.drop_prob == 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "pad_id": self.pad_id,
            "mask_prob": self.mask_prob,
            "drop_prob": self.drop_prob,
            "mask_id": self.mask_id,
            "special_ids": list(self.special_ids),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TokenViews:
        d = dict(d)
        d.pop("kind", None)
        check_keys(cls.kind, d, {f.name for f in dataclasses.fields(cls)})
        if "pad_id" not in d:
            raise ValueError("transform kind 'tokens': pad_id is required")
        return cls(**d)

    def fingerprint(self) -> str:
        return transform_fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = check_rows(x, sample_ids, views, "TokenViews")
        if x.ndim != 2 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(
                f"TokenViews: x must be integer token ids (B, L), found shape {tuple(x.shape)} dtype {x.dtype}"
            )
        B, L = x.shape
        aug = vws > 0
        if self.is_identity or not aug.any() or L == 0:
            return x.clone()
        a = x.detach().cpu().numpy().astype(np.int64)
        nonpad = a != self.pad_id
        pos = np.maximum(np.cumsum(nonpad, axis=1) - 1, 0)  # index among non-pad tokens
        eligible = nonpad & aug[:, None]
        if self.special_ids:
            eligible &= ~np.isin(a, np.asarray(self.special_ids, dtype=np.int64))
        keys = hash_row_keys(self.seed, sids, vws)
        drop = np.zeros_like(eligible)
        if self.drop_prob > 0:
            drop = eligible & bernoulli(hash_stream(keys, S_TOK_DROP), pos, self.drop_prob)
        out = a
        if self.mask_prob > 0:
            mask = eligible & ~drop & bernoulli(hash_stream(keys, S_TOK_MASK), pos, self.mask_prob)
            out = np.where(mask, np.int64(self.mask_id), a)
        if self.drop_prob > 0:
            keep = nonpad & ~drop
            order = np.argsort(~keep, axis=1, kind="stable")  # kept tokens first, in order
            packed = np.take_along_axis(out, order, axis=1)
            packed[np.arange(L)[None, :] >= keep.sum(axis=1)[:, None]] = self.pad_id
            out = np.where(aug[:, None], packed, out)
            # trim only the trailing columns that deletion emptied
            width = max(1, L - (_content_width(a, self.pad_id) - _content_width(out, self.pad_id)))
            out = out[:, :width]
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


def _content_width(a: np.ndarray, pad: int) -> int:
    cols = np.flatnonzero((a != pad).any(axis=0))
    return int(cols[-1]) + 1 if len(cols) else 0


# ---------------------------------------------------------------- signals / tabular rows


@dataclass(frozen=True)
class SignalViews:
    """Views of 1-D signals (B, D) or (B, C, D), also tabular rows (B, D).

    For a row with view > 0, in this order:
      1. shift   circular roll along the last axis by k uniform in [-shift, shift]
                 (torch.roll(row, k, dims=-1): out[..., j] = x[..., (j - k) mod D])
      2. scale   multiply by a factor uniform in [1 - scale, 1 + scale]
      3. noise   additive, approximately N(0, noise_std^2) (views.irwin_hall_noise, bit-exact)
    `params(sample_ids, views)` gives each row's k, factor and noise key. View-0 rows are
    returned unchanged; values are not clipped.
    """

    shift: int = 0
    scale: float = 0.0
    noise_std: float = 0.0
    seed: int = 0

    kind = "signal"

    def __post_init__(self):
        object.__setattr__(self, "shift", check_int("SignalViews.shift", self.shift))
        object.__setattr__(
            self, "scale", check_number("SignalViews.scale", self.scale, lo=0.0, hi=1.0, what="a float in [0, 1]")
        )
        object.__setattr__(
            self, "noise_std", check_number("SignalViews.noise_std", self.noise_std, lo=0.0, what="a finite float >= 0")
        )
        object.__setattr__(self, "seed", check_seed("SignalViews.seed", self.seed))

    @property
    def is_identity(self) -> bool:
        return self.shift == 0 and self.scale == 0.0 and self.noise_std == 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "shift": self.shift,
            "scale": self.scale,
            "noise_std": self.noise_std,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SignalViews:
        d = dict(d)
        d.pop("kind", None)
        check_keys(cls.kind, d, {f.name for f in dataclasses.fields(cls)})
        return cls(**d)

    def fingerprint(self) -> str:
        return transform_fingerprint(self.to_dict())

    def params(self, sample_ids, views) -> dict[str, np.ndarray]:
        """Per-row params, each (B,): shift (int64), factor (float64), noise_key (uint64).
        View-0 rows get the identity (0, 1.0, 0)."""
        sids, vws = check_ids(sample_ids, views)
        keys = hash_row_keys(self.seed, sids, vws)
        aug = vws > 0
        span = np.uint64(2 * self.shift + 1)
        k = (hash_stream(keys, S_SIG_SHIFT) % span).astype(np.int64) - self.shift
        u = (hash_stream(keys, S_SIG_SCALE) >> np.uint64(11)).astype(np.float64) / float(P_ONE)  # exact, [0, 1)
        factor = (1.0 - self.scale) + (2.0 * self.scale) * u
        noise_key = hash_stream(keys, S_SIG_NOISE)
        return {
            "shift": np.where(aug, k, 0),
            "factor": np.where(aug, factor, 1.0),
            "noise_key": np.where(aug & (self.noise_std > 0), noise_key, np.uint64(0)),
        }

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = check_rows(x, sample_ids, views, "SignalViews")
        if not x.is_floating_point() or x.ndim not in (2, 3):
            raise ValueError(
                f"SignalViews: x must be a floating point tensor (B, D) or (B, C, D), "
                f"found shape {tuple(x.shape)} dtype {x.dtype}"
            )
        aug = vws > 0
        if self.is_identity or not aug.any() or x.shape[-1] == 0:
            return x.clone()
        p = self.params(sids, vws)
        B, D = x.shape[0], x.shape[-1]
        bshape = (B,) + (1,) * (x.ndim - 1)
        out = x
        if self.shift:
            k = torch.from_numpy(p["shift"]).to(x.device)
            idx = (torch.arange(D, device=x.device)[None, :] - k[:, None]) % D  # (B, D)
            out = out.gather(-1, idx.view(B, *([1] * (x.ndim - 2)), D).expand(x.shape))
        if self.scale:
            out = out * torch.from_numpy(p["factor"]).to(device=x.device, dtype=x.dtype).view(bshape)
        if self.noise_std > 0:
            z = np.zeros((B, int(np.prod(x.shape[1:]))), np.float32)
            z[aug] = irwin_hall_noise(p["noise_key"][aug], z.shape[1]) * np.float32(self.noise_std)
            out = out + torch.from_numpy(z).view(x.shape).to(device=x.device, dtype=x.dtype)
        keep = torch.from_numpy(~aug).to(x.device).view(bshape)
        return torch.where(keep, x, out)


# ---------------------------------------------------------------- composition


@dataclass(frozen=True)
class Compose:
    """Transforms applied in order, each with the same sample ids and views. Identity when
    every step is (an empty Compose too)."""

    steps: tuple = ()

    kind = "compose"

    def __post_init__(self):
        if isinstance(self.steps, (str, bytes, dict)) or not hasattr(self.steps, "__iter__"):
            raise ValueError(f"Compose.steps must be a list of transforms, found {self.steps!r}")
        steps = tuple(self.steps)
        for i, s in enumerate(steps):
            if not isinstance(s, Transform):
                raise ValueError(
                    f"Compose.steps[{i}] is not a transform (apply, to_dict, fingerprint, "
                    f"is_identity), found {type(s).__name__}"
                )
        object.__setattr__(self, "steps", steps)

    @property
    def is_identity(self) -> bool:
        return all(s.is_identity for s in self.steps)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> Compose:
        return cls(tuple(transform_from_dict(s) for s in _steps_of(d)))

    def fingerprint(self) -> str:
        return transform_fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = check_rows(x, sample_ids, views, "Compose")
        out = x.clone()
        for s in self.steps:
            out = s.apply(out, sids, vws)
        return out


def _steps_of(d: dict) -> list:
    d = dict(d)
    d.pop("kind", None)
    check_keys("compose", d, {"steps"})
    steps = d.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"transform kind 'compose': steps must be a list of transforms, found {steps!r}")
    for i, s in enumerate(steps):
        if not isinstance(s, dict):
            raise ValueError(f"transform kind 'compose': steps[{i}] must be a dict, found {s!r}")
    return steps


# ---------------------------------------------------------------- rebuild

_BUILDERS = {
    "tokens": TokenViews,
    "signal": SignalViews,
    "function": FunctionView,
    "compose": Compose,
    "torchvision": TorchvisionViews,
}


def _kind_of(d) -> str | None:
    if not isinstance(d, dict):
        raise ValueError(f"a transform must be a dict, found {type(d).__name__} {d!r}")
    kind = d.get("kind")
    if kind is not None and kind not in _BUILDERS:
        raise ValueError(
            f"unknown transform kind {kind!r}: expected one of {list(KINDS)}, "
            f"or no kind for a ViewSpec (shift, hflip, noise_std, seed)"
        )
    return kind


def transform_from_dict(d: dict | None):
    """The transform a manifest records (its to_dict()), or None for None. A dict without
    "kind" is a ViewSpec. ValueError naming an unknown kind or key."""
    if d is None:
        return None
    kind = _kind_of(d)
    if kind is None:
        return ViewSpec.from_dict(d)
    return _BUILDERS[kind].from_dict(d)


def transform_from_config(d: dict | None, *, tokenizer_info: dict | None = None):
    """The transform a config section describes, or None for None. Like transform_from_dict,
    but: for kind "tokens", pad_id / mask_id / special_ids absent from `d` come from
    `tokenizer_info` (pipeline/hf_files.py tokenizer_info: "pad_id", "mask_id", "special_ids"),
    and a pad_id that differs from the tokenizer's is refused; a function view is imported
    at once (a bad path fails here, not mid-run) and source_sha256 is not a config key
    (it is computed). A dict without "kind" is a ViewSpec (shift, hflip, noise_std, seed)."""
    if d is None:
        return None
    kind = _kind_of(d)
    if kind is None:
        return ViewSpec.from_dict(d)
    if kind == "compose":
        return Compose(tuple(transform_from_config(s, tokenizer_info=tokenizer_info) for s in _steps_of(d)))
    if kind == "tokens":
        d = dict(d)
        check_keys(kind, {k: v for k, v in d.items() if k != "kind"}, {f.name for f in dataclasses.fields(TokenViews)})
        info = tokenizer_info or {}
        tok_pad = info.get("pad_id")
        if tok_pad is not None and "pad_id" in d and d["pad_id"] != tok_pad:
            raise ValueError(
                f"transform kind 'tokens': pad_id {d['pad_id']!r} differs from the tokenizer's "
                f"pad_id {tok_pad!r} (rows are padded with the tokenizer's)"
            )
        for key in ("pad_id", "mask_id", "special_ids"):
            if key not in d and info.get(key) is not None:
                d[key] = info[key]
        if "pad_id" not in d:
            raise ValueError(
                "transform kind 'tokens': pad_id is required (set it, or configure a tokenizer that has a pad token)"
            )
        return TokenViews.from_dict(d)
    if kind == "function":
        check_keys(kind, {k: v for k, v in d.items() if k != "kind"}, {"fn", "kwargs", "seed"})
        t = FunctionView.from_dict(d)
        t.resolve()
        return t
    if kind == "torchvision":
        return TorchvisionViews.from_config(d)
    return _BUILDERS[kind].from_dict(d)


# ---------------------------------------------------------------- replay check


def _describe(t) -> str:
    if isinstance(t, FunctionView):
        return f"view function {t.fn!r}"
    return f"transform {getattr(t, 'kind', type(t).__name__)!r}"


def _pad_of(t) -> int | None:
    if isinstance(t, TokenViews):
        return t.pad_id
    if isinstance(t, Compose):
        for s in t.steps:
            p = _pad_of(s)
            if p is not None:
                return p
    return None


def _same_row(a: torch.Tensor, b: torch.Tensor, pad: int | None) -> bool:
    if a.shape != b.shape:
        if a.ndim != 1 or b.ndim != 1 or pad is None:
            return False
        n = min(len(a), len(b))  # token rows in batches of different widths
        longer = a if len(a) > n else b
        return torch.equal(a[:n], b[:n]) and bool((longer[n:] == pad).all())
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def check_deterministic(transform, x: torch.Tensor, sample_ids, views) -> None:
    """Apply `transform` twice, the second time with the rows in reversed order and each
    interleaved with another row (the same input as view + 1), and raise ValueError naming
    the first row (sample_id, view) whose result differs: the transform depends on the
    batch, its order, or global RNG, so the student could not regenerate what the teacher
    labelled."""
    sids, vws = check_ids(sample_ids, views)
    if not torch.is_tensor(x) or x.ndim == 0 or x.shape[0] != len(sids):
        raise ValueError(f"check_deterministic: x must be a tensor with {len(sids)} rows")
    B = len(sids)
    if B == 0:
        return
    first = transform.apply(x, sids, vws)
    rev = np.arange(B)[::-1]
    idx = np.repeat(rev, 2)  # row, its filler, next row...
    vws2 = np.stack([vws[rev], vws[rev] + 1], axis=1).reshape(-1)
    second = transform.apply(x[torch.from_numpy(idx.copy())], sids[idx], vws2)
    who = _describe(transform)
    if first.shape[0] != B or second.shape[0] != 2 * B:
        raise ValueError(f"{who} returned {first.shape[0]} / {second.shape[0]} rows for batches of {B} / {2 * B}")
    pad = _pad_of(transform)
    for i in range(B):
        if not _same_row(first[i], second[2 * (B - 1 - i)], pad):
            raise ValueError(
                f"{who} is not deterministic: sample_id {int(sids[i])}, view {int(vws[i])} "
                f"gave a different result when applied again in another batch (reversed, "
                f"interleaved with other rows); draw randomness only from the generator "
                f"it is given, never from global RNG"
            )
