"""The run configuration: YAML validated by pydantic. Config is data, not a program.

Every section rejects unknown keys, naming them; `key.path=value` overrides from the
command line are applied to the YAML before validation, so they are checked the same way.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from pipeline.objectives.objective import LOSSES
from pipeline.training.loop import DEVICES, OPTIMIZERS, RECIPE_FIELDS, SCHEDULES, WORKER_STARTS, TrainConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Section(BaseModel):
    # inf / nan pass `gt=0` checks (label.temperature=.inf) and then poison every number
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SourceConfig(Section):
    """A streamed source (pipeline/data/sources.py): a table (Parquet, Arrow, a saved HF dataset)
    with a text, image-bytes or numeric feature columns, or a folder of image files."""
    kind: Literal["parquet", "arrow", "hf_disk", "image_folder"]
    path: str
    text_column: str | None = None                # text -> token ids (needs data.tokenizer)
    image_column: str | None = None               # encoded image bytes (PNG, JPEG...)
    feature_columns: list[str] | None = None      # numeric features (default: every numeric column)
    label_column: str | None = None               # integers, or strings (classes sorted, or `classes`)
    id_column: str | None = None                  # stable sample ids (default: row index / file path hash)
    classes: list[str] | None = None
    num_classes: int | None = Field(None, ge=1)
    image_size: list[int] | None = None           # [H, W] images are resized to
    channels: Literal[1, 3] | None = None
    split: str | None = None                      # a split of a saved HF DatasetDict

    def spec(self) -> dict:
        return self.model_dump(exclude_none=True)


class TokenizerConfig(Section):
    path: str                                     # a directory or pkg:<module>/<dir> (an installed package)
    max_length: int = Field(128, ge=2)            # truncation; batches are padded to their longest row


class DataConfig(Section):
    dataset: str | None = None                    # mnist5k (default) | digits | path/to/file.npz | .parquet
    source: SourceConfig | None = None            # or a streamed table / image folder (then no `dataset`)
    transfer: SourceConfig | None = None          # an unlabelled pool in its own file: the label split
    tokenizer: TokenizerConfig | None = None      # for text sources
    sizes: dict[str, int] | None = None           # e.g. {train: 3500, val: 500, test: 1000}
    fractions: dict[str, float] | None = None     # or {train: 0.8, val: 0.1, test: 0.1}
    seed: int = 0
    label_split: str = "train"                    # the split the teacher labels (may be unlabeled)
    loader: dict[str, Any] = Field(default_factory=dict)  # extra kwargs for npz/parquet loaders

    @model_validator(mode="after")
    def _source_or_dataset(self):
        if self.source is None and self.dataset is None:
            self.dataset = "mnist5k"
        if self.source is not None:
            if self.dataset is not None or self.loader:
                raise ValueError("give data.source (a streamed table or image folder) or data.dataset "
                                 "(+ data.loader), not both")
            if self.source.text_column and self.tokenizer is None:
                raise ValueError(f"data.source.text_column {self.source.text_column!r} needs data.tokenizer "
                                 f"(path, max_length): text is tokenized in the input pipeline")
        elif self.tokenizer is not None:
            raise ValueError("data.tokenizer is only used with a text data.source")
        if self.transfer is not None:
            if self.source is None:
                raise ValueError("data.transfer (a separate unlabelled pool) needs data.source")
            if bool(self.transfer.text_column) != bool(self.source.text_column):
                raise ValueError("data.transfer and data.source must both be text (text_column) or neither")
        return self

    @model_validator(mode="after")
    def _one_split_definition(self):
        if self.sizes and self.fractions:
            raise ValueError("give either sizes or fractions, not both")
        if not self.sizes and not self.fractions:
            self.fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
        names = set((self.sizes or self.fractions or {}).keys())
        if self.transfer is not None:  # the label split is the whole transfer file
            if self.label_split in names:
                raise ValueError(f"label_split {self.label_split!r} is data.transfer (a file of its own): drop it "
                                 f"from data.sizes / data.fractions, which cut data.source")
        elif self.label_split not in names:
            raise ValueError(f"label_split {self.label_split!r} is not one of the splits {sorted(names)}")
        return self


class ViewsConfig(Section):
    num_views: int = Field(1, ge=1)               # stored views per sample (view 0 = un-augmented)
    shift: int = Field(0, ge=0)                   # max pixel translation
    hflip: bool = False
    noise_std: float = Field(0.0, ge=0)
    seed: int = 0
    # any other deterministic view (pipeline/views/transforms.py), instead of the keys above:
    # {kind: tokens, mask_prob, drop_prob}, {kind: signal, shift, scale, noise_std},
    # {kind: function, fn: "pkg.mod:fn", kwargs}, {kind: compose, steps: [...]}
    transform: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _transform_alone(self):
        if self.transform is not None:
            flat = [k for k in ("shift", "hflip", "noise_std") if getattr(self, k)]
            if flat:
                raise ValueError(f"views.transform replaces the built-in image views: drop views.{flat} "
                                 f"(or put them in the transform)")
            if "kind" not in self.transform:
                raise ValueError("views.transform needs a 'kind' (tokens, signal, function, compose)")
        return self


class _TrainSectionBase(Section):
    """A training section: the user-settable fields of pipeline.training.loop.TrainConfig, which is
    the one training schema (its types, defaults and checks). The recipe fills in the rest
    (paths; a student's loss, temperature and alpha from the sweep grid)."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data):
        # loss/temperature/alpha were per-section keys that nothing read: the sweep grid owns them
        if isinstance(data, dict):
            for old, new in (("loss", "students.losses"), ("temperature", "students.temperatures"),
                             ("alpha", "students.alphas")):
                if old in data:
                    raise ValueError(f"'{old}' is not a training-section key any more: a student's {old} comes "
                                     f"from {new} (the sweep grid); the teacher trains on hard labels")
        return data

    @model_validator(mode="after")
    def _train_config_checks(self):
        try:  # TrainConfig's own checks (ranges, choices) are the rules, stated once
            TrainConfig(**self.model_dump())
        except ValueError as e:
            raise ValueError(str(e).removeprefix("TrainConfig.")) from None
        return self


def _train_section() -> type[_TrainSectionBase]:
    hints = typing.get_type_hints(TrainConfig)
    choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "device": DEVICES, "worker_start": WORKER_STARTS}
    fields = {f.name: (Literal[choices[f.name]] if f.name in choices else hints[f.name], f.default)
              for f in dataclasses.fields(TrainConfig) if f.name not in RECIPE_FIELDS}
    return create_model("TrainSection", __base__=_TrainSectionBase, __module__=__name__, **fields)


