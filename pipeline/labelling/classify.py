"""Teacher labelling: run the teacher ONCE over every (sample, view) and store its logits.

    out = label_dataset(teacher, train_set, "runs/labels", temperature=4.0,
                        teacher={"name": "cnn", "fingerprint": fp},
                        num_views=4, view_spec=ViewSpec(shift=2, seed=0))

Shard i holds ALL views of samples [a, b) of the dataset's row order (plan_shards), rows
sample-major, views ascending: (s_a, 0), (s_a, 1), ..., (s_a, V-1), (s_a+1, 0), ...
View v of sample s is regenerated from (view_spec, s, v) alone (pipeline/views/images.py), so
the student later sees exactly the pixels the teacher labelled.

Raw logits go to the writer, which scales them by 1/T. A shard is committed atomically;
re-running label_dataset on the same URI skips committed shards (resume), and a re-run
on a complete dataset does no teacher work at all.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import storage

from pipeline.data.datasets import Source, model_inputs
from pipeline.device import AMP_DTYPES, resolve_amp, resolve_device  # noqa: F401  (re-exported)


def plan_shards(num_samples: int, *, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] sample ranges of at most shard_size samples covering [0, num_samples)."""
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    return [(a, min(a + shard_size, num_samples)) for a in range(0, int(num_samples), int(shard_size))]


# ---------------------------------------------------------------- feature hook

