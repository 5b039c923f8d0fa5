"""How the `distill` CLI runs Prefect: environment defaults set before Prefect is imported,
and a console that shows user-facing errors as one line instead of a traceback.

Prefect reads its settings once, at import, so `prefect_env_defaults()` must run before
anything imports `prefect` (flows.flows, flows.deploy, flows.recipes do).
"""

from __future__ import annotations

import copy
import logging
import os
import tomllib
from pathlib import Path

# Embedded mode (no PREFECT_API_URL): every command starts Prefect's temporary server.
EMBEDDED_DEFAULTS = {
    # First start on a fresh PREFECT_HOME runs the database migrations; on a busy 2-core
    # machine that took longer than Prefect's 20 s default 3 times in 5. A server that
    # never comes up still fails, after this long, with a clear message (see main()).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Anonymous usage telemetry: offline it logs "Failed to send telemetry" on every start,
    # and its heartbeat writes its session into the SQLite database while the run does:
    # the "database is locked" traceback seen on a busy machine came from there.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Automations (reactive + proactive triggers and their actions) and the event
    # persister: nothing in distill uses them, and each is one more background writer to
    # the same SQLite file. Task runs, logs, artifacts and flow-run states are recorded
    # without them.
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}


def _profile_settings(environ) -> dict:
    """The active Prefect profile's settings (`prefect config set` writes them there)."""
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    active = environ.get("PREFECT_PROFILE") or data.get("active")
    return data.get("profiles", {}).get(active, {}) if active else {}


def prefect_env_defaults(environ=os.environ) -> bool:
    """Fill in Prefect settings the user did not set (in the environment or the active
    profile); returns True when commands will use the embedded temporary server."""
    explicit = {k for k, v in environ.items() if v != ""} | set(_profile_settings(environ))
    embedded = "PREFECT_API_URL" not in explicit
    if embedded:
        for key, value in EMBEDDED_DEFAULTS.items():
            if key not in explicit:
                environ[key] = value
    # The client's SDK analytics: off unless the user opted in to analytics.
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in explicit and "DO_NOT_TRACK" not in explicit:
        environ["DO_NOT_TRACK"] = "1"
    return embedded


# ------------------------------------------------------------------ console errors


def transient_io(exc: BaseException | None) -> bool:
    """Errors worth retrying: the OS's I/O and connection errors, and an object store that
    does not answer (botocore's and aiohttp's connection errors are not OSErrors)."""
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(exc, FileNotFoundError):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        if isinstance(exc, (BotoConnectionError, ReadTimeoutError)):
            return True
    except ImportError:
        pass
    try:
        import aiohttp

        return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError))
    except ImportError:
        return False


def user_facing(exc: BaseException | None) -> bool:
    """Errors a user fixes (bad data, bad config, a missing file, an unreachable store),
    not bugs to debug."""
    from storage import SoftLabelError

    return isinstance(exc, (SoftLabelError, FileNotFoundError, ValueError)) or transient_io(exc)


def endpoint_message(exc: BaseException) -> str:
    """One line for a lasting storage outage, naming the endpoint when the error does."""
    import re

    m = re.search(r"https?://[^\s\"'/]+", str(exc))
    where = m.group(0) if m else "the storage"
    return (
        f"cannot reach {where} ({type(exc).__name__}: {exc}); gave up after the configured retries "
        f"(label.retries). Committed shards are kept: re-run the same command to resume."
    )


class _NoUserTraceback(logging.Formatter):
    """Wraps a console formatter: a user-facing error's record prints without its
    traceback. It formats a copy, so the API log handler (the Prefect UI) still gets the
    full traceback from the same record."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and user_facing(record.exc_info[1]):
            record = copy.copy(record)
            record.exc_info = record.exc_text = None
        return self.inner.format(record)


def quiet_user_tracebacks() -> None:
    """Install _NoUserTraceback on every Prefect console handler. Prefect configures
    logging once (when `prefect.main` is first imported; later set-ups are incremental
    and keep the handlers), so configure it now and wrap what it installed."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, PrefectConsoleHandler) and not isinstance(h.formatter, _NoUserTraceback):
                h.setFormatter(_NoUserTraceback(h.formatter or logging.Formatter()))


def retry_on_io(task, task_run, state) -> bool:
    """A Prefect retry_condition_fn: retry transient I/O failures only (an object store that
    does not answer included); bad data or config fails at once."""
    try:
        state.result()
    except Exception as e:
        return transient_io(e)
    return False