TrainSection = _train_section()


class ModelConfig(Section):
    name: str | None = None                       # display name; default derived from arch/kwargs
    arch: str                                     # mlp | cnn | resnet | package.module:factory
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def display_name(self) -> str:
        if self.name:
            return self.name
        tail = "-".join(f"{k}{v}" for k, v in sorted(self.kwargs.items()) if not isinstance(v, (dict, list)))
        return f"{self.arch.split(':')[-1]}{'-' + tail if tail else ''}"


class TeacherConfig(Section):
    checkpoint: str | None = None                 # use this checkpoint; skip training
    model: ModelConfig = ModelConfig(arch="cnn", kwargs={"channels": [32, 64]})
    train: TrainSection = TrainSection(epochs=5, lr=2e-3)
    finetune_from: str | None = None              # transfer learning: start from this checkpoint
    freeze: list[str] = Field(default_factory=list)  # parameter-name prefixes frozen when fine-tuning


class RunnerConfig(Section):
    kind: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(2, ge=1)             # ThreadPoolTaskRunner bound
    dask_address: str | None = None               # scheduler address, e.g. tcp://127.0.0.1:8786


class LabelConfig(Section):
    uri: str | None = None                        # default: $DISTILL_STORAGE_ROOT/<name>/soft_labels or runs/<name>/soft_labels
    backend: Literal["parquet", "zarr"] = "parquet"
    temperature: float = Field(4.0, gt=0)
    representation: Literal["dense", "topk"] = "dense"
    k: int | None = Field(None, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    compression: Literal["none", "lz4", "zstd"] = "none"
    shard_size: int = Field(1000, ge=1)           # samples per shard (each with all its views)
    batch_size: int = Field(512, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    amp: Literal["bf16", "fp16"] | None = None
    feature_layer: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = False
    retries: int = Field(2, ge=0)                 # per-shard retries on I/O errors
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _k_with_topk(self):
        if self.representation == "topk" and self.k is None:
            raise ValueError("representation 'topk' needs k")
        if self.representation == "dense" and self.k is not None:
            # refused now, not by the writer after the teacher has trained
            raise ValueError(f"label.k={self.k} is only used with label.representation=topk; "
                             f"dense labels store every class (drop label.k or set representation: topk)")
        return self


class StudentsConfig(Section):
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig(arch="mlp", kwargs={"width": 32, "depth": 1})])
    temperatures: list[float] = Field(default_factory=lambda: [4.0])
    alphas: list[float] = Field(default_factory=lambda: [0.5])
    losses: list[Literal[LOSSES]] = Field(default_factory=lambda: ["kd"])
    baseline: bool = True                         # also train each architecture on hard labels
    extra_soft_labels: list[str] = Field(default_factory=list)  # more teachers' labels of the same inputs (averaged)
    export: bool = True                           # write each student as .safetensors and TorchScript
    quantize: bool = False                        # also report post-training dynamic int8 (accuracy, size, latency)
    train: TrainSection = TrainSection()
    max_parallel: int = Field(1, ge=1)
    # torch intra-op threads while the sweep runs (None: cores // max_parallel, at least 1);
    # fixed for the whole sweep so parallel students are bit-reproducible
    threads: int | None = Field(None, ge=1)

    def torch_threads(self, cores: int) -> int:
        return self.threads or max(1, cores // self.max_parallel)

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v):
        if not v or any(t <= 0 for t in v):
            raise ValueError("temperatures must be a non-empty list of numbers > 0")
        return v

    @field_validator("alphas")
    @classmethod
    def _unit(cls, v):
        if not v or any(not 0 <= a <= 1 for a in v):
            raise ValueError("alphas must be a non-empty list of numbers in [0, 1]")
        return v

    @model_validator(mode="after")
    def _multi_teacher_losses(self):
        bad = [loss for loss in self.losses if loss != "kd"]
        if self.extra_soft_labels and bad:
            raise ValueError(f"students.losses {bad} cannot be combined with students.extra_soft_labels: "
                             f"multi-teacher distillation averages the teachers' probabilities and is defined "
                             f"for loss 'kd' only")
        return self


