"""Deterministic view transforms: a view's input is a pure function of
(transform, sample_id, view, the row's own input).

The teacher labels view v of sample s once; later the student regenerates EXACTLY the
same input for (s, v) and trains on the stored soft label (TinyViT / FKD: store the
augmentation's identity, not its output). `pipeline/views.py` `ViewSpec` (image shift /
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
(FunctionView), "compose" (Compose). A dict without "kind" is a ViewSpec (its dict
predates this module and is stored in existing datasets, so it stays as it is).
`transform_from_dict` rebuilds any of them from a manifest; `transform_from_config`
builds one from a YAML config section (token ids filled from the tokenizer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .views import ViewSpec, _check_ids, _noise, _row_keys, _splitmix64, _stream

TRANSFORMS_VERSION = 1  # bump when an algorithm here changes; part of every fingerprint
KINDS = ("tokens", "signal", "function", "compose")

_MASK63 = (1 << 63) - 1
_P_ONE = 1 << 53                     # a probability p is the integer threshold round(p * 2**53)

# hash streams (distinct from views.py's 1..4)
_S_TOK_MASK, _S_TOK_DROP = 21, 22
_S_SIG_SHIFT, _S_SIG_SCALE, _S_SIG_NOISE = 31, 32, 33


@runtime_checkable
class Transform(Protocol):
    """What labelling, training and evaluation need from a view transform (see the module
    docstring). ViewSpec, TokenViews, SignalViews, FunctionView and Compose implement it."""

    @property
    def is_identity(self) -> bool: ...

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor: ...

    def to_dict(self) -> dict: ...

    def fingerprint(self) -> str: ...


# ---------------------------------------------------------------- per-row randomness

def row_keys(seed: int, sample_ids, views) -> np.ndarray:
    """(B,) uint64 key per row, a pure function of (seed, sample_id, view)."""
    seed = _seed("seed", seed)
    sids, vws = _check_ids(sample_ids, views)
    return _row_keys(seed, sids, vws)


def row_generators(seed: int, sample_ids, views) -> list[torch.Generator]:
    """One CPU torch.Generator per row, seeded from its row key (key & (2**63 - 1)), so
    anything drawn from it is a pure function of (seed, sample_id, view). Draw on the CPU
    (torch generators are device-bound) and move the result."""
    return [torch.Generator().manual_seed(int(k) & _MASK63) for k in row_keys(seed, sample_ids, views)]


def _bernoulli(stream_keys: np.ndarray, index: np.ndarray, p: float) -> np.ndarray:
    """(B, L) bool: element (b, i) is True with probability p, from the hash of
    (stream_keys[b], index[b, i]); exact integer comparison."""
    thr = np.uint64(int(round(p * _P_ONE)))
    h = _splitmix64(stream_keys[:, None] ^ _splitmix64(index.astype(np.uint64)))
    return (h >> np.uint64(11)) < thr


# ---------------------------------------------------------------- validation

def _num(name: str, v, *, lo: float, hi: float | None = None, what: str) -> float:
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v))
            or v < lo or (hi is not None and v > hi)):
        raise ValueError(f"{name} must be {what}, found {v!r}")
    return float(v)


def _prob(name: str, v) -> float:
    return _num(name, v, lo=0.0, hi=1.0, what="a probability in [0, 1]")


def _int(name: str, v, *, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v >= hi):
        rng = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi})"
        raise ValueError(f"{name} must be {rng}, found {v!r}")
    return int(v)


def _seed(name: str, v) -> int:
    return _int(name, v, lo=0, hi=2**63)


def _fingerprint(d: dict) -> str:
    blob = json.dumps({"version": TRANSFORMS_VERSION, **d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_keys(kind: str, d: dict, known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"transform kind {kind!r}: unknown key(s) {unknown}, expected some of {sorted(known)}")


def _rows(x, sample_ids, views, who: str) -> tuple[np.ndarray, np.ndarray]:
    if not torch.is_tensor(x):
        raise ValueError(f"{who}: x must be a torch.Tensor, found {type(x).__name__}")
    sids, vws = _check_ids(sample_ids, views)
    if x.ndim == 0 or len(sids) != x.shape[0]:
        raise ValueError(f"{who}: x has {x.shape[0] if x.ndim else 0} rows but {len(sids)} sample_ids")
    return sids, vws


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
        object.__setattr__(self, "pad_id", _int("TokenViews.pad_id", self.pad_id))
        object.__setattr__(self, "mask_prob", _prob("TokenViews.mask_prob", self.mask_prob))
        object.__setattr__(self, "drop_prob", _prob("TokenViews.drop_prob", self.drop_prob))
        if self.mask_id is not None:
            object.__setattr__(self, "mask_id", _int("TokenViews.mask_id", self.mask_id))
        elif self.mask_prob > 0:
            raise ValueError(f"TokenViews.mask_id is required when mask_prob > 0 "
                             f"(mask_prob={self.mask_prob}); the tokenizer has no mask token?")
        if isinstance(self.special_ids, (str, bytes)) or not hasattr(self.special_ids, "__iter__"):
            raise ValueError(f"TokenViews.special_ids must be a list of ints, found {self.special_ids!r}")
        object.__setattr__(self, "special_ids", tuple(sorted({_int("TokenViews.special_ids[]", i)
                                                               for i in self.special_ids})))
        object.__setattr__(self, "seed", _seed("TokenViews.seed", self.seed))

    @property
    def is_identity(self) -> bool:
        return self.mask_prob == 0.0 and self.drop_prob == 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "pad_id": self.pad_id, "mask_prob": self.mask_prob,
                "drop_prob": self.drop_prob, "mask_id": self.mask_id,
                "special_ids": list(self.special_ids), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenViews":
        d = dict(d)
        d.pop("kind", None)
        _check_keys(cls.kind, d, {f.name for f in dataclasses.fields(cls)})
        if "pad_id" not in d:
            raise ValueError("transform kind 'tokens': pad_id is required")
        return cls(**d)

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = _rows(x, sample_ids, views, "TokenViews")
        if x.ndim != 2 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"TokenViews: x must be integer token ids (B, L), found shape "
                             f"{tuple(x.shape)} dtype {x.dtype}")
        B, L = x.shape
        aug = vws > 0
        if self.is_identity or not aug.any() or L == 0:
            return x.clone()
        a = x.detach().cpu().numpy().astype(np.int64)
        nonpad = a != self.pad_id
        pos = np.maximum(np.cumsum(nonpad, axis=1) - 1, 0)        # index among non-pad tokens
        eligible = nonpad & aug[:, None]
        if self.special_ids:
            eligible &= ~np.isin(a, np.asarray(self.special_ids, dtype=np.int64))
        keys = _row_keys(self.seed, sids, vws)
        drop = np.zeros_like(eligible)
        if self.drop_prob > 0:
            drop = eligible & _bernoulli(_stream(keys, _S_TOK_DROP), pos, self.drop_prob)
        out = a
        if self.mask_prob > 0:
            mask = eligible & ~drop & _bernoulli(_stream(keys, _S_TOK_MASK), pos, self.mask_prob)
            out = np.where(mask, np.int64(self.mask_id), a)
        if self.drop_prob > 0:
            keep = nonpad & ~drop
            order = np.argsort(~keep, axis=1, kind="stable")       # kept tokens first, in order
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
      3. noise   additive, approximately N(0, noise_std^2) (views._noise, bit-exact)
    `params(sample_ids, views)` gives each row's k, factor and noise key. View-0 rows are
    returned unchanged; values are not clipped.
    """
    shift: int = 0
    scale: float = 0.0
    noise_std: float = 0.0
    seed: int = 0

    kind = "signal"

    def __post_init__(self):
        object.__setattr__(self, "shift", _int("SignalViews.shift", self.shift))
        object.__setattr__(self, "scale", _num("SignalViews.scale", self.scale, lo=0.0, hi=1.0,
                                               what="a float in [0, 1]"))
        object.__setattr__(self, "noise_std", _num("SignalViews.noise_std", self.noise_std, lo=0.0,
                                                   what="a finite float >= 0"))
        object.__setattr__(self, "seed", _seed("SignalViews.seed", self.seed))

    @property
    def is_identity(self) -> bool:
        return self.shift == 0 and self.scale == 0.0 and self.noise_std == 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": self.shift, "scale": self.scale,
                "noise_std": self.noise_std, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "SignalViews":
        d = dict(d)
        d.pop("kind", None)
        _check_keys(cls.kind, d, {f.name for f in dataclasses.fields(cls)})
        return cls(**d)

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def params(self, sample_ids, views) -> dict[str, np.ndarray]:
        """Per-row params, each (B,): shift (int64), factor (float64), noise_key (uint64).
        View-0 rows get the identity (0, 1.0, 0)."""
        sids, vws = _check_ids(sample_ids, views)
        keys = _row_keys(self.seed, sids, vws)
        aug = vws > 0
        span = np.uint64(2 * self.shift + 1)
        k = (_stream(keys, _S_SIG_SHIFT) % span).astype(np.int64) - self.shift
        u = (_stream(keys, _S_SIG_SCALE) >> np.uint64(11)).astype(np.float64) / float(_P_ONE)  # exact, [0, 1)
        factor = (1.0 - self.scale) + (2.0 * self.scale) * u
        noise_key = _stream(keys, _S_SIG_NOISE)
        return {"shift": np.where(aug, k, 0), "factor": np.where(aug, factor, 1.0),
                "noise_key": np.where(aug & (self.noise_std > 0), noise_key, np.uint64(0))}

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = _rows(x, sample_ids, views, "SignalViews")
        if not x.is_floating_point() or x.ndim not in (2, 3):
            raise ValueError(f"SignalViews: x must be a floating point tensor (B, D) or (B, C, D), "
                             f"found shape {tuple(x.shape)} dtype {x.dtype}")
        aug = vws > 0
        if self.is_identity or not aug.any() or x.shape[-1] == 0:
            return x.clone()
        p = self.params(sids, vws)
        B, D = x.shape[0], x.shape[-1]
        bshape = (B,) + (1,) * (x.ndim - 1)
        out = x
        if self.shift:
            k = torch.from_numpy(p["shift"]).to(x.device)
            idx = (torch.arange(D, device=x.device)[None, :] - k[:, None]) % D        # (B, D)
            out = out.gather(-1, idx.view(B, *([1] * (x.ndim - 2)), D).expand(x.shape))
        if self.scale:
            out = out * torch.from_numpy(p["factor"]).to(device=x.device, dtype=x.dtype).view(bshape)
        if self.noise_std > 0:
            z = np.zeros((B, int(np.prod(x.shape[1:]))), np.float32)
            z[aug] = _noise(p["noise_key"][aug], z.shape[1]) * np.float32(self.noise_std)
            out = out + torch.from_numpy(z).view(x.shape).to(device=x.device, dtype=x.dtype)
        keep = torch.from_numpy(~aug).to(x.device).view(bshape)
        return torch.where(keep, x, out)


