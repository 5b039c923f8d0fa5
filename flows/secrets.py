"""Storage credentials by reference: secrets never become Prefect parameters.

Prefect stores every flow and task parameter in its database and returns it from the
API, so a literal `label.storage_options.secret` would be readable by anyone with API
access. A storage option value may therefore be a reference, resolved only inside the
task that opens the store:

    env:NAME                 the environment variable NAME where the task runs
    prefect-secret:BLOCK     the Prefect Secret block BLOCK (`prefect block register`, UI)

A literal value under a sensitive key (`key`, `secret`, `token`, `password`, ... in
`label.storage_options`, also nested, e.g. `client_kwargs`) still works but is moved out
of the parameters: the CLI and the flows put it into an environment variable of this
process (`DISTILL_SECRET_<hash>`) and pass `env:DISTILL_SECRET_<hash>` instead. That
reaches thread and process task runners on this machine; remote workers (Dask, work
pools) need a reference they can resolve themselves.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

SENSITIVE = (
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "access_key",
    "secret_key",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "sas_token",
    "account_key",
    "client_secret",
)
ENV_PREFIX = "env:"
BLOCK_PREFIX = "prefect-secret:"
REDACTED = "***"


def is_sensitive(key: str) -> bool:
    k = key.lower()
    return any(k.endswith(s) for s in SENSITIVE)  # "secret", "aws_secret_access_key", ...


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith((ENV_PREFIX, BLOCK_PREFIX))


def _stash(value: str) -> str:
    name = "DISTILL_SECRET_" + hashlib.sha256(value.encode()).hexdigest()[:12].upper()
    os.environ[name] = value
    return ENV_PREFIX + name


def to_references(options: Any) -> Any:
    """A copy of storage options in which every literal sensitive value is a reference."""
    if isinstance(options, dict):
        return {
            k: (_stash(v) if isinstance(v, str) and is_sensitive(k) and not is_reference(v) else to_references(v))
            for k, v in options.items()
        }
    if isinstance(options, list):
        return [to_references(v) for v in options]
    return options


def resolve(options: Any, where: str = "label.storage_options") -> Any:
    """Storage options with every reference replaced by its value (inside a task only)."""
    if isinstance(options, dict):
        return {k: resolve(v, f"{where}.{k}") for k, v in options.items()}
    if isinstance(options, list):
        return [resolve(v, where) for v in options]
    if isinstance(options, str) and options.startswith(ENV_PREFIX):
        name = options[len(ENV_PREFIX) :]
        if name not in os.environ:
            raise ValueError(
                f"{where} refers to the environment variable {name}, which is not set here "
                f"(on a remote worker, set it there, or use prefect-secret:BLOCK)"
            )
        return os.environ[name]
    if isinstance(options, str) and options.startswith(BLOCK_PREFIX):
        name = options[len(BLOCK_PREFIX) :]
        from prefect.blocks.system import Secret

        try:
            return Secret.load(name).get()
        except ValueError as e:
            raise ValueError(
                f"{where} refers to the Prefect Secret block {name!r}, which cannot be loaded: {e}"
            ) from None
    return options


def for_parameters(raw: dict) -> dict:
    """A config dict safe to hand to Prefect as a parameter (literal secrets -> references)."""
    label = raw.get("label")
    if isinstance(label, dict) and label.get("storage_options"):
        raw = dict(raw, label=dict(label, storage_options=to_references(label["storage_options"])))
    return raw


def scrub_overrides(overrides: list[str] | None) -> list[str] | None:
    """`label.storage_options.secret=XYZ` -> `label.storage_options.secret=env:DISTILL_SECRET_...`."""
    if not overrides:
        return overrides
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        last = key.rsplit(".", 1)[-1]
        if sep and "storage_options" in key and is_sensitive(last) and not is_reference(value):
            item = f"{key}={_stash(value)}"
        out.append(item)
    return out


def redact(value: Any) -> Any:
    """For logs and reports: every sensitive value shown as ***."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_sensitive(k) and isinstance(v, str) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
