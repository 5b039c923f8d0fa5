"""FunctionView: deterministic views made by a user function `package.module:function`,
called per row with a generator seeded from (seed, sample_id, view); its identity
records the function's import path and the sha256 of its source."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.paths import import_object
from pipeline.views.base import check_keys, check_seed, transform_fingerprint
from pipeline.views.rng import MASK63, check_rows, hash_row_keys

# ---------------------------------------------------------------- a user function


def _import_function(path: str):
    return import_object(path, what="view function", noun="function")


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
            raise ValueError(f"FunctionView.fn must be an import path 'package.module:function', found {self.fn!r}")
        mod_name, _, attr = self.fn.partition(":")
        if not mod_name or not attr:
            raise ValueError(f"FunctionView.fn must look like 'package.module:function', found {self.fn!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ValueError(f"FunctionView.kwargs must be a dict with str keys, found {self.kwargs!r}")
        try:  # JSON form: it is what the manifest records, so it is what the function gets
            kwargs = json.loads(json.dumps(self.kwargs, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"FunctionView.kwargs for {self.fn!r} must be JSON (numbers, strings, lists, dicts): {e}"
            ) from None
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "seed", check_seed("FunctionView.seed", self.seed))
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
                raise ValueError(
                    f"view function {self.fn!r} changed since these views were recorded "
                    f"(source sha256 {self.source_sha256[:12]} recorded, "
                    f"{(sha or 'unavailable')[:12]} now): it would not regenerate the same inputs"
                )
            cached = (fn, sha)
            object.__setattr__(self, "_resolved", cached)
        return cached

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "fn": self.fn,
            "kwargs": json.loads(json.dumps(self.kwargs)),
            "seed": self.seed,
            "source_sha256": self.resolve()[1],
        }

    @classmethod
    def from_dict(cls, d: dict) -> FunctionView:
        d = dict(d)
        d.pop("kind", None)
        check_keys(cls.kind, d, {"fn", "kwargs", "seed", "source_sha256"})
        if "fn" not in d:
            raise ValueError("transform kind 'function': fn is required ('package.module:function')")
        return cls(**d)

    def fingerprint(self) -> str:
        return transform_fingerprint(self.to_dict())

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor:
        sids, vws = check_rows(x, sample_ids, views, f"view function {self.fn!r}")
        fn = self.resolve()[0]
        out = x.clone()
        rows = np.flatnonzero(vws > 0)
        if not len(rows):
            return out
        keys = hash_row_keys(self.seed, sids, vws)
        for i in rows:
            g = torch.Generator().manual_seed(int(keys[i]) & MASK63)
            y = fn(x[i].clone(), g, **self.kwargs)
            if not torch.is_tensor(y) or y.shape != x.shape[1:] or y.dtype != x.dtype:
                got = f"shape {tuple(y.shape)} dtype {y.dtype}" if torch.is_tensor(y) else type(y).__name__
                raise ValueError(
                    f"view function {self.fn!r} returned {got} for sample_id {int(sids[i])}, "
                    f"view {int(vws[i])}; it must return a tensor of the row's shape "
                    f"{tuple(x.shape[1:])} and dtype {x.dtype}"
                )
            out[i] = y.to(x.device)
        return out