# ---------------------------------------------------------------- a user function

def _import_function(path: str):
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"view function path must look like 'package.module:function', found {path!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"view function {path!r}: cannot import module {mod_name!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"view function {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"view function {path!r}: {attr!r} is not callable")
    return obj


def _source_sha256(fn) -> str | None:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(src.encode()).hexdigest()


@dataclass(frozen=True)
class FunctionView:
    """Views made by a user function, called once per row with view > 0 as

        fn(x_row: torch.Tensor, generator: torch.Generator, **kwargs) -> torch.Tensor

    `generator` is a CPU generator seeded from the row key (row_generators), so a function
    that draws only from it is a pure function of (seed, sample_id, view, row). It must
    return a tensor of the row's shape and dtype; it gets a copy of the row. View-0 rows
    are not passed to fn. The function is imported from `fn` ("package.module:function")
    on first use (apply / to_dict), not at construction: rebuilding one from a manifest
    runs no user code until the views are needed.

    The identity (to_dict) records fn, kwargs, seed and the sha256 of the function's source
    (inspect.getsource; None where there is none), so editing the function changes the
    fingerprint. Only the function's own source is hashed, not helpers it calls. A
    FunctionView rebuilt from a dict with a recorded source_sha256 refuses to run a
    function whose source has changed since. A function using global RNG is caught by
    `check_deterministic`.
    """
    fn: str
    kwargs: dict = field(default_factory=dict)
    seed: int = 0
    source_sha256: str | None = field(default=None, compare=False)  # expected, from a manifest

    kind = "function"

    def __post_init__(self):
        if not isinstance(self.fn, str):
            raise ValueError(f"FunctionView.fn must be an import path 'package.module:function', "
                             f"found {self.fn!r}")
        mod_name, _, attr = self.fn.partition(":")
        if not mod_name or not attr:
            raise ValueError(f"FunctionView.fn must look like 'package.module:function', found {self.fn!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ValueError(f"FunctionView.kwargs must be a dict with str keys, found {self.kwargs!r}")
        try:   # JSON form: it is what the manifest records, so it is what the function gets
            kwargs = json.loads(json.dumps(self.kwargs, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"FunctionView.kwargs for {self.fn!r} must be JSON (numbers, strings, "
                             f"lists, dicts): {e}") from None
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "seed", _seed("FunctionView.seed", self.seed))
        if self.source_sha256 is not None and not isinstance(self.source_sha256, str):
            raise ValueError(f"FunctionView.source_sha256 must be a hex string or None, found {self.source_sha256!r}")

    def __hash__(self):
        return hash((self.fn, json.dumps(self.kwargs, sort_keys=True), self.seed))

    @property
    def is_identity(self) -> bool:
        return False

    def resolve(self):
        """(function, its source sha256 or None), imported once; ValueError naming the path
        when it cannot be imported, or when its source differs from the recorded one."""
        cached = self.__dict__.get("_resolved")
        if cached is None:
            fn = _import_function(self.fn)
            sha = _source_sha256(fn)
            if self.source_sha256 is not None and sha != self.source_sha256:
                raise ValueError(f"view function {self.fn!r} changed since these views were recorded "
                                 f"(source sha256 {self.source_sha256[:12]} recorded, "
                                 f"{(sha or 'unavailable')[:12]} now): it would not regenerate the same inputs")
            cached = (fn, sha)
            object.__setattr__(self, "_resolved", cached)
        return cached

    def to_dict(self) -> dict:
        return {"kind": self.kind, "fn": self.fn, "kwargs": json.loads(json.dumps(self.kwargs)),
                "seed": self.seed, "source_sha256": self.resolve()[1]}

    @classmethod
    def from_dict(cls, d: dict) -> "FunctionView":
        d = dict(d)
        d.pop("kind", None)
        _check_keys(cls.kind, d, {"fn", "kwargs", "seed", "source_sha256"})
        if "fn" not in d:
            raise ValueError("transform kind 'function': fn is required ('package.module:function')")
        return cls(**d)

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = _rows(x, sample_ids, views, f"view function {self.fn!r}")
        fn = self.resolve()[0]
        out = x.clone()
        rows = np.flatnonzero(vws > 0)
        if not len(rows):
            return out
        keys = _row_keys(self.seed, sids, vws)
        for i in rows:
            g = torch.Generator().manual_seed(int(keys[i]) & _MASK63)
            y = fn(x[i].clone(), g, **self.kwargs)
            if not torch.is_tensor(y) or y.shape != x.shape[1:] or y.dtype != x.dtype:
                got = (f"shape {tuple(y.shape)} dtype {y.dtype}" if torch.is_tensor(y)
                       else type(y).__name__)
                raise ValueError(f"view function {self.fn!r} returned {got} for sample_id {int(sids[i])}, "
                                 f"view {int(vws[i])}; it must return a tensor of the row's shape "
                                 f"{tuple(x.shape[1:])} and dtype {x.dtype}")
            out[i] = y.to(x.device)
        return out


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
                raise ValueError(f"Compose.steps[{i}] is not a transform (apply, to_dict, fingerprint, "
                                 f"is_identity), found {type(s).__name__}")
        object.__setattr__(self, "steps", steps)

    @property
    def is_identity(self) -> bool:
        return all(s.is_identity for s in self.steps)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> "Compose":
        return cls(tuple(transform_from_dict(s) for s in _steps_of(d)))

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = _rows(x, sample_ids, views, "Compose")
        out = x.clone()
        for s in self.steps:
            out = s.apply(out, sids, vws)
        return out


def _steps_of(d: dict) -> list:
    d = dict(d)
    d.pop("kind", None)
    _check_keys("compose", d, {"steps"})
    steps = d.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"transform kind 'compose': steps must be a list of transforms, found {steps!r}")
    for i, s in enumerate(steps):
        if not isinstance(s, dict):
            raise ValueError(f"transform kind 'compose': steps[{i}] must be a dict, found {s!r}")
    return steps


# ---------------------------------------------------------------- rebuild

_BUILDERS = {"tokens": TokenViews, "signal": SignalViews, "function": FunctionView, "compose": Compose}


def _kind_of(d) -> str | None:
    if not isinstance(d, dict):
        raise ValueError(f"a transform must be a dict, found {type(d).__name__} {d!r}")
    kind = d.get("kind")
    if kind is not None and kind not in _BUILDERS:
        raise ValueError(f"unknown transform kind {kind!r}: expected one of {list(KINDS)}, "
                         f"or no kind for a ViewSpec (shift, hflip, noise_std, seed)")
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
    `tokenizer_info` (pipeline/text.py tokenizer_info: "pad_id", "mask_id", "special_ids"),
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
        _check_keys(kind, {k: v for k, v in d.items() if k != "kind"},
                    {f.name for f in dataclasses.fields(TokenViews)})
        info = tokenizer_info or {}
        tok_pad = info.get("pad_id")
        if tok_pad is not None and "pad_id" in d and d["pad_id"] != tok_pad:
            raise ValueError(f"transform kind 'tokens': pad_id {d['pad_id']!r} differs from the tokenizer's "
                             f"pad_id {tok_pad!r} (rows are padded with the tokenizer's)")
        for key in ("pad_id", "mask_id", "special_ids"):
            if key not in d and info.get(key) is not None:
                d[key] = info[key]
        if "pad_id" not in d:
            raise ValueError("transform kind 'tokens': pad_id is required (set it, or configure a tokenizer "
                             "that has a pad token)")
        return TokenViews.from_dict(d)
    if kind == "function":
        _check_keys(kind, {k: v for k, v in d.items() if k != "kind"}, {"fn", "kwargs", "seed"})
        t = FunctionView.from_dict(d)
        t.resolve()
        return t
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
        n = min(len(a), len(b))     # token rows in batches of different widths
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
    sids, vws = _check_ids(sample_ids, views)
    if not torch.is_tensor(x) or x.ndim == 0 or x.shape[0] != len(sids):
        raise ValueError(f"check_deterministic: x must be a tensor with {len(sids)} rows")
    B = len(sids)
    if B == 0:
        return
    first = transform.apply(x, sids, vws)
    rev = np.arange(B)[::-1]
    idx = np.repeat(rev, 2)                                   # row, its filler, next row...
    vws2 = np.stack([vws[rev], vws[rev] + 1], axis=1).reshape(-1)
    second = transform.apply(x[torch.from_numpy(idx.copy())], sids[idx], vws2)
    who = _describe(transform)
    if first.shape[0] != B or second.shape[0] != 2 * B:
        raise ValueError(f"{who} returned {first.shape[0]} / {second.shape[0]} rows for batches of "
                         f"{B} / {2 * B}")
    pad = _pad_of(transform)
    for i in range(B):
        if not _same_row(first[i], second[2 * (B - 1 - i)], pad):
            raise ValueError(f"{who} is not deterministic: sample_id {int(sids[i])}, view {int(vws[i])} "
                             f"gave a different result when applied again in another batch (reversed, "
                             f"interleaved with other rows); draw randomness only from the generator "
                             f"it is given, never from global RNG")
