"""Freezing parameters by name prefix: the one owner of what a prefix matches, for every
model (a teacher fine-tuned with `teacher.freeze`, Hugging Face and timm / torchvision
models' `freeze_prefixes` kwargs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn


def matches(name: str, prefix: str) -> bool:
    """Whole name components: "encoder.layer.1" matches "encoder.layer.1.w", not "encoder.layer.10.w"."""
    p = prefix.rstrip(".")
    return name == p or name.startswith(p + ".")


def freeze_by_prefix(
    module: nn.Module, prefixes: Iterable[str], *, what: str = "model", valid: list[str] | None = None
) -> list[str]:
    """requires_grad=False on every parameter of `module` whose name starts with one of the
    prefixes. A prefix matching nothing is a ValueError listing valid prefixes (`valid`, or
    the top-level names). Returns the frozen parameter names, in the module's order."""
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    named = list(module.named_parameters())
    frozen = []
    for prefix in prefixes:
        hits = [(n, p) for n, p in named if matches(n, str(prefix))]
        if not hits:
            tops = valid if valid is not None else list(dict.fromkeys(n.split(".")[0] for n, _ in named))
            raise ValueError(f"{what}: freeze prefix {prefix!r} matches no parameter; valid prefixes include {tops}")
        for n, p in hits:
            p.requires_grad_(False)
            frozen.append(n)
    return list(dict.fromkeys(frozen))
