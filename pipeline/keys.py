"""Ed25519 keys for signed label datasets (storage/signing.py says what is signed and
checks it; this module holds the cryptography, from the `cryptography` package, which
storage/ does not depend on).

    signer = load_signer("keys/distillery.key")      # SoftLabelWriter(..., signer=signer)
    verifier = load_verifier("keys/distillery.pub")  # open_soft_labels(..., verifier=verifier)
    generate("keys")                                 # `distill keygen keys`

A key is named by `key_id`: the first 16 hex digits of the sha256 of its 32 raw public
bytes, so a refusal can say which key signed. A verifier keeps only those raw bytes, so it
pickles into DataLoader worker processes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG = "ed25519"


def _read(key: Any, what: str) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, (str, os.PathLike)):
        try:
            with open(os.path.expanduser(os.fspath(key)), "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{what} key file {os.fspath(key)!r} cannot be read: {e.strerror}") from None
    raise ValueError(f"a {what} key must be a PEM file path or PEM bytes, got {type(key).__name__}")


def _name(key: Any) -> str:
    return repr(os.fspath(key)) if isinstance(key, (str, os.PathLike)) else "(given as bytes)"


def _key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


class Ed25519Signer:
    """Signs payloads with a private key: {"alg": "ed25519", "key": key_id, "value": hex}."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.key_id = _key_id(private_key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))

    def sign(self, payload: bytes) -> dict:
        return {"alg": ALG, "key": self.key_id, "value": self._key.sign(payload).hex()}


class Ed25519Verifier:
    """check(payload, signature) -> None when `signature` is this key's over `payload`,
    else the problem as a phrase (storage prefixes the file it read)."""

    def __init__(self, raw_public: bytes):
        Ed25519PublicKey.from_public_bytes(raw_public)  # 32 bytes of a valid key, checked now
        self.raw, self.key_id = bytes(raw_public), _key_id(raw_public)

    def check(self, payload: bytes, signature: Any) -> str | None:
        if (
            not isinstance(signature, dict)
            or signature.get("alg") != ALG
            or not isinstance(signature.get("value"), str)
        ):
            return f"is not signed, and a signed dataset (key {self.key_id}) was required"
        if signature.get("key") != self.key_id:
            return f"is signed by key {signature.get('key')!r}, not by the required key {self.key_id}"
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(bytes.fromhex(signature["value"]), payload)
        except (InvalidSignature, ValueError):
            return f"has a signature (key {self.key_id}) that does not match its content: it was modified after signing"
        return None


def load_signer(key: Any) -> Ed25519Signer:
    """A signer from an unencrypted PEM private key (a path or bytes)."""
    try:
        k = ser.load_pem_private_key(_read(key, "private"), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"signing key {_name(key)} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(k, Ed25519PrivateKey):
        raise ValueError(f"signing key {_name(key)} is a {type(k).__name__}, not an Ed25519 key")
    return Ed25519Signer(k)


def load_verifier(key: Any) -> Ed25519Verifier:
    """A verifier from a PEM public key (a path or bytes), or a verifier (returned as is)."""
    if isinstance(key, Ed25519Verifier):
        return key
    try:
        k = ser.load_pem_public_key(_read(key, "public"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"public key {_name(key)} is not a PEM public key: {e}") from None
    if not isinstance(k, Ed25519PublicKey):
        raise ValueError(f"public key {_name(key)} is a {type(k).__name__}, not an Ed25519 key")
    return Ed25519Verifier(k.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


def generate(directory: str, name: str = "distillery") -> tuple[str, str]:
    """Write a new key pair `name.key` (private, mode 0600) and `name.pub`; their paths.
    Never overwrites a key."""
    os.makedirs(directory, exist_ok=True)
    priv, pub = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.pub")
    for p in (priv, pub):
        if os.path.exists(p):
            raise FileExistsError(f"{p} exists; keygen never overwrites a key")
    k = Ed25519PrivateKey.generate()
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    with open(pub, "wb") as f:
        f.write(k.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub
