"""Replay: recompute stored rows with the teacher and compare (TinyViT's --check-saved-logits).

A stored soft label is only as good as the promise that the student will see the very
input the teacher labelled. Replay checks that promise end to end: it draws N random
stored (sample_id, view) rows, regenerates their inputs exactly as training does
(data.model_inputs: encode, then the stored view transform), runs the teacher, and
compares its logits with what is stored. A non-deterministic view function, another
tokenizer, a changed image file or a teacher that is not the one that labelled show up
as a difference.

Tolerance: stored values are z/T rounded to the stored dtype, so a row matches when
    |stored - z/T| <= rtol * |z/T| + atol,   rtol = 2 * 2**-11 (float16; 2**-23 float32)
plus a small atol for the teacher's own float non-associativity across batch sizes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.datasets import Source, model_inputs

RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-22}
ATOL = 1e-3


def replay_rows(
    model: nn.Module,
    inputs: Source,
    labels,
    *,
    n: int,
    transform=None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """Recompute `n` random stored rows of `labels` (a storage.SoftLabelDataset of `inputs`).

    Returns {"rows": n, "max_abs_diff", "max_excess" (the largest |diff| beyond the
    tolerance; <= 0 means every row matches), "ok", "worst": {sample_id, view, abs_diff}}.
    """
    m = labels.manifest
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"replay needs n >= 1 rows, got {n!r}")
    T = float(m["temperature"])
    kind = m["representation"]["kind"]
    dtype = m["representation"].get("dtype", "float16")
    rtol = RTOL.get(dtype, 2.0**-10)

    # draw rows: sample ids from the inputs (the stored ids must be exactly these), views uniform
    rng = np.random.default_rng(seed)
    V = int(m["num_views"])
    pos = rng.choice(len(inputs), size=min(n, len(inputs) * V), replace=len(inputs) < n)
    views = rng.integers(0, V, len(pos))
    sids = inputs.sample_ids[pos]
    cols = ["logits"] if kind == "dense" else ["topk_indices", "topk_logits"]
    stored = labels.take(sids, views, columns=cols)

    model = model.to(device)
    was = model.training
    model.eval()
    zs = []
    try:
        with torch.inference_mode():
            for a in range(0, len(pos), batch_size):
                x = model_inputs(inputs, pos[a : a + batch_size], views[a : a + batch_size], transform)
                zs.append(model(x.to(device)).float().cpu())
    finally:
        model.train(was)
    z = (torch.cat(zs) / T).numpy()  # (n, C) what should be stored: z / T

    if kind == "dense":
        got = np.asarray(stored["logits"], np.float32)  # (n, C)
        want = z
    else:  # compare at the stored top-k ids
        idx = np.asarray(stored["topk_indices"], np.int64)  # (n, k)
        got = np.asarray(stored["topk_logits"], np.float32)
        want = np.take_along_axis(z, idx, axis=1)
    diff = np.abs(got - want)  # (n, C | k)
    excess = diff - (rtol * np.abs(want) + ATOL)
    worst = int(np.argmax(excess.max(axis=1)))
    return {
        "rows": int(len(pos)),
        "max_abs_diff": float(diff.max()),
        "max_excess": float(excess.max()),
        "ok": bool(excess.max() <= 0),
        "worst": {"sample_id": int(sids[worst]), "view": int(views[worst]), "abs_diff": float(diff[worst].max())},
    }
