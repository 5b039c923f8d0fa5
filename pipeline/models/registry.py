"""Teacher and student model builders.

Every model is a `Classifier`: a `body` mapping inputs to a penultimate feature vector
(B, F) and a linear `head` (F -> num_classes). Hint / relational (RKD) losses use
`model.features(x)`; `model(x) == model.head(model.features(x))`.

Build from config with `build_model({"arch": "cnn", "kwargs": {...}}, in_shape=...,
num_classes=...)`; `arch` is a key of ARCHS, `timm:<name>` / `torchvision:<name>`
(pipeline/models/vision.py) or an import path "package.module:factory".

Trust: building an import-path arch imports that module and calls the factory, i.e. runs
its code. build_model trusts its caller's spec (it comes from the caller's own config);
a spec read from a file someone else wrote (a checkpoint) must be built with
`trusted_factories=` naming the import paths the user vouches for (checkpoint.load_model
does this): any other import path is refused before anything is imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pipeline.models.classifier import Classifier
from pipeline.models.vision import is_vision_arch, vision_factory
from pipeline.paths import import_object


def _image_shape(in_shape, arch: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(
            f"{arch} needs image input in_shape=(C, H, W), found {tuple(in_shape)}; "
            f"use arch 'mlp' for tabular (D,) inputs"
        )
    return tuple(int(s) for s in in_shape)


def _check_common(in_shape, num_classes):
    if not in_shape or any(int(s) < 1 for s in in_shape):
        raise ValueError(f"in_shape must be a non-empty tuple of positive ints, found {in_shape!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, found {num_classes!r}")


# ---------------------------------------------------------------- MLP


def mlp(
    *, in_shape: tuple[int, ...], num_classes: int, width: int = 256, depth: int = 2, dropout: float = 0.0
) -> Classifier:
    """Flatten -> depth x (Linear, ReLU, Dropout) -> Linear. depth=0 is logistic regression."""
    _check_common(in_shape, num_classes)
    d_in = 1
    for s in in_shape:
        d_in *= int(s)
    layers: list[nn.Module] = [nn.Flatten()]  # (B, C, H, W) or (B, D) -> (B, d_in)
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d_in = width
    return Classifier(nn.Sequential(*layers), nn.Linear(d_in, num_classes))


# ---------------------------------------------------------------- small CNN


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    # bias is redundant before BatchNorm
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn(
    *, in_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (32, 64), dropout: float = 0.0
) -> Classifier:
    """len(channels) x (conv3x3-BN-ReLU-maxpool2) -> flatten -> Linear.

    (1, 28, 28) with (32, 64): 28 -> 14 -> 7, features 64*7*7 = 3136.
    """
    _check_common(in_shape, num_classes)
    c, h, w = _image_shape(in_shape, "cnn")
    layers: list[nn.Module] = []
    for c_out in channels:
        if h < 2 or w < 2:
            raise ValueError(
                f"cnn: {len(channels)} pooling stages are too many for input "
                f"{tuple(in_shape)} (spatial size {h}x{w} before stage "
                f"with {c_out} channels)"
            )
        layers += _conv_bn_relu(c, c_out) + [nn.MaxPool2d(2)]
        c, h, w = c_out, h // 2, w // 2
    layers.append(nn.Flatten())  # (B, c, h, w) -> (B, c*h*w)
    if dropout:
        layers.append(nn.Dropout(dropout))
    return Classifier(nn.Sequential(*layers), nn.Linear(c * h * w, num_classes))


# ---------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet_cnn(
    *, in_shape: tuple[int, ...], num_classes: int, width: int = 32, blocks: tuple[int, ...] = (1, 1, 1)
) -> Classifier:
    """Stem conv -> stages of BasicBlocks (stage i: width*2**i channels, stride 2 for i>0)
    -> global average pool -> Linear. Features: width * 2**(len(blocks)-1)."""
    _check_common(in_shape, num_classes)
    c, h, w = _image_shape(in_shape, "resnet")
    if not blocks or any(int(n) < 1 for n in blocks):
        raise ValueError(f"resnet: blocks must be a non-empty tuple of ints >= 1, found {blocks!r}")
    layers: list[nn.Module] = _conv_bn_relu(c, width)
    c_in = width
    for i, n in enumerate(blocks):
        c_out = width * 2**i
        for j in range(int(n)):
            layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
            c_in = c_out
    # (B, c, h', w') -> (B, c): pool makes the head independent of input size
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(c_in, num_classes))


ARCHS = {"mlp": mlp, "cnn": small_cnn, "resnet": resnet_cnn}
# Built-in archs whose modules are heavy to import (transformers): resolved on first use.
# They take token ids (B, L) int64 ("tokens" input); factories get vocab_size / pad_id
# from the data (complete_spec) and Hugging Face weights from a local `path`.
LAZY_ARCHS = {
    "hf-encoder": "pipeline.models.hf:hf_encoder_classifier",
    "hf-sequence-classification": "pipeline.models.hf:hf_sequence_classifier",
    "bag": "pipeline.models.token_classifiers:embedding_bag",
    "transformer": "pipeline.models.token_classifiers:tiny_transformer",
    "llama": "pipeline.models.causal_lm:llama",
    "pruned": "pipeline.models.pruning:pruned",  # the teacher's layers (kwargs keep_layers / keep_every)
    "hf-causal-lm": "pipeline.models.pruning:pretrained",  # a pretrained causal LM (kwargs path)
}
# archs that start from trained weights: their perplexity before training is reported
FROM_WEIGHTS = ("pruned", "hf-causal-lm")


def _factory(arch: str):
    if is_vision_arch(arch):  # timm:<name> / torchvision:<name>, not an import path
        return vision_factory(arch)
    if is_import_path(arch):
        return _import_factory(arch)
    if arch in ARCHS:
        return ARCHS[arch]
    if arch in LAZY_ARCHS:
        return _import_factory(LAZY_ARCHS[arch])
    raise ValueError(
        f"unknown model arch {arch!r}: expected one of {sorted(ARCHS | LAZY_ARCHS)}, "
        f"timm:<name>, torchvision:<name> or an import path 'package.module:factory'"
    )


def complete_spec(spec: dict | ModelSpec, data_args: dict) -> ModelSpec:
    """The spec with the data-dependent arguments its factory accepts (vocab_size, pad_id,
    max_length of a tokenizer...) written into kwargs, so that a checkpoint saved with it
    rebuilds the same model without the data. in_shape / num_classes stay separate (the
    checkpoint records them). A kwarg the user set that conflicts with the data is an error."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    params = inspect.signature(_factory(spec.arch)).parameters
    kwargs = dict(spec.kwargs)
    for key, val in data_args.items():
        if key in ("in_shape", "num_classes") or key not in params or val is None:
            continue
        if key in kwargs and _norm(kwargs[key]) != _norm(val):
            raise ValueError(
                f"model {spec.arch!r}: kwargs {key}={kwargs[key]!r} conflicts with {key}={val!r} from the data"
            )
        kwargs[key] = val
    return ModelSpec(spec.arch, kwargs)


# ---------------------------------------------------------------- build from config


@dataclass
class ModelSpec:
    arch: str  # key of ARCHS or "package.module:factory"
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        if not isinstance(d, dict) or "arch" not in d:
            raise ValueError(f"model spec must be a dict with an 'arch' key, found {d!r}")
        unknown = sorted(set(d) - {"arch", "kwargs"})
        if unknown:
            raise ValueError(f"model spec: unknown key(s) {unknown}, expected 'arch', 'kwargs'")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"model spec: kwargs must be a dict, found {kwargs!r}")
        return cls(str(d["arch"]), dict(kwargs))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _import_factory(path: str):
    return import_object(path, what="model arch", noun="factory")


class UntrustedFactoryError(ValueError):
    """A model spec from an untrusted source names an import path nobody vouched for."""


def is_import_path(arch: str) -> bool:
    return ":" in arch and not is_vision_arch(arch)


def check_factory_trusted(arch: str, trusted_factories: Collection[str] | None, *, source: str = "model spec") -> None:
    """Refuse an import-path arch that is not in trusted_factories (None: trust all).

    Built-in arch names never import anything, so they always pass."""
    if trusted_factories is None or not is_import_path(arch) or arch in trusted_factories:
        return
    raise UntrustedFactoryError(
        f"{source}: refusing to build arch {arch!r}: it is an import path, and building it would "
        f"import and call {arch.replace(':', '.')}, code named by the file, not by you. "
        f"If you trust where it came from, name the same arch in your own config "
        f"(e.g. teacher.model.arch: {arch!r}), or load with trusted_factories={{{arch!r}}} "
        f"(trust_code=True trusts any factory)"
    )


