"""A classifier teacher's part of labelling: its logits (and a feature) for every
(sample, view), the labeller that labelling/loop.py runs.

    out = label_dataset(teacher, train_set, "runs/labels", temperature=4.0,
                        teacher={"name": "cnn", "fingerprint": fp},
                        num_views=4, view_spec=ViewSpec(shift=2, seed=0))

Shard i holds ALL views of samples [a, b) of the dataset's row order, rows sample-major,
views ascending: (s_a, 0), (s_a, 1), ..., (s_a, V-1), (s_a+1, 0), ... View v of sample s
is regenerated from (transform, s, v) alone (pipeline/views), so the student later sees
exactly the pixels the teacher labelled. Raw logits go to the writer, which scales them by
1/T (storage: the one division).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from pipeline.data.datasets import Source, model_inputs
from pipeline.device import AMP_DTYPES, resolve_amp, resolve_device
from pipeline.labelling.loop import label

if TYPE_CHECKING:
    from pipeline.views.base import Transform

# ---------------------------------------------------------------- feature hook


def _module(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(
            f"feature_layer {layer!r} is not a submodule of {type(model).__name__}; some valid names: {names}"
        ) from None


class _Capture:
    """Forward hook on `layer` keeping its output of the last forward, flattened to (B, F)."""

    def __init__(self, model: nn.Module, layer: str):
        self.layer, self.out = layer, None
        self.handle = _module(model, layer).register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not torch.is_tensor(output):
            raise ValueError(f"feature_layer {self.layer!r} returned {type(output).__name__}, expected a tensor")
        # clone: a later in-place op (ReLU(inplace=True)) would otherwise overwrite it
        self.out = output.flatten(1).float().clone()  # (B, F)

    def close(self) -> None:
        self.handle.remove()


def _probe(model: nn.Module, example, layer: str | None) -> tuple[int, list[int] | None]:
    """(num_classes, [F] or None) from one forward of `example`: a real input row (1, ...)
    (token ids cannot be zeros of a shape), or an in_shape tuple for a (1, *in_shape) zero input."""
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else "cpu"
    x = example.to(dev) if torch.is_tensor(example) else torch.zeros(1, *example, device=dev)
    cap = _Capture(model, layer) if layer else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        model.train(was_training)
        if cap:
            cap.close()
    if not torch.is_tensor(out) or out.ndim != 2:
        raise ValueError(
            f"the teacher must return logits (B, C), got "
            f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}"
        )
    return int(out.shape[1]), ([int(cap.out.shape[1])] if cap else None)


def feature_shape(model: nn.Module, layer: str, example: torch.Tensor | Sequence[int]) -> list[int]:
    """[F]: the flattened per-sample size of `layer`'s output (one forward of `example`,
    an input row (1, ...) or an in_shape tuple)."""
    return _probe(model, example if torch.is_tensor(example) else tuple(example), layer)[1]


# ---------------------------------------------------------------- one shard


class ViewBatches(Dataset):
    """Batch i of a shard's rows (positions pos, views) as model inputs: map-style, so a
    DataLoader computes batches in worker processes, in order."""

    def __init__(self, inputs: Source, pos: np.ndarray, views: np.ndarray, transform, batch_size: int):
        self.inputs, self.pos, self.views, self.transform, self.bs = inputs, pos, views, transform, batch_size

    def __len__(self) -> int:
        return -(-len(self.pos) // self.bs)

    def __getitem__(self, i: int) -> torch.Tensor:
        a, b = i * self.bs, min((i + 1) * self.bs, len(self.pos))
        return model_inputs(self.inputs, self.pos[a:b], self.views[a:b], self.transform)


def teacher_outputs(
    model: nn.Module,
    inputs: Source,
    *,
    start: int,
    stop: int,
    view_spec: Transform | None,
    num_views: int,
    num_classes: int,
    feature: dict | None = None,
    batch_size: int = 512,
    device: str = "cpu",
    amp: str | None = None,
    feature_layer: str | None = None,
    workers: int = 0,
    where: str = "the dataset",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The teacher's raw outputs for samples [start, stop) x views 0..V-1, sample-major:
    (sample_ids (R,), views (R,), logits (R, C) float32, features (R, F) or None). This is
    everything labelling does except storing; benchmarks time it alone."""
    n = len(inputs)
    if not (0 <= start < stop <= n):
        raise ValueError(f"{where}: need 0 <= start < stop <= {n} (len(inputs)), got [{start}, {stop})")
    V = num_views
    if num_views > 1 and (view_spec is None or view_spec.is_identity):
        raise ValueError(f"num_views={num_views} needs a non-identity view_spec; otherwise every view is view 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    feat = feature
    if (feat["name"] if feat else None) != feature_layer:
        raise ValueError(
            f"feature_layer={feature_layer!r} but the writer at {where} stores "
            f"feature {feat['name'] if feat else None!r}"
        )
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    cuda = dev.type == "cuda"

    # rows of this shard, sample-major: (start, 0), (start, 1), ..., (stop-1, V-1)
    pos = np.repeat(np.arange(start, stop), V)  # (R,) positions in inputs
    views = np.tile(np.arange(V, dtype=np.int32), stop - start)  # (R,)
    sids = inputs.sample_ids[pos]  # (R,) int64
    R = len(pos)

    logits = np.empty((R, num_classes), np.float32)
    feats = np.empty((R, int(np.prod(feat["shape"]))), np.float32) if feat else None

    # images on CUDA: channels_last (NHWC), the layout cuDNN's fast convolution kernels (and
    # bf16 autocast's tensor cores) want; a no-op for other inputs and on the CPU
    layout = torch.channels_last if cuda and len(inputs.in_shape) == 3 else torch.preserve_format
    model.to(dev)
    if layout is torch.channels_last:
        model.to(memory_format=layout)
    was_training = model.training
    model.eval()
    cap = _Capture(model, feature_layer) if feature_layer else None
    # the rows as the views (sample_id, view) name them, (B, *in_shape) floats or (B, L) token
    # ids, made in `workers` DataLoader processes (decoding and views off this thread) and
    # pinned on CUDA so the copy to the device is asynchronous
    batches = DataLoader(
        ViewBatches(inputs, pos, views, view_spec, batch_size),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
    )
    try:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None):
            for i, xb in enumerate(batches):
                a, b = i * batch_size, min((i + 1) * batch_size, R)
                if cuda:
                    xb = xb.to(dev, non_blocking=True, memory_format=layout)
                z = model(xb)  # (B, C)
                if z.shape != (b - a, logits.shape[1]):
                    raise ValueError(
                        f"the teacher returned logits of shape {tuple(z.shape)}, "
                        f"expected ({b - a}, {logits.shape[1]}) (num_classes of the writer)"
                    )
                logits[a:b] = z.float().cpu().numpy()
                if cap:
                    if cap.out.shape[1] != feats.shape[1]:
                        raise ValueError(
                            f"feature_layer {feature_layer!r} gives {cap.out.shape[1]} features "
                            f"per sample but the writer expects shape {feat['shape']}"
                        )
                    feats[a:b] = cap.out.cpu().numpy()
    finally:
        model.train(was_training)
        if cap:
            cap.close()

    return sids, views, logits, feats


# ---------------------------------------------------------------- whole dataset


# ---------------------------------------------------------------- the labeller


class ClassifyLabeller:
    """A classifier teacher over every (sample, view) of `inputs`: one output dataset of
    dense or top-k labels (labelling/loop.py runs it). The writer divides the raw logits
    by the temperature (storage: the one division).

    output: {"uri", "backend", "temperature", "representation", "k", "dtype", "compression"}
    (SoftLabelWriter's names). data: the manifest's data entry when the caller adds to it
    (a config's recipe, for `distill inspect --replay`); its transform must be the views'."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Source,
        *,
        output: dict,
        transform: Transform | None = None,
        num_views: int = 1,
        batch_size: int = 512,
        device: str = "cpu",
        amp: str | None = None,
        feature_layer: str | None = None,
        data: dict | None = None,
        workers: int = 0,
    ):
        if not hasattr(inputs, "encode"):
            raise ValueError(
                f"inputs must be a pipeline.data Source (ArrayDataset, pipeline.data.sources...), "
                f"got {type(inputs).__name__}"
            )
        if num_views > 1 and (transform is None or transform.is_identity):
            raise ValueError(f"num_views={num_views} needs a non-identity transform; otherwise every view is view 0")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model, self.inputs, self.transform, self.num_views = model, inputs, transform, num_views
        self.batch_size, self.feature_layer, self.workers = batch_size, feature_layer, workers
        self.device = resolve_device(device)
        self.amp = resolve_amp(amp, self.device)  # warns here once; None off CUDA
        model.to(self.device)
        self.num_classes, fshape = _probe(model, model_inputs(inputs, [0], [0]), feature_layer)
        if inputs.num_classes and inputs.num_classes != self.num_classes:
            raise ValueError(
                f"the teacher outputs {self.num_classes} classes but dataset {inputs.name!r} "
                f"has num_classes={inputs.num_classes}"
            )
        self.feature = {"name": feature_layer, "shape": fshape} if feature_layer else None
        self.output = dict(output)
        t = transform.to_dict() if transform is not None else None
        self._data = {
            "name": inputs.name,
            "split": inputs.split_spec,
            "fingerprint": inputs.fingerprint(),
            "transform": t,
            "inputs": inputs.describe(),
            **(data or {}),
        }
        if self._data["transform"] != t:
            raise ValueError(
                f"data['transform']={self._data['transform']!r} does not match the transform "
                f"({t!r}); the student regenerates views from the stored transform"
            )

    def outputs(self) -> list[dict]:
        return [self.output | {"num_classes": self.num_classes, "num_views": self.num_views, "feature": self.feature}]

    def rows_per_sample(self) -> int:
        return self.num_views

    def data(self) -> dict:
        return self._data

    def shard(self, start: int, stop: int, outputs: list[int]) -> list[dict]:
        sids, views, logits, feats = teacher_outputs(
            self.model,
            self.inputs,
            start=start,
            stop=stop,
            view_spec=self.transform,
            num_views=self.num_views,
            num_classes=self.num_classes,
            feature=self.feature,
            batch_size=self.batch_size,
            device=str(self.device),
            amp=self.amp,
            feature_layer=self.feature_layer,
            workers=self.workers,
            where=self.output["uri"],
        )
        return [{"sample_ids": sids, "logits": logits, "views": views, "features": feats} for _ in outputs]


def label_dataset(
    model: nn.Module,
    inputs: Source,
    uri: str,
    *,
    backend: str = "parquet",
    temperature: float,
    teacher: dict,
    data: dict | None = None,
    num_views: int = 1,
    view_spec: Transform | None = None,
    shard_size: int = 2048,
    representation: str = "dense",
    k: int | None = None,
    dtype: str = "float16",
    compression: str = "none",
    batch_size: int = 512,
    device: str = "cpu",
    amp: str | None = None,
    feature_layer: str | None = None,
    storage_options: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Label every (sample, view) of `inputs` into a soft-label dataset at `uri` and finalize
    it (labelling/loop.py in this process); committed shards are skipped, and a complete
    dataset costs no teacher work. Returns {uri, manifest, shards: [stats], skipped:
    [shard indices], seconds, samples_per_s}."""
    labeller = ClassifyLabeller(
        model,
        inputs,
        transform=view_spec,
        num_views=num_views,
        batch_size=batch_size,
        device=device,
        amp=amp,
        feature_layer=feature_layer,
        data=data,
        output={
            "uri": uri,
            "backend": backend,
            "temperature": temperature,
            "representation": representation,
            "k": k,
            "dtype": dtype,
            "compression": compression,
        },
    )
    out = label(
        labeller,
        shard_size=shard_size,
        teacher=teacher,
        storage_options=storage_options,
        overwrite=overwrite,
        progress=progress,
    )[0]
    samples = sum(s["samples"] for s in out["shards"])
    return out | {"samples_per_s": samples / out["seconds"] if samples and out["seconds"] > 0 else 0.0}
