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


def replay_token_rows(model: nn.Module, corpus, labels, *, n: int, seed: int = 0, device: str = "cpu") -> dict:
    """Recompute the token labels of `n` random stored windows of `corpus` (a TokenCorpus,
    the labelled split) with the teacher, one window per forward, and compare.

    top-k: per position, the same ids in the same order, log-probs within the stored
    precision (uint8 codes: half a step, after the codes' clipping; floats: RTOL) and the
    missing mass within 1e-4; sampled: the same draws (ids and counts, seeded per window as
    labelling seeds them). A few positions may differ where two logits are within float
    noise of each other (the labelling batch held 8 windows, this one 1): the replay
    passes when at most 1% of positions differ and no value is outside its tolerance.
    Returns replay_rows' keys plus {"positions", "mismatched", "what"}."""
    from pipeline.device import resolve_device
    from pipeline.labelling.tokens import shard_labels

    m = labels.manifest
    rep = m["representation"]
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"replay needs n >= 1 windows, got {n!r}")
    pick = np.sort(np.random.default_rng(seed).choice(len(corpus), size=min(n, len(corpus)), replace=False))
    sids = corpus.sample_ids[pick]
    stored = labels.take_sequences(sids)
    spec = {"representation": rep["kind"], "k": rep.get("k"), "draws": rep.get("draws")}
    draw_seed = int(((m.get("extra") or {}).get("sampling") or {}).get("seed", 0))
    dev = resolve_device(device)
    topk = rep["kind"] == "token_topk"
    step = rep.get("logprob_step")
    tol = step / 2 + 1e-4 if rep.get("dtype") == "uint8" else None
    positions = mismatched = 0
    worst = (-np.inf, 0.0, int(sids[0]))  # (excess, |diff|, sample id)
    for j, p in enumerate(pick):
        got = shard_labels(model, corpus, int(p), int(p) + 1, specs=[spec], seed=draw_seed, batch_size=1, dev=dev)[0]
        L = int(stored["length"][j])
        positions += L
        if topk:
            ids_s, lp_s = stored["topk_ids"][j, :L], stored["topk_logprobs"][j, :L]
            same = (ids_s == got["ids"]).all(axis=1)  # (L,)
            want = got["logprobs"].astype(np.float32)
            if tol is not None:  # what the codes can hold: -code * step, code in 0..255
                want = np.clip(want, -255 * step, 0.0)
                allowed = np.full_like(want, tol)
            else:
                allowed = RTOL.get(rep.get("dtype"), 2.0**-10) * np.abs(want) + ATOL
            diff = np.abs(lp_s - want)[same]
            excess = (diff - allowed[same]).max() if same.any() else -np.inf
            mm = np.abs(stored["missing_mass"][j, :L] - got["missing_mass"])[same]
            excess = max(excess, (mm - 1e-4).max() if len(mm) else -np.inf)
            d = float(diff.max()) if diff.size else 0.0
        else:
            u = got["ids"].shape[1]
            s_ids, s_cnt = stored["sample_ids"][j, :L], stored["sample_counts"][j, :L]
            w = max(u, s_ids.shape[1])
            same = (_pad(s_ids, w) == _pad(got["ids"], w)).all(axis=1) & (_pad(s_cnt, w) == _pad(got["counts"], w)).all(
                axis=1
            )
            excess, d = -np.inf, 0.0
        mismatched += int((~same).sum())
        if excess > worst[0]:
            worst = (float(excess), d, int(sids[j]))
    frac = mismatched / max(positions, 1)
    return {
        "rows": int(len(pick)),
        "positions": int(positions),
        "mismatched": int(mismatched),
        "max_abs_diff": worst[1],
        "max_excess": worst[0] if np.isfinite(worst[0]) else 0.0,
        "ok": bool(worst[0] <= 0 and frac <= 0.01),
        "worst": {"sample_id": worst[2], "view": 0, "abs_diff": worst[1]},
        "what": (
            f"positions whose top-{rep.get('k')} ids differ: {mismatched} of {positions}; largest |stored - log p|"
            if topk
            else f"positions whose sampled draws differ: {mismatched} of {positions}; largest difference"
        ),
    }


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    """(N, u) -> (N, width) with zero columns (sampled labels pad ids and counts with 0)."""
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))
