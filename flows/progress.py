"""Terminal progress bars for long work; silent when stderr is not a terminal (logs, CI,
workers) or when DISTILL_PROGRESS=0."""

from __future__ import annotations

import os
import sys


class _Null:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def enabled() -> bool:
    return os.environ.get("DISTILL_PROGRESS", "1") != "0" and sys.stderr.isatty()


def bar(*, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0):
    if not enabled():
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=True, dynamic_ncols=True)


def batch_callback(desc: str):
    """(on_batch for pipeline.training.loop.train, close) that counts batches and shows the epoch."""
    b = bar(desc=desc, unit="batch")
    state = {"epoch": None}

    def on_batch(epoch: int, batch: dict) -> None:
        if epoch != state["epoch"]:
            state["epoch"] = epoch
            b.set_description(f"{desc} epoch {epoch + 1}")
        b.update(1)

    return on_batch, b.close
