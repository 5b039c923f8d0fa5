"""Vision models by name from timm and torchvision, as distillery teachers and students.

    arch: timm:resnet18                  timm.create_model("resnet18", num_classes=C, in_chans=C_in, **kwargs)
    arch: torchvision:mobilenet_v3_small torchvision.models.get_model(name, weights=None, num_classes=C, **kwargs)

num_classes and in_chans come from the data; `kwargs` go to the library's constructor, except
our own keys:

    checkpoint: path         initial weights: a .safetensors file or a torch state dict (loaded
                             with weights_only=True; {"state_dict": ...} / {"model": ...} wrappers
                             are unwrapped). Every key and shape must fit; a checkpoint of another
                             architecture or class count is refused naming what does not fit.
    new_head: true           load the checkpoint's body but not its classifier (another class
                             count: ImageNet weights fine-tuned on 10 classes); the head starts fresh
    freeze_prefixes: [...]   parameter-name prefixes frozen (requires_grad False), e.g. ["body.conv1"]
    train_only_head: true    freeze everything but the classifier (a linear probe)
    pretrained: true         refused: it downloads from a hub at build time, which distillery never
                             does (weights must be a file the lineage can name); save the weights
                             once and give `checkpoint:` instead

The result behaves like models.Classifier: model(x) == model.head(model.features(x)), with
`.feature_dim`, so hint / RKD losses and head replacement work. For timm, features(x) is
`forward_head(forward_features(x), pre_logits=True)` (the pooled pre-logits timm itself
feeds its classifier); a hint on an inner layer names it by `label.feature_layer` as for any
model. For torchvision, the final Linear that produces the classes becomes the head and the
rest is the body. torchvision's models take 3 channels: a 1-channel input is repeated to 3.
"""

from __future__ import annotations

import difflib
import functools
import os

import torch
import torch.nn as nn

from pipeline.models.classifier import Classifier
from pipeline.models.freezing import freeze_by_prefix

LIBRARIES = ("timm", "torchvision")
OWN_KEYS = ("checkpoint", "new_head", "freeze_prefixes", "train_only_head")


def is_vision_arch(arch: str) -> bool:
    return arch.split(":", 1)[0] in LIBRARIES and ":" in arch


def vision_factory(arch: str):
    """The factory for `timm:<name>` / `torchvision:<name>`: unknown names are refused here,
    suggesting close ones, before anything is built."""
    lib, _, name = arch.partition(":")
    known = _names(lib)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'{lib}:{c}' for c in close)}?" if close else ""
        raise ValueError(f"unknown {lib} model {name!r} (arch {arch!r}){hint}")
    return functools.partial(vision_model, lib, name)


@functools.cache
def _names(lib: str) -> tuple[str, ...]:
    if lib == "timm":
        import timm

        return tuple(timm.list_models())
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))  # classification models only


def vision_model(
    lib: str,
    name: str,
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    checkpoint: str | None = None,
    new_head: bool = False,
    freeze_prefixes: list[str] | None = None,
    train_only_head: bool = False,
    **kwargs,
) -> nn.Module:
    what = f"{lib}:{name}"
    if len(in_shape) != 3:
        raise ValueError(f"{what} needs image input (C, H, W), found in_shape {tuple(in_shape)}")
    if kwargs.pop("pretrained", False) or kwargs.get("weights") not in (None, False):
        raise ValueError(
            f"{what}: pretrained weights are downloaded from a hub when the model is built, which "
            f"distillery never does (offline machines; the lineage must name a file): save them once "
            f"(torch.save(model.state_dict(), 'w.pt') or safetensors) and give kwargs.checkpoint: w.pt"
        )
    kwargs.pop("weights", None)
    for key in ("num_classes", "in_chans"):
        if key in kwargs:
            raise ValueError(f"{what}: kwargs.{key} comes from the data; drop it")
    c_in = int(in_shape[0])
    try:
        if lib == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=c_in, **kwargs)
        else:
            import torchvision

            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:  # an unknown kwarg
        raise ValueError(f"{what}: {e}") from None
    head_name = _head_name(model, lib, num_classes, what)
    if checkpoint is not None:
        load_weights(model, checkpoint, what=what, skip=head_name if new_head else None)
    out = TimmClassifier(model) if lib == "timm" else _split(model, head_name, c_in)
    if freeze_prefixes:
        freeze_by_prefix(out, freeze_prefixes, what=what)
    if train_only_head:
        out.requires_grad_(False)
        out.head.requires_grad_(True)
    return out


# ---------------------------------------------------------------- the classifier seam


class TimmClassifier(nn.Module):
    """A timm model with distillery's classifier interface; parameters keep timm's names under `model.`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        head = model.get_classifier()  # the pre-logits width: head_hidden_size where a head adds a layer
        self.feature_dim = int(
            getattr(head, "in_features", None) or getattr(model, "head_hidden_size", model.num_features)
        )

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> feature map -> pooled pre-logits (B, F)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, num_classes)


class _RepeatChannels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)  # (B, 1, H, W) -> (B, 3, H, W), a view


def _head_name(model: nn.Module, lib: str, num_classes: int, what: str) -> str:
    """The name of the Linear that produces the classes: the last Linear with num_classes outputs."""
    if lib == "timm":
        head = model.get_classifier()
        for n, m in model.named_modules():
            if m is head:
                return n
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not names:
        raise ValueError(f"{what} has no final Linear classifier with {num_classes} outputs to use as the head")
    return names[-1]


def _split(model: nn.Module, head_name: str, c_in: int):
    """A torchvision model as Classifier(body, head): the head Linear swapped for Identity in the body."""
    if c_in not in (1, 3):
        raise ValueError(f"torchvision models take 3 (or 1, repeated) channels, found {c_in}")
    head = model.get_submodule(head_name)
    parent, _, leaf = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    body = model if c_in == 3 else nn.Sequential(_RepeatChannels(), model)
    return Classifier(body, head)


# ---------------------------------------------------------------- weights from a file


def read_state_dict(path: str, *, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (weights_only: no code runs)."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: checkpoint {path!r} is not a file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line naming it
        raise ValueError(f"{what}: cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{what}: checkpoint {path!r} is not a state dict (name -> tensor)")
    return sd


def load_weights(model: nn.Module, path: str, *, what: str, skip: str | None = None) -> None:
    """Load `path` into `model`; every key and shape must fit (but those under `skip`, the head
    when new_head), else one ValueError naming what does not."""
    sd = read_state_dict(path, what=what)
    own = model.state_dict()
    if skip:
        own = {k: v for k, v in own.items() if not k.startswith(skip + ".")}
        sd = {k: v for k, v in sd.items() if not k.startswith(skip + ".")}
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        parts = []
        if shapes:
            parts.append(f"shapes differ: {', '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} unexpected keys, e.g. {extra[:3]}")
        hint = " (another class count? kwargs.new_head: true keeps the body and starts a fresh head)" if shapes else ""
        raise ValueError(f"{what}: checkpoint {path!r} does not fit: {'; '.join(parts)}{hint}")
    model.load_state_dict(sd, strict=not skip)