class ScheduleConfig(Section):
    """Cron strings for `distill serve` / `distill deploy` (None: no schedule)."""
    run: str | None = None
    label: str | None = None
    students: str | None = None
    timezone: str = "UTC"


class Config(Section):
    task: Literal["classify"] = "classify"       # `task: lm` configs are flows/lm_config.py's
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    runs_dir: str = "runs"
    data: DataConfig = DataConfig()
    views: ViewsConfig = ViewsConfig()
    teacher: TeacherConfig = TeacherConfig()
    label: LabelConfig = LabelConfig()
    students: StudentsConfig = StudentsConfig()
    schedules: ScheduleConfig = ScheduleConfig()

    # ---- derived locations (environment decides where a deployment writes)
    def run_dir(self) -> Path:
        return Path(os.environ.get("DISTILL_RUNS_DIR") or self.runs_dir) / self.name

    def teacher_path(self) -> str:
        return self.teacher.checkpoint or str(self.run_dir() / "teacher.pt")

    def model_factories(self) -> frozenset[str]:
        """The import-path archs ("pkg.mod:factory") this config names: the user vouches
        for their code, so checkpoints naming them may be built (see load_model)."""
        return frozenset(m.arch for m in (self.teacher.model, *self.students.models) if ":" in m.arch)

    def soft_label_uri(self) -> str:
        if self.label.uri:
            return self.label.uri
        root = os.environ.get("DISTILL_STORAGE_ROOT")
        if root:
            return f"{root.rstrip('/')}/{self.name}/soft_labels"
        return str(self.run_dir() / "soft_labels")


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    cur = raw
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
        cur = nxt
    try:
        cur[parts[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value of {key.strip()} is not valid YAML ({problem}); "
                          f"quote it to pass a string") from None


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        else:
            # a section-level check (model_validator) names its keys itself; its input is the whole section
            got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"  {loc or '(top level)'}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def validate(schema: type[BaseModel], raw: dict, overrides: list[str] | None = None, *, source: str = "<config>"):
    """`schema` (Config, or flows.lm_config.LMConfig) from a YAML mapping plus `key=value`
    overrides; ConfigError naming every bad key otherwise."""
    raw = dict(raw or {})
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}:\n{_format(e)}") from None


def parse_config(raw: dict, overrides: list[str] | None = None, *, source: str = "<config>") -> Config:
    return validate(Config, raw, overrides, source=source)


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's top-level mapping; ConfigError naming the file when it is missing,
    not UTF-8, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          f"save the config as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    return parse_config(read_yaml(path), overrides, source=str(path))
