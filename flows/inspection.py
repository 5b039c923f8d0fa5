"""`distill inspect`: a dataset's summary, its verification, and the replay of stored rows
with the teacher."""

from __future__ import annotations

import json

import storage
from pipeline.models.checkpoint import load_model
from pipeline.training.stream import verifier
from storage import Location

from .inputs import splits_of


def inspect(
    uri: str, *, verify: bool = False, storage_options: dict | None = None, public_key: str | None = None
) -> tuple[dict, object | None]:
    """(manifest summary, verify report or None) for `distill inspect`. With public_key the
    dataset must be signed by it: checked by open (manifest, shard 0's record), or by verify
    (every record)."""
    m = storage.read_manifest(Location(uri, storage_options))
    v = verifier(public_key)
    if v is not None and not verify:
        storage.open_soft_labels(uri, storage_options=storage_options, verifier=v)
    report = storage.verify(uri, storage_options=storage_options, verifier=v) if verify else None
    return summarize(m, uri, tokens=False), report


def replay(uri: str, n: int, *, storage_options: dict | None = None, trusted_factories=(), seed: int = 0) -> dict:
    """`distill inspect URI --replay N`: rebuild the labelled inputs from the config data
    section the manifest records, check they are the ones labelled (fingerprint), and
    recompute N random stored rows with the recorded teacher (pipeline/labelling/replay.py)."""
    from pipeline.labelling.replay import replay_rows
    from pipeline.views.transforms import transform_from_dict

    ds = storage.open_soft_labels(uri, storage_options=storage_options)
    m = ds.manifest
    recipe = (m.get("data") or {}).get("recipe")
    if not recipe:
        raise ValueError(
            f"{uri}: the manifest records no data recipe (labelled by an older distillery or "
            f"outside `distill label`), so its inputs cannot be rebuilt for a replay"
        )
    if "corpus" in recipe:
        return _replay_tokens(ds, recipe, n, seed)
    # key order matters: splits are cut in the order data.sizes names them (the manifest
    # keeps the config's order; sorting the keys here would pick other samples)
    inputs = splits_of(json.dumps(recipe["data"]))[recipe["label_split"]]
    if inputs.fingerprint() != m["data"]["fingerprint"]:
        raise ValueError(
            f"{uri}: the inputs rebuilt from the recorded data section have fingerprint "
            f"{inputs.fingerprint()[:16]}, the labels were made from {m['data']['fingerprint'][:16]}: "
            f"the data files changed since labelling"
        )
    transform = transform_from_dict(m["data"].get("transform"))
    model, _ = load_model(m["teacher"]["checkpoint"], trusted_factories=trusted_factories)
    return replay_rows(model, inputs, ds, n=n, transform=transform, seed=seed)


def _replay_tokens(ds, recipe: dict, n: int, seed: int) -> dict:
    """--replay of language-model labels: the recorded teacher (its fingerprint checked)
    over the recorded corpus windows (theirs too)."""
    from pipeline.data.corpus import corpus_splits
    from pipeline.labelling.replay import replay_token_rows
    from pipeline.models.gguf import load_causal_lm, teacher_fingerprint

    from .lm import teacher_from_source

    m = ds.manifest
    teacher_dir = teacher_from_source(m["teacher"]["source"])
    fp = teacher_fingerprint(teacher_dir)
    if fp != m["teacher"]["fingerprint"]:
        raise ValueError(
            f"{ds.uri}: the teacher at {m['teacher']['source']} has fingerprint {fp[:16]}, the labels were "
            f"made by {m['teacher']['fingerprint'][:16]}: the teacher file was modified or corrupt"
        )
    corpus = corpus_splits(recipe["corpus"], teacher_dir)[recipe["label_split"]]
    if m["data"].get("generation"):  # the teacher's written answers: replayed by one plain forward each
        from pipeline.data.generated import generated_corpus

        corpus = generated_corpus(ds, corpus)  # refuses prompts of another corpus, split or template
    elif corpus.fingerprint() != m["data"]["fingerprint"]:
        raise ValueError(
            f"{ds.uri}: the windows rebuilt from the recorded corpus section have fingerprint "
            f"{corpus.fingerprint()[:16]}, the labels were made from {m['data']['fingerprint'][:16]}: "
            f"the corpus files changed since labelling"
        )
    return replay_token_rows(load_causal_lm(teacher_dir), corpus, ds, n=n, seed=seed)


def token_summary(uri: str, *, storage_options: dict | None = None, max_rows: int = 1 << 22) -> dict | None:
    """For a token-label dataset (token_topk / token_sampled): tokens, sequence length,
    vocabulary, bytes per token on disk, and the distribution over token positions of the
    teacher's missing mass (top-k: the probability outside the kept ids) or of the unique
    ids kept per position (sampled), from up to max_rows positions. None for other kinds."""
    import numpy as np

    ds = storage.open_soft_labels(uri, storage_options=storage_options)
    m = ds.manifest
    rep = m["representation"]
    if rep["kind"] not in ("token_topk", "token_sampled"):
        return None
    col = "missing_mass" if rep["kind"] == "token_topk" else "sample_counts"
    parts, rows = [], 0
    for b in ds.iter_batches(1 << 16, shuffle=False, columns=[col]):
        v = np.asarray(b[col])
        v = v.astype(np.float64) if col == "missing_mass" else (v > 0).sum(axis=1).astype(np.float64)
        parts.append(v[~np.asarray(b["pad"], bool)])
        rows += len(v)
        if rows >= max_rows:
            break
    v = np.concatenate(parts) if parts else np.zeros(0)
    q = {f"p{p}": float(np.percentile(v, p)) for p in (50, 90, 99)} if len(v) else {}
    n = int(m["num_tokens"])
    return {
        "num_tokens": n,
        "seq_len": m["seq_len"],
        "num_sequences": int(ds.num_sequences),
        "vocab_size": m["vocab_size"],
        "kind": rep["kind"],
        "k": rep.get("k"),
        "draws": rep.get("draws"),
        "dtype": rep.get("dtype"),
        "id_bits": rep.get("id_bits"),
        "bytes_per_token": storage.total_bytes(m) / max(n, 1),
        "measured": col,
        "positions": int(len(v)),
        "mean": float(v.mean()) if len(v) else None,
        "max": float(v.max()) if len(v) else None,
        **q,
    }


def summarize(m: dict, uri: str, storage_options: dict | None = None, *, tokens: bool = True) -> dict:
    """A dataset's manifest in a few numbers (and, for token labels, bytes per token and
    the missing-mass or unique-id distribution)."""
    out = {
        "uri": uri,
        "status": m["status"],
        "backend": m["backend"],
        "num_samples": m["num_samples"],
        "num_rows": m["num_rows"],
        "num_views": m["num_views"],
        "num_classes": m["num_classes"],
        "temperature": m["temperature"],
        "representation": m["representation"],
        "num_shards": m.get("num_shards"),
        "format_version": m["format_version"],
        "signed_by": (m.get("signature") or {}).get("key"),
        "bytes": storage.total_bytes(m),
        "teacher": m["teacher"],
        "data": {
            k: m["data"].get(k) for k in ("name", "split", "fingerprint", "transform", "inputs", "generation", "bytes")
        },
    }
    if tokens and m["status"] == "complete" and m["representation"]["kind"].startswith("token_"):
        tok = token_summary(uri, storage_options=storage_options)
        keep = (
            "num_tokens",
            "kind",
            "k",
            "draws",
            "dtype",
            "id_bits",
            "bytes_per_token",
            "measured",
            "mean",
            "p50",
            "p90",
        )
        out["tokens"] = {k: tok[k] for k in keep if k in tok}
    return out
