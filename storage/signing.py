"""Signed datasets (optional): what is signed, where the signatures live, and the checks.
The cryptography is not here (storage depends on numpy, pyarrow, zarr and fsspec only): a
writer is given a `signer` (`.sign(payload) -> {"alg", "key", "value"}`) and a reader a
`verifier` (`.check(payload, signature) -> None | problem`, picklable);
pipeline/keys.py makes Ed25519 ones from PEM files.

Digests and checksums catch damage and careless edits, but a forger who rewrites a shard,
its index entry, its commit record and the manifest digest consistently cannot be caught
without a secret. A signing writer signs:

  * the manifest: `signature` over its `digest` string (the digest covers every other
    field, the index files' sha256 and through them every shard's sha256);
  * every commit record: `signature` over the record's canonical JSON without `signature`.

A reader given a verifier refuses a manifest or any commit record it reads that is
unsigned, signed by another key, or signed over other bytes (docs/format.md, "Signed
datasets").
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from .errors import ManifestError


class Signer(Protocol):
    key_id: str

    def sign(self, payload: bytes) -> dict: ...


class Verifier(Protocol):
    key_id: str

    def check(self, payload: bytes, signature: Any) -> str | None: ...


def record_payload(record: dict) -> bytes:
    """The bytes a commit record's signature covers: its canonical JSON without `signature`."""
    body = {k: v for k, v in record.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_payload(manifest: dict) -> bytes:
    """The bytes a manifest's signature covers: its digest (which covers everything else)."""
    return str(manifest.get("digest", "")).encode()


def check(verifier: Verifier, payload: bytes, signature: Any, where: str) -> None:
    problem = verifier.check(payload, signature)
    if problem is not None:
        raise ManifestError(f"{where} {problem}")