def _module(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(f"feature_layer {layer!r} is not a submodule of {type(model).__name__}; "
                         f"some valid names: {names}") from None


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

    def close(self):
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
        raise ValueError(f"the teacher must return logits (B, C), got "
                         f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return int(out.shape[1]), ([int(cap.out.shape[1])] if cap else None)


def feature_shape(model: nn.Module, layer: str, example) -> list[int]:
    """[F]: the flattened per-sample size of `layer`'s output (one forward of `example`,
    an input row (1, ...) or an in_shape tuple)."""
    return _probe(model, example if torch.is_tensor(example) else tuple(example), layer)[1]


# ---------------------------------------------------------------- one shard

def label_shard(model: nn.Module, inputs: Source, writer: storage.SoftLabelWriter, shard_index: int, *,
                start: int, stop: int, view_spec, num_views: int, batch_size: int = 512,
                device: str = "cpu", amp: str | None = None, feature_layer: str | None = None) -> dict:
    """Label samples [start, stop) x views 0..V-1 and commit them as shard `shard_index`.

    Moves `model` to `device` (in place) and runs it in eval mode under inference_mode;
    the model's train/eval mode is restored afterwards. Returns
    {shard, rows, samples, seconds, samples_per_s, record (the writer's commit record)}.
    """
    t0 = time.perf_counter()
    _check_views(writer, num_views)
    out = teacher_outputs(
        model, inputs, start=start, stop=stop, view_spec=view_spec, num_views=num_views,
        num_classes=writer.manifest["num_classes"], feature=writer.manifest.get("feature"),
        batch_size=batch_size, device=device, amp=amp, feature_layer=feature_layer, where=writer.uri)
    return _store_shard(writer, shard_index, start, stop, out, t0)


def _check_views(writer: storage.SoftLabelWriter, num_views: int) -> None:
    V = writer.manifest["num_views"]
    if num_views != V:
        raise ValueError(f"num_views={num_views} but the writer at {writer.uri} was opened with num_views={V}")


def _store_shard(writer: storage.SoftLabelWriter, shard_index: int, start: int, stop: int, out, t0: float) -> dict:
    """Commit teacher_outputs(...) as shard `shard_index`; the stats label_shard returns."""
    sids, views, logits, feats = out
    record = writer.write_shard(shard_index, sids, logits, views, features=feats)
    dt = time.perf_counter() - t0
    return {"shard": shard_index, "rows": len(sids), "samples": stop - start, "seconds": dt,
            "samples_per_s": (stop - start) / dt if dt > 0 else float("inf"), "record": record}


def teacher_outputs(model: nn.Module, inputs: Source, *, start: int, stop: int, view_spec,
                    num_views: int, num_classes: int, feature: dict | None = None, batch_size: int = 512,
                    device: str = "cpu", amp: str | None = None, feature_layer: str | None = None,
                    where: str = "the dataset"):
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
        raise ValueError(f"feature_layer={feature_layer!r} but the writer at {where} stores "
                         f"feature {feat['name'] if feat else None!r}")
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    cuda = dev.type == "cuda"

    # rows of this shard, sample-major: (start, 0), (start, 1), ..., (stop-1, V-1)
    pos = np.repeat(np.arange(start, stop), V)                  # (R,) positions in inputs
    views = np.tile(np.arange(V, dtype=np.int32), stop - start)  # (R,)
    sids = inputs.sample_ids[pos]                               # (R,) int64
    R = len(pos)

    logits = np.empty((R, num_classes), np.float32)
    feats = np.empty((R, int(np.prod(feat["shape"]))), np.float32) if feat else None

    model.to(dev)
    was_training = model.training
    model.eval()
    cap = _Capture(model, feature_layer) if feature_layer else None
    try:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None):
            for a in range(0, R, batch_size):
                b = min(a + batch_size, R)
                # the rows as the views (sample_id, view) name them: (B, *in_shape) floats or
                # (B, L) token ids; pinned on CUDA so the copy to the device is asynchronous
                xb = model_inputs(inputs, pos[a:b], views[a:b], view_spec)
                if cuda:
                    xb = xb.pin_memory().to(dev, non_blocking=True)
                z = model(xb)                                       # (B, C)
                if z.shape != (b - a, logits.shape[1]):
                    raise ValueError(f"the teacher returned logits of shape {tuple(z.shape)}, "
                                     f"expected ({b - a}, {logits.shape[1]}) (num_classes of the writer)")
                logits[a:b] = z.float().cpu().numpy()
                if cap:
                    if cap.out.shape[1] != feats.shape[1]:
                        raise ValueError(f"feature_layer {feature_layer!r} gives {cap.out.shape[1]} features "
                                         f"per sample but the writer expects shape {feat['shape']}")
                    feats[a:b] = cap.out.cpu().numpy()
    finally:
        model.train(was_training)
        if cap:
            cap.close()

    return sids, views, logits, feats


# ---------------------------------------------------------------- whole dataset

def check_plan(writer: storage.SoftLabelWriter, plan, sample_ids: np.ndarray, rows_per_sample) -> None:
    """A resumed run must cut shards exactly like the run that committed them. A sample is
    `rows_per_sample` stored rows: its views here; in pipeline/labelling/tokens.py its window's
    tokens, an array (one length per sample) when windows differ in length."""
    rows = np.broadcast_to(np.asarray(rows_per_sample, dtype=np.int64), (len(sample_ids),))
    planned = writer.manifest.get("planned_shards")
    if planned is not None and planned != len(plan):
        raise ValueError(f"{writer.uri} was started with {planned} shards but this run plans {len(plan)}; "
                         f"use the same shard_size and data, or overwrite=True")
    for i, rec in writer.commits().items():
        a, b = plan[i] if i < len(plan) else (0, 0)
        want = (int(rows[a:b].sum()), int(sample_ids[a]), int(sample_ids[b - 1])) if b > a else None
        got = (rec["num_rows"], rec["first_sample_id"], rec["last_sample_id"])
        if want != got:
            raise ValueError(f"{writer.uri}: committed shard {i} holds (rows, first id, last id) = {got}, "
                             f"this run's plan expects {want}; use the same shard_size, or overwrite=True")


def open_label_writer(model: nn.Module, inputs: Source, uri: str, *, backend: str = "parquet",
                      temperature: float, teacher: dict, data: dict | None = None, num_views: int = 1,
                      view_spec=None, shard_size: int = 2048, representation: str = "dense",
                      k: int | None = None, dtype: str = "float16", device: str = "cpu", amp: str | None = None,
                      feature_layer: str | None = None, storage_options: dict | None = None,
                      overwrite: bool = False, compression: str = "none"):
    """Open (or resume) the writer for labelling `inputs` with `model`.

    Returns (writer, plan, device, amp): `plan` = [(start, stop)] sample ranges, one per
    shard; `amp` is None off CUDA. Used by label_dataset and by the per-shard Prefect
    tasks, which each re-open the writer (same identity -> resume, never a wipe).
    """
    if not hasattr(inputs, "encode"):
        raise ValueError(f"inputs must be a pipeline.data.datasets Source (ArrayDataset, pipeline.data.sources...), "
                         f"got {type(inputs).__name__}")
    transform = view_spec.to_dict() if view_spec is not None else None
    if data is None:
        data = {"name": inputs.name, "split": inputs.split_spec, "fingerprint": inputs.fingerprint(),
                "transform": transform, "inputs": inputs.describe()}
    else:
        data = dict(data)
        data.setdefault("transform", transform)
        data.setdefault("inputs", inputs.describe())
        if data["transform"] != transform:
            raise ValueError(f"data['transform']={data['transform']!r} does not match view_spec "
                             f"({transform!r}); the student regenerates views from the stored transform")
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)  # warns here once, so label_shard gets None on CPU
    model.to(dev)
    num_classes, fshape = _probe(model, model_inputs(inputs, [0], [0]), feature_layer)
    if inputs.num_classes and inputs.num_classes != num_classes:
        raise ValueError(f"the teacher outputs {num_classes} classes but dataset {inputs.name!r} "
                         f"has num_classes={inputs.num_classes}")
    plan = plan_shards(len(inputs), shard_size=shard_size)
    writer = storage.SoftLabelWriter(
        uri, backend=backend, num_classes=num_classes, temperature=temperature, representation=representation,
        k=k, dtype=dtype, num_views=num_views, teacher=teacher, data=data, storage_options=storage_options,
        overwrite=overwrite, num_shards=len(plan), compression=compression,
        feature={"name": feature_layer, "shape": fshape} if feature_layer else None)
    check_plan(writer, plan, inputs.sample_ids, num_views)
    return writer, plan, dev, amp