def build_model(
    spec: dict | ModelSpec,
    *,
    in_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    trusted_factories: Collection[str] | None = None,
) -> nn.Module:
    """Build a model from {"arch": ..., "kwargs": {...}}.

    in_shape / num_classes (usually from the dataset) are passed to the factory if it
    accepts them; they may also sit in kwargs, but not conflict.

    trusted_factories=None trusts the spec (the caller's own config); a collection allows
    only those import paths, and refuses any other before importing anything.
    """
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    check_factory_trusted(spec.arch, trusted_factories)
    factory = _factory(spec.arch)

    kwargs = dict(spec.kwargs)
    for key, val in (("in_shape", in_shape), ("num_classes", num_classes)):
        if val is None:
            continue
        if key in kwargs and _norm(kwargs[key]) != _norm(val):
            raise ValueError(
                f"model {spec.arch!r}: kwargs {key}={kwargs[key]!r} conflicts with {key}={val!r} from the data"
            )
        kwargs[key] = val
    if "in_shape" in kwargs:
        kwargs["in_shape"] = tuple(int(s) for s in kwargs["in_shape"])  # yaml gives lists

    params = inspect.signature(factory).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if not takes_any:
        explicit = set(spec.kwargs)
        unknown = sorted(k for k in kwargs if k not in params and k in explicit)
        if unknown:
            raise ValueError(f"model {spec.arch!r}: unknown kwarg(s) {unknown}, valid are {sorted(params)}")
        kwargs = {k: v for k, v in kwargs.items() if k in params}  # drop unaccepted data args
    missing = sorted(
        k
        for k, p in params.items()
        if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k not in kwargs
    )
    if missing:
        raise ValueError(f"model {spec.arch!r}: missing required argument(s) {missing}")

    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec.arch!r}: factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------- the model seam

# "dense": a float tensor (B, *in_shape); "tokens": token ids (B, L) int64, padded per batch
# with the tokenizer's pad id (the model derives its attention mask as ids != pad_id)
INPUT_KINDS = ("dense", "tokens")


@dataclass(frozen=True)
class ModelAdapter:
    """How to build a teacher or student and what input it takes.

    The implementations: the built-in archs (ARCHS: "mlp", "cnn", "resnet", taking "dense"
    input; LAZY_ARCHS: Hugging Face encoders and token students, taking "tokens") and an
    import path "pkg.mod:factory". A factory declares its kind with an `input_kind`
    attribute (read only once the factory is trusted and imported; default "dense").
    trusted_factories as in build_model: None trusts the spec (the caller's own config)."""

    spec: ModelSpec
    trusted_factories: frozenset[str] | None = None

    @property
    def input_kind(self) -> str:
        if self.spec.arch in ARCHS:
            return "dense"
        check_factory_trusted(self.spec.arch, self.trusted_factories)
        kind = getattr(_factory(self.spec.arch), "input_kind", "dense")
        if kind not in INPUT_KINDS:
            raise ValueError(f"model {self.spec.arch!r}: input_kind {kind!r} is not one of {list(INPUT_KINDS)}")
        return kind

    def build(self, in_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> nn.Module:
        return build_model(
            self.spec, in_shape=in_shape, num_classes=num_classes, trusted_factories=self.trusted_factories
        )


def model_adapter(spec: dict | ModelSpec, *, trusted_factories: Collection[str] | None = None) -> ModelAdapter:
    """The adapter for a model spec ({"arch", "kwargs"}). An untrusted import path is
    refused here, before anything is imported; an unknown arch name too."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    trusted = None if trusted_factories is None else frozenset(trusted_factories)
    check_factory_trusted(spec.arch, trusted)
    if is_vision_arch(spec.arch):
        vision_factory(spec.arch)  # an unknown name is refused now, with close names
    elif not is_import_path(spec.arch) and spec.arch not in ARCHS and spec.arch not in LAZY_ARCHS:
        raise ValueError(
            f"unknown model arch {spec.arch!r}: expected one of {sorted(ARCHS | LAZY_ARCHS)}, "
            f"timm:<name>, torchvision:<name> or an import path 'package.module:factory'"
        )
    return ModelAdapter(spec, trusted)


# ---------------------------------------------------------------- stats


def param_counts(model: nn.Module) -> dict:
    """{"params": distinct parameters (tied ones counted once), "trainable": those with
    requires_grad (the rest frozen)}."""
    distinct = {id(p): p for p in model.parameters()}.values()
    return {
        "params": sum(p.numel() for p in distinct),
        "trainable": sum(p.numel() for p in distinct if p.requires_grad),
    }


def model_stats(
    model: nn.Module,
    *,
    in_shape: tuple[int, ...] | None = None,
    batch_size: int = 1,
    repeats: int = 20,
    example: torch.Tensor | None = None,
) -> dict:
    """params, serialised state_dict size (bytes) and median CPU forward latency (ms) on a
    random (batch_size, *in_shape) input, or on `example` (one real input row: token ids
    cannot be random floats), repeated to batch_size rows."""
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, found {repeats}, {batch_size}")
    params = param_counts(model)["params"]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)

    was_training = model.training
    model.eval()
    if example is not None:
        x = example[:1].repeat(batch_size, *([1] * (example.ndim - 1)))
    else:
        x = torch.rand(batch_size, *in_shape, generator=torch.Generator().manual_seed(0))
    first = next(iter(model.parameters()), None)
    x = x if first is None else x.to(first.device)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(3):  # warm-up: allocator, lazy kernels
                model(x)
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return {"params": params, "size_bytes": buf.getbuffer().nbytes, "latency_ms": statistics.median(times)}
