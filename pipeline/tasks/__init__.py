"""What differs between tasks, behind one seam; everything else (the labelling loop, the
label stream, the training loop, the student recipe) is shared.

A task says how rows of its data become a batch ({"x", "y"} plus "mask" for per-position
rows), how much a batch counts (samples or tokens), its validation metric and which way is
better, how a trained model is evaluated for the report and how it is exported:

    task = task_of(data)                    # data.task names it: "classify" | "lm"
    batch = task.batch(data, pos, views, transform)
    value = task.score(model, val_data, device=dev)

A new task is one module here implementing `Task`, registered in TASKS, plus its data
source (pipeline/data) and its labeller (pipeline/labelling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.lm import LanguageModelTask

if TYPE_CHECKING:
    from pipeline.views.base import Transform


class Task(Protocol):
    name: str  # "classify" | "lm"
    metric: str  # the validation metric: "accuracy" | "perplexity"
    higher_is_better: bool
    unit: str  # what a row counts: "samples" | "tokens"

    def prepare(self) -> None: ...

    def labelled(self, data: Any) -> bool: ...

    def batch(
        self, data: Any, pos: np.ndarray, views: np.ndarray, transform: Transform | None = None
    ) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict) -> torch.Tensor: ...

    def score(self, model: nn.Module, data: Any, *, device: torch.device | str) -> float: ...

    def evaluate(
        self,
        model: nn.Module,
        data: Any,
        *,
        teacher_logits: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ) -> dict: ...

    def export(
        self,
        model: nn.Module,
        out_dir: str,
        name: str,
        example: Any,
        *,
        quantize: bool = False,
        tokenizer_dir: str | None = None,
    ) -> dict: ...


TASKS: dict[str, Task] = {"classify": ClassifyTask(), "lm": LanguageModelTask()}


def task_of(data: Any) -> Task:
    """The task a data source's rows are for (its `task` attribute; classifiers by default)."""
    name = getattr(data, "task", "classify")
    if name not in TASKS:
        raise ValueError(f"data {getattr(data, 'name', data)!r} names task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