def label_dataset(model: nn.Module, inputs: Source, uri: str, *, batch_size: int = 512,
                  progress: Callable[[dict], None] | None = None, **kw) -> dict:
    """Label every (sample, view) of `inputs` into a soft-label dataset at `uri` and finalize it.

    Keyword arguments are those of open_label_writer (backend, temperature, teacher, data,
    num_views, view_spec, shard_size, representation, k, dtype, device, amp, feature_layer,
    storage_options, overwrite, compression). `data` defaults to {name, split,
    fingerprint, transform} of `inputs` and `view_spec`. Committed shards are skipped.
    Returns {uri, manifest, shards: [label_shard stats], skipped: [shard indices], seconds, samples_per_s}.
    """
    t0 = time.perf_counter()
    writer, plan, dev, amp = open_label_writer(model, inputs, uri, **kw)
    view_spec, num_views, feature_layer = kw.get("view_spec"), kw.get("num_views", 1), kw.get("feature_layer")

    done = set(writer.committed_shards())
    skipped = sorted(i for i in done if i < len(plan))
    stats = []
    feature = writer.manifest.get("feature")
    _check_views(writer, num_views)

    def store(i: int, a: int, b: int, out, t_start: float) -> None:
        s = _store_shard(writer, i, a, b, out, t_start)
        stats.append(s)
        if progress is not None:
            progress(s)

    # On an accelerator, storing shard i overlaps the teacher's forward of shard i+1 (one
    # write in flight: at most two shards of logits in memory), so the teacher never waits.
    # On CPU the forward already uses every core; a concurrent write only oversubscribes
    # them (measured: 1.31x vs 1.09x the forward alone), so there it runs in line.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillery-store") as ex:
        pending = None
        for i, (a, b) in enumerate(plan):
            if i in done:
                continue
            t_start = time.perf_counter()
            out = teacher_outputs(model, inputs, start=a, stop=b, view_spec=view_spec, num_views=num_views,
                                  num_classes=writer.manifest["num_classes"], feature=feature,
                                  batch_size=batch_size, device=str(dev), amp=amp, feature_layer=feature_layer,
                                  where=writer.uri)
            if pending is not None:
                pending.result()
            pending = ex.submit(store, i, a, b, out, t_start)
            if dev.type == "cpu":
                pending.result()
        if pending is not None:
            pending.result()
    # a complete dataset with nothing new needs no re-finalize (which re-reads every shard)
    manifest = writer.manifest if (not stats and writer.manifest["status"] == "complete") else writer.finalize()
    dt = time.perf_counter() - t0
    labelled = sum(s["samples"] for s in stats)
    return {"uri": writer.uri, "manifest": manifest, "shards": stats, "skipped": skipped, "seconds": dt,
            "samples_per_s": labelled / dt if labelled and dt > 0 else 0.0}
