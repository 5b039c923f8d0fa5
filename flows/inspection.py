"""`distill inspect`: a dataset's summary, its verification, and the replay of stored rows
with the teacher."""
from __future__ import annotations

import json

import storage
from pipeline.checkpoint import load_model
from storage import Location

from .inputs import _splits
from .recipes import summarize


def inspect(uri: str, *, verify: bool = False, storage_options: dict | None = None) -> tuple[dict, object | None]:
    """(manifest summary, verify report or None) for `distill inspect`."""
    m = storage.read_manifest(Location(uri, storage_options))
    report = storage.verify(uri, storage_options=storage_options) if verify else None
    return summarize(m, uri), report


def replay(uri: str, n: int, *, storage_options: dict | None = None, trusted_factories=(), seed: int = 0) -> dict:
    """`distill inspect URI --replay N`: rebuild the labelled inputs from the config data
    section the manifest records, check they are the ones labelled (fingerprint), and
    recompute N random stored rows with the recorded teacher (pipeline/replay.py)."""
    from pipeline.replay import replay_rows
    from pipeline.transforms import transform_from_dict
    ds = storage.open_soft_labels(uri, storage_options=storage_options)
    m = ds.manifest
    recipe = (m.get("data") or {}).get("recipe")
    if not recipe:
        raise ValueError(f"{uri}: the manifest records no data recipe (labelled by an older distillery or "
                         f"outside `distill label`), so its inputs cannot be rebuilt for a replay")
    inputs = _splits(json.dumps(recipe["data"], sort_keys=True))[recipe["label_split"]]
    if inputs.fingerprint() != m["data"]["fingerprint"]:
        raise ValueError(f"{uri}: the inputs rebuilt from the recorded data section have fingerprint "
                         f"{inputs.fingerprint()[:16]}, the labels were made from {m['data']['fingerprint'][:16]}: "
                         f"the data files changed since labelling")
    transform = transform_from_dict(m["data"].get("transform"))
    model, _ = load_model(m["teacher"]["checkpoint"], trusted_factories=trusted_factories)
    return replay_rows(model, inputs, ds, n=n, transform=transform, seed=seed)
