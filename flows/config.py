"""The run configuration: YAML validated by pydantic. Config is data, not a program.

One schema for every task: `task: classify | lm` (absent = classify) picks the config
type, a pydantic discriminated union; the sections both tasks have (label, students and
their training section, runner, schedules) are the same types, and only what differs is
the task's own: a classifier's data, views and trained teacher, a language model's corpus
and pretrained teacher, and each one's label layouts.

Every section rejects unknown keys, naming them; `key.path=value` overrides from the
command line are applied to the YAML before validation, so they are checked the same way.
The reference of every key is docs/config.md (a test checks both directions).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_serializer,
    model_validator,
)

from pipeline.objectives.losses import FAMILIES, LOSSES, loss_names, losses_for
from pipeline.training.config import DEVICES, OPTIMIZERS, RECIPE_FIELDS, SCHEDULES, WORKER_STARTS, TrainConfig

TASKS = ("classify", "lm")
# what a students section means when it names no losses / models
DEFAULT_LOSS = {"dense": "kd", "topk": "topk_kl", "sampled": "sampled_kl"}
DEFAULT_STUDENT = {
    "classify": {"arch": "mlp", "kwargs": {"width": 32, "depth": 1}},
    "lm": {"arch": "llama", "kwargs": {"layers": 2, "hidden": 128, "heads": 4}},
}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Section(BaseModel):
    # inf / nan pass `gt=0` checks (label.temperature=.inf) and then poison every number
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------ shared sections


class _TrainSectionBase(Section):
    """A training section: the user-settable fields of pipeline.training.config.TrainConfig,
    the one training schema (its types, defaults and checks). The recipe fills in the rest
    (paths; a student's loss, temperature and alpha from the sweep grid)."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data):
        # loss/temperature/alpha were per-section keys that nothing read: the sweep grid owns them
        if isinstance(data, dict):
            for old, new in (
                ("loss", "students.losses"),
                ("temperature", "students.temperatures"),
                ("alpha", "students.alphas"),
            ):
                if old in data:
                    raise ValueError(
                        f"'{old}' is not a training-section key: a student's {old} comes "
                        f"from {new} (the sweep grid); a teacher trains on hard labels"
                    )
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
    fields = {
        f.name: (Literal[choices[f.name]] if f.name in choices else hints[f.name], f.default)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RECIPE_FIELDS
    }
    return create_model("TrainSection", __base__=_TrainSectionBase, __module__=__name__, **fields)


TrainSection = _train_section()


class ModelConfig(Section):
    name: str | None = None  # display name; default derived from arch/kwargs
    arch: str  # mlp | cnn | resnet | bag | transformer | hf-* | llama | pruned | pkg.mod:factory
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _pruning_keys(self):
        # the shape of a pruned student's keys now; their range against the teacher's layers
        # in preflight (it needs the teacher's config.json)
        if self.arch == "pruned":
            from pipeline.models.pruning import kept_layers

            kw = self.kwargs
            if kw.get("keep_layers") is not None and not isinstance(kw["keep_layers"], list):
                raise ValueError(f"kwargs.keep_layers must be a list of layer indices, got {kw['keep_layers']!r}")
            kept_layers(10**6, kw.get("keep_layers"), kw.get("keep_every"))
        return self

    @model_validator(mode="before")
    @classmethod
    def _old_lm_form(cls, data):
        if isinstance(data, dict) and "arch" not in data and {"layers", "hidden"} & set(data):
            kw = {k: v for k, v in data.items() if k != "name"}
            raise ValueError(
                f"a language-model student names its arch: {{name: {data.get('name') or '...'}, "
                f"arch: llama, kwargs: {kw}}}"
            )
        return data

    def display_name(self) -> str:
        if self.name:
            return self.name
        tail = "-".join(f"{k}{v}" for k, v in sorted(self.kwargs.items()) if not isinstance(v, (dict, list)))
        return f"{self.arch.split(':')[-1]}{'-' + tail if tail else ''}"


class StudentTokenizerConfig(Section):
    """A tokenizer the project trains on the corpus for a student: an N-token byte-level
    BPE, or bytes (256 byte symbols + one end-of-document token). pipeline/data/tokenizing.py"""

    train: Literal["bpe", "bytes"]
    vocab_size: int | None = Field(None, ge=258, le=1_000_000)

    @model_validator(mode="after")
    def _size(self):
        if (self.train == "bpe") != (self.vocab_size is not None):
            raise ValueError("tokenizer: train: bpe needs vocab_size (e.g. 8000); train: bytes takes none")
        return self


class StudentModelConfig(ModelConfig):
    """A student entry: a model, plus who trains it and its own training keys."""

    # a language-model student's own tokenizer (cross-tokenizer KD): a directory or pkg: path,
    # or one trained on the corpus; labels are joined to its windows by bytes (pipeline/data/alignment.py)
    tokenizer: str | StudentTokenizerConfig | None = None

    # who does a student's steps: distillery's own loop, or Hugging Face Trainer (language models)
    trainer: Literal["builtin", "hf"] = "builtin"
    # students.train keys this model trains with instead (a pruned student's small lr beside a
    # scratch one's); checked against the training schema with the students section
    train: dict[str, Any] = Field(default_factory=dict)
    # students.losses for this model instead (the baseline still comes with students.baseline):
    # a slow student trained with the one KD loss worth its time beside a fast one's full sweep
    losses: list[str] | None = None
    data: list[Literal["human", "generated"]] | None = None  # students.data for this model instead
    alphas: list[float] | None = None  # students.alphas for this model instead


class RunnerConfig(Section):
    kind: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(2, ge=1)  # ThreadPoolTaskRunner bound: shards labelled at once
    dask_address: str | None = None  # scheduler address, e.g. tcp://127.0.0.1:8786


class LabelSection(Section):
    """What every task's label section has: where and how the teacher's one pass runs."""

    uri: str | None = None  # default: $DISTILL_STORAGE_ROOT/<name>/... or runs/<name>/...
    backend: Literal["parquet", "zarr"] = "parquet"
    shard_size: int = Field(1000, ge=1)  # samples (a language model's windows) per shard
    batch_size: int = Field(512, ge=1)  # rows per teacher forward
    device: Literal["cpu", "cuda", "auto"] = "auto"
    amp: Literal["bf16", "fp16"] | None = None  # autocast on CUDA (ignored on CPU)
    workers: int = Field(0, ge=0)  # DataLoader processes decoding inputs and making views for the teacher
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = False
    retries: int = Field(2, ge=0)  # per-shard retries on I/O errors
    runner: RunnerConfig = RunnerConfig()
    # signed datasets (docs/format.md "Signed datasets"; `distill keygen DIR` makes a pair):
    signing_key: str | None = None  # Ed25519 private key (PEM path): labelling signs the manifest and records
    public_key: str | None = None  # Ed25519 public key (PEM path): students and inspect require its signatures


class StudentsConfig(Section):
    """The sweep: models x losses x temperatures x alphas x seeds, plus one hard-label
    baseline (loss "ce") per model and seed. Every student of a sweep has the same steps."""

    models: list[StudentModelConfig] | None = None  # default: the task's small student (an MLP; a 2-layer Llama)
    losses: list[str] | None = None  # names of objectives/losses.py, or "ce" (default: the KL
    # of the stored labels: kd, topk_kl or sampled_kl)
    temperatures: list[float] | None = None  # T' (default: the stored labels' temperature)
    alphas: list[float] = Field(default_factory=lambda: [0.5])  # weight of the hard-label CE beside KD
    # what a language-model student reads: the corpus' own text ("human"), and / or the answers
    # the teacher wrote (label.generate): CE on them is sequence-level KD, a KD loss adds the token term
    data: list[Literal["human", "generated"]] = Field(default_factory=lambda: ["human"])
    # on the written answers a KD loss comes with CE on the written tokens: alpha x CE + (1 - alpha) x KD
    generated_alphas: list[float] = Field(default_factory=lambda: [0.5])
    seeds: list[int] | None = None  # default: [train.seed]
    baseline: bool = True  # also train each model on hard labels (loss "ce")
    extra_soft_labels: list[str] = Field(default_factory=list)  # more teachers' labels of the same inputs (averaged)
    export: bool = True  # write each student (safetensors + TorchScript, or an HF dir)
    quantize: bool = False  # also report post-training dynamic int8 (classifiers)
    train: TrainSection = TrainSection()
    max_parallel: int = Field(1, ge=1)
    # torch intra-op threads while the sweep runs (None: cores // max_parallel, at least 1);
    # fixed for the whole sweep so parallel students are bit-reproducible
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _single_values(cls, data):
        if isinstance(data, dict):
            for old, new in (("alpha", "alphas"), ("temperature", "temperatures")):
                if old in data:
                    raise ValueError(
                        f"students.{old} is now a list, students.{new} (e.g. {new}: "
                        f"[{data[old]}]): one grid for every task"
                    )
        return data

    @model_validator(mode="after")
    def _grid(self):
        if self.losses is not None:
            unknown = [loss for loss in self.losses if loss not in loss_names()]
            if unknown or not self.losses:
                raise ValueError(f"losses {unknown or '[]'}: each must be one of {list(loss_names())}")
        if self.models is not None and not self.models:
            raise ValueError("models must name at least one student model")
        for i, m in enumerate(self.models or []):
            if m.train:
                self.train_for(m, where=f"models[{i}].train")
        if self.temperatures is not None and (not self.temperatures or any(t <= 0 for t in self.temperatures)):
            raise ValueError("temperatures must be a non-empty list of numbers > 0")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError("alphas must be a non-empty list of numbers in [0, 1]")
        if self.seeds is not None and (not self.seeds or any(s < 0 for s in self.seeds)):
            raise ValueError("seeds must be a non-empty list of integers >= 0")
        if self.seeds is not None and "seed" in self.train.model_fields_set:
            raise ValueError("give students.seeds or students.train.seed, not both")
        bad = [loss for loss in self.losses or [] if loss != "ce" and not LOSSES[loss].multi_teacher]
        if self.extra_soft_labels and bad:
            raise ValueError(
                f"students.losses {bad} cannot be combined with students.extra_soft_labels: "
                f"multi-teacher distillation averages the teachers' probabilities and is defined "
                f"for {[k for k, v in LOSSES.items() if v.multi_teacher]} only"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # with seeds given, train.seed means nothing; dropping it keeps the dump (the flows'
        # parameters) valid input again rather than "both given"
        d = handler(self)
        if self.seeds is not None and isinstance(d.get("train"), dict):
            d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
        return d

    def train_for(self, model: StudentModelConfig, where: str = "train") -> TrainSection:
        """students.train with the model's own overrides (StudentModelConfig.train)."""
        if not model.train:
            return self.train
        try:
            return TrainSection(**(self.train.model_dump(exclude_unset=True) | model.train))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}{'.' + loc if loc else ''}: {msg}") from None

    def torch_threads(self, cores: int) -> int:
        return self.threads or max(1, cores // self.max_parallel)

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.train.seed]


class ScheduleConfig(Section):
    """Cron strings for `distill serve` / `distill deploy` (None: no schedule)."""

    run: str | None = None
    label: str | None = None
    students: str | None = None
    timezone: str = "UTC"


class RunConfig(Section):
    """What every task's config has."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    runs_dir: str = "runs"
    students: StudentsConfig = StudentsConfig()
    schedules: ScheduleConfig = ScheduleConfig()

    # ---- derived locations (environment decides where a deployment writes)
    def run_dir(self) -> Path:
        return Path(os.environ.get("DISTILL_RUNS_DIR") or self.runs_dir) / self.name

    def _label_root(self, default: str) -> str:
        if self.label.uri:
            return self.label.uri.rstrip("/")
        root = os.environ.get("DISTILL_STORAGE_ROOT")
        if root:
            return f"{root.rstrip('/')}/{self.name}/{default}"
        return str(self.run_dir() / default)

    def model_factories(self) -> frozenset[str]:
        """The import-path archs ("pkg.mod:factory") this config names: the user vouches
        for their code, so checkpoints naming them may be built (see load_model)."""
        models = [*self.student_models(), getattr(getattr(self, "teacher", None), "model", None)]
        return frozenset(m.arch for m in models if m is not None and ":" in m.arch)

    def student_temperatures(self) -> list[float]:
        """students.temperatures, else the stored labels' temperature."""
        return list(self.students.temperatures or [self.label_temperature()])

    def student_losses(self) -> list[str]:
        """students.losses, else the KL of the first stored layout."""
        return list(self.students.losses or [DEFAULT_LOSS[self.label_families()[0]]])

    def student_models(self) -> list[StudentModelConfig]:
        return list(self.students.models or [StudentModelConfig(**DEFAULT_STUDENT[self.task])])

    def _check_losses(self, have: dict[str, str], how: dict[str, str]) -> None:
        """have: {label family: what the config stores}; how: {family: the key that stores it}."""
        every = self.student_losses() + [x for m in self.student_models() for x in (m.losses or [])]
        for loss in dict.fromkeys(every):
            if loss != "ce" and loss not in LOSSES:
                raise ValueError(f"students: unknown loss {loss!r}; choose from {['ce', *LOSSES]}")
            if loss == "ce" or set(LOSSES[loss].labels) & set(have):
                continue
            need = LOSSES[loss].labels
            stored = ", ".join(f"{v}" for v in have.values())
            usable = [n for fam in have for n in losses_for(fam)]
            raise ValueError(
                f"students.losses has {loss!r}, which learns from {'/'.join(need)} labels, but the "
                f"label section stores {stored}: use one of {usable}, or store them "
                f"({how[need[0]]})"
            )


# ------------------------------------------------------------------ classifiers


class SourceConfig(Section):
    """A streamed source (pipeline/data/sources.py): a table (Parquet, Arrow, a saved HF dataset)
    with a text, image-bytes or numeric feature columns, or a folder of image files."""

    kind: Literal["parquet", "arrow", "hf_disk", "image_folder"]
    path: str
    text_column: str | None = None  # text -> token ids (needs data.tokenizer)
    image_column: str | None = None  # encoded image bytes (PNG, JPEG...)
    feature_columns: list[str] | None = None  # numeric features (default: every numeric column)
    label_column: str | None = None  # integers, or strings (classes sorted, or `classes`)
    id_column: str | None = None  # stable sample ids (default: row index / file path hash)
    classes: list[str] | None = None
    num_classes: int | None = Field(None, ge=1)
    image_size: list[int] | None = None  # [H, W] images are resized to
    channels: Literal[1, 3] | None = None
    # images decoded once into a memory-mapped uint8 cache at image_size (default: when it fits in 8 GiB)
    pixel_cache: bool | None = None
    split: str | None = None  # a split of a saved HF DatasetDict

    def spec(self) -> dict:
        return self.model_dump(exclude_none=True)


class TokenizerConfig(Section):
    path: str  # a directory or pkg:<module>/<dir> (an installed package)
    max_length: int = Field(128, ge=2)  # truncation; batches are padded to their longest row


class DataConfig(Section):
    dataset: str | None = None  # mnist5k (default) | digits | path/to/file.npz | .parquet
    source: SourceConfig | None = None  # or a streamed table / image folder (then no `dataset`)
    transfer: SourceConfig | None = None  # an unlabelled pool in its own file: the label split
    tokenizer: TokenizerConfig | None = None  # for text sources
    sizes: dict[str, int] | None = None  # e.g. {train: 3500, val: 500, test: 1000}
    fractions: dict[str, float] | None = None  # or {train: 0.8, val: 0.1, test: 0.1}
    # or the data's own splits: fixed row ranges [start, stop) in the file's row order
    # (an .npz's n_train, a benchmark's test set), or files of sample ids (.npy / .txt, one a line)
    ranges: dict[str, tuple[int, int]] | None = None
    split_files: dict[str, str] | None = None
    seed: int = 0
    label_split: str = "train"  # the split the teacher labels (may be unlabeled)
    loader: dict[str, Any] = Field(default_factory=dict)  # extra kwargs for npz/parquet loaders

    @model_validator(mode="after")
    def _source_or_dataset(self):
        if self.source is None and self.dataset is None:
            self.dataset = "mnist5k"
        if self.source is not None:
            if self.dataset is not None or self.loader:
                raise ValueError(
                    "give data.source (a streamed table or image folder) or data.dataset (+ data.loader), not both"
                )
            if self.source.text_column and self.tokenizer is None:
                raise ValueError(
                    f"data.source.text_column {self.source.text_column!r} needs data.tokenizer "
                    f"(path, max_length): text is tokenized in the input pipeline"
                )
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
        given = [k for k in ("sizes", "fractions", "ranges", "split_files") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one split definition (sizes, fractions, ranges or split_files), not {given}")
        if not given:
            self.fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
        for name, (a, b) in (self.ranges or {}).items():
            if not 0 <= a < b:
                raise ValueError(f"data.ranges.{name}: [{a}, {b}] must be rows [start, stop) with 0 <= start < stop")
        spans = sorted((a, b, n) for n, (a, b) in (self.ranges or {}).items())
        for (_, b0, n0), (a1, _, n1) in zip(spans, spans[1:]):
            if a1 < b0:
                raise ValueError(f"data.ranges.{n0} and data.ranges.{n1} overlap (rows {a1}..{b0 - 1})")
        names = set((self.sizes or self.fractions or self.ranges or self.split_files or {}).keys())
        if self.transfer is not None:  # the label split is the whole transfer file
            if self.label_split in names:
                raise ValueError(
                    f"label_split {self.label_split!r} is data.transfer (a file of its own): drop it "
                    f"from data.sizes / data.fractions, which cut data.source"
                )
        elif self.label_split not in names:
            raise ValueError(f"label_split {self.label_split!r} is not one of the splits {sorted(names)}")
        return self


class ViewsConfig(Section):
    num_views: int = Field(1, ge=1, le=10_000)  # stored views per sample (view 0 = un-augmented)
    shift: int = Field(0, ge=0)  # max pixel translation
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
                raise ValueError(
                    f"views.transform replaces the built-in image views: drop views.{flat} "
                    f"(or put them in the transform)"
                )
            if "kind" not in self.transform:
                raise ValueError("views.transform needs a 'kind' (tokens, signal, function, compose)")
        return self


class TeacherConfig(Section):
    checkpoint: str | None = None  # use this checkpoint; skip training
    model: ModelConfig = ModelConfig(arch="cnn", kwargs={"channels": [32, 64]})
    train: TrainSection = TrainSection(epochs=5, lr=2e-3)
    finetune_from: str | None = None  # transfer learning: start from this checkpoint
    freeze: list[str] = Field(default_factory=list)  # parameter-name prefixes frozen when fine-tuning


class ClassifyLabelConfig(LabelSection):
    temperature: float = Field(4.0, gt=0)  # stored s = z / T
    representation: Literal["dense", "topk"] = "dense"
    k: int | None = Field(None, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    compression: Literal["none", "lz4", "zstd"] = "none"
    feature_layer: str | None = None  # also store this layer's output (hint / RKD losses)

    @model_validator(mode="after")
    def _k_with_topk(self):
        if self.representation == "topk" and self.k is None:
            raise ValueError("representation 'topk' needs k")
        if self.representation == "dense" and self.k is not None:
            # refused now, not by the writer after the teacher has trained
            raise ValueError(
                f"label.k={self.k} is only used with label.representation=topk; "
                f"dense labels store every class (drop label.k or set representation: topk)"
            )
        return self


class ClassifyConfig(RunConfig):
    task: Literal["classify"] = "classify"
    data: DataConfig = DataConfig()
    views: ViewsConfig = ViewsConfig()
    teacher: TeacherConfig = TeacherConfig()
    label: ClassifyLabelConfig = ClassifyLabelConfig()

    @model_validator(mode="after")
    def _losses_have_labels(self):
        self._check_losses(
            {FAMILIES[self.label.representation]: f"{self.label.representation} labels"},
            {
                "dense": "label.representation: dense",
                "topk": "label.representation: topk, label.k",
                "sampled": "sampled labels are for language models",
            },
        )
        return self

    @model_validator(mode="after")
    def _builtin_trainer(self):
        own = [m.display_name() for m in self.student_models() if m.tokenizer is not None]
        if own:
            raise ValueError(f"students.models {own}: tokenizer is for language-model students (task: lm)")
        hf = [m.display_name() for m in self.student_models() if m.trainer == "hf"]
        if hf:
            raise ValueError(
                f"students.models {hf}: trainer: hf trains language-model students (task: lm); "
                f"classifier students use the built-in loop (leave trainer unset)"
            )
        return self

    @model_validator(mode="after")
    def _held_back_labels_stay_held_back(self):
        # A label split other than `train` is the held-back transfer set: the students learn
        # only the teacher's stored labels of it. Its rows may still carry true labels (cut
        # from a labelled file); a CE term (alpha > 0) would train on them and the report
        # would call the result distilled. So alpha defaults to 0 there and > 0 is refused.
        split = self.data.label_split
        if split == "train" and self.data.transfer is None:
            return self
        if "alphas" not in self.students.model_fields_set:
            self.students.alphas = [0.0]
        elif any(a > 0 for a in self.students.alphas):
            raise ValueError(
                f"students.alphas {self.students.alphas}: alpha > 0 adds cross-entropy on the hard labels "
                f"of the label split {split!r}, which is held back as unlabelled (only the teacher's stored "
                f"labels of it are learned). Use alphas: [0.0], or label the 'train' split (label_split: train)"
            )
        return self

    def label_families(self) -> list[str]:
        return [FAMILIES[self.label.representation]]

    def teacher_path(self) -> str:
        return self.teacher.checkpoint or str(self.run_dir() / "teacher.pt")

    def soft_label_uri(self) -> str:
        return self._label_root("soft_labels")

    def label_uris(self, job: str = "windows") -> dict[str, str]:
        """{layout: uri} of the datasets the label section writes (one pass: job "windows")."""
        return {self.label.representation: self.soft_label_uri()} if job == "windows" else {}

    def label_jobs(self) -> list[str]:
        return ["windows"]

    def label_temperature(self) -> float:
        return self.label.temperature

    @property
    def label_split(self) -> str:
        return self.data.label_split


# ------------------------------------------------------------------ language models


class CorpusConfig(Section):
    kind: Literal["jsonl", "text_files", "parquet", "chat"]
    path: str  # a .jsonl file, a folder of *.txt files, or a .parquet table
    text_field: str = "text"  # the JSON field (jsonl) or the column (parquet) holding text
    # chat: conversations ({"messages": [{role, content}]} per JSON line, or a Parquet column),
    # rendered with the teacher's chat template; only assistant tokens are labelled and scored
    messages_field: str = "messages"
    too_long: Literal["refuse", "skip"] = "refuse"  # chat: a message longer than seq_len cannot be
    # cut between messages: refuse it (naming file and line), or leave its conversation out
    labelled: Literal["assistant", "all"] = "assistant"  # chat: the positions labelled, trained and scored
    seq_len: int = Field(128, ge=2)  # tokens per window (the window holds seq_len + 1 for targets)
    windows: Literal["packed", "documents"] = "packed"  # packed: one stream cut every seq_len;
    # documents: windows never cross a document, the last shorter (chat: always per conversation)
    sizes: dict[str, int]  # windows per split (chat: conversations): needs train and val
    seed: int = 0

    @model_validator(mode="after")
    def _splits(self):
        missing = [s for s in ("train", "val") if s not in self.sizes]
        if missing:
            raise ValueError(
                f"corpus.sizes needs the splits {missing} (train: labelled by the teacher and "
                f"trained on; val: perplexity), got {sorted(self.sizes)}"
            )
        bad = {k: v for k, v in self.sizes.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"corpus.sizes must be positive window counts, got {bad}")
        return self


class LMTeacherConfig(Section):
    name: str = "teacher"  # display name
    path: str | None = None  # a Hugging Face causal-LM directory (or pkg:<module>/<dir>)
    gguf: str | None = None  # or a GGUF file (or pkg:<module>/<file>), converted once and cached

    @model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.gguf is None):
            raise ValueError(
                "give teacher.path (a Hugging Face model directory) or teacher.gguf (a GGUF file), exactly one"
            )
        return self


class TopkLabels(Section):
    k: int = Field(32, ge=1)
    dtype: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"  # stored log-probs
    tail_dtype: Literal["float16", "float32"] = "float32"  # stored missing mass


class SampledLabels(Section):
    draws: int = Field(64, ge=1)  # draws per token from the teacher's distribution at T = 1
    s_max: int | None = Field(None, ge=1)  # unique ids stored per token (default min(draws, V))


class GenerateLabels(Section):
    """Answers the teacher writes to the train conversations' prompts (a chat corpus), each
    written token stored with the configured top-k / sampled labels (pipeline/labelling/generate.py)."""

    answers: int = Field(1, ge=1)  # answers per prompt
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0  # one generator per (prompt, answer), seeded from this and the sample id
    prompts: int | None = Field(None, ge=1)  # the first N prompts (default all)
    # first: each train conversation up to its first answer; every: up to each of its answers
    prompts_at: Literal["first", "every"] = "first"
    stop: list[str] | None = None  # tokens that end an answer (default the tokenizer's EOS)
    shard_size: int = Field(32, ge=1)  # answers per shard


class TokenLabelConfig(LabelSection):
    topk: TopkLabels | None = None
    sampled: SampledLabels | None = None
    # also store the teacher's log-prob of each next token (4 B/token) with the byte stream's
    # record: what students with their own tokenizer align and score by (plain-text corpora)
    target_logprob: bool = True
    seed: int = 0  # sampled draws
    # a batch's (B, L, V) logits must fit: far fewer windows per forward than a classifier's rows
    batch_size: int = Field(8, ge=1)
    generate: GenerateLabels | None = None  # chat corpora: the teacher also writes answers

    @model_validator(mode="after")
    def _some(self):
        if self.topk is None and self.sampled is None:
            raise ValueError("label needs topk (e.g. {k: 32}) or sampled (e.g. {draws: 64}), or both")
        return self

    def layouts(self) -> list[str]:
        return [n for n in ("topk", "sampled") if getattr(self, n) is not None]


class LMConfig(RunConfig):
    task: Literal["lm"]
    corpus: CorpusConfig
    teacher: LMTeacherConfig
    label: TokenLabelConfig = TokenLabelConfig(topk=TopkLabels())

    @model_validator(mode="after")
    def _losses_have_labels(self):
        self._check_losses(
            {n: f"label.{n}" for n in self.label.layouts()},
            {"topk": "label.topk", "sampled": "label.sampled", "dense": "dense labels are for classifiers"},
        )
        return self

    @model_validator(mode="after")
    def _generation(self):
        if self.label.generate is not None and self.corpus.kind != "chat":
            raise ValueError(
                f"label.generate writes answers to conversations' prompts: it needs corpus.kind chat, "
                f"got {self.corpus.kind!r}"
            )
        if self.label.generate is not None and self.corpus.labelled != "assistant":
            raise ValueError("label.generate answers the assistant's turns: it needs corpus.labelled assistant")
        every = list(self.students.data) + [d for m in self.student_models() for d in (m.data or [])]
        if "generated" in every and self.label.generate is None:
            raise ValueError("students.data has 'generated': set label.generate (the teacher's written answers)")
        return self

    @model_validator(mode="after")
    def _own_tokenizers(self):
        for i, m in enumerate(self.student_models()):
            losses = [x for x in (m.losses if m.losses is not None else self.student_losses()) if x != "ce"]
            where = f"students.models[{i}] ({m.display_name()})"
            cross = [x for x in losses if LOSSES[x].cross_tokenizer]
            if m.tokenizer is None:
                if cross:
                    raise ValueError(f"{where}: losses {cross} align two tokenizations: give the model a tokenizer")
                continue
            same = [x for x in losses if not LOSSES[x].cross_tokenizer]
            if same:
                raise ValueError(
                    f"{where} has its own tokenizer: losses {same} compare the teacher's token ids, use "
                    f"{[n for n, v in LOSSES.items() if v.cross_tokenizer]} (students.models[].losses)"
                )
            if self.corpus.kind == "chat":
                raise ValueError(f"{where}: a student tokenizer needs plain text, not a chat corpus (corpus.kind)")
            if losses and (self.label.topk is None or not self.label.target_logprob):
                raise ValueError(f"{where}: cross-tokenizer losses need label.topk with label.target_logprob: true")
            if m.trainer == "hf" or "generated" in (m.data or self.students.data):
                raise ValueError(f"{where}: a student tokenizer trains with the built-in loop on the corpus' text")
        return self

    def label_families(self) -> list[str]:
        return self.label.layouts()  # topk, sampled: the layouts are the families

    def label_uris(self, job: str = "windows") -> dict[str, str]:
        """{layout: uri}: <label root>/topk and /sampled; job "generate": the written answers'
        labels, <label root>/generated/topk and /sampled (empty without label.generate)."""
        root = self._label_root("token_labels")
        if job == "generate":
            return {} if self.label.generate is None else {n: f"{root}/generated/{n}" for n in self.label.layouts()}
        return {layout: f"{root}/{layout}" for layout in self.label.layouts()}

    def label_jobs(self) -> list[str]:
        """The teacher's passes: over the train windows, and writing answers when configured."""
        return ["windows"] + (["generate"] if self.label.generate is not None else [])

    def label_temperature(self) -> float:
        return 1.0  # token labels are stored at T = 1

    @property
    def label_split(self) -> str:
        return "train"


Config = Annotated[ClassifyConfig | LMConfig, Field(discriminator="task")]
_ADAPTER = TypeAdapter(Config)


# ------------------------------------------------------------------ reading and validating


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
        raise ConfigError(
            f"override {item!r}: the value of {key.strip()} is not valid YAML ({problem}); quote it to pass a string"
        ) from None


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


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        if loc and loc[0] in TASKS:  # the union's tag: not a key the user wrote
            loc = loc[1:]
        loc = ".".join(loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif err["type"] == "union_tag_invalid":
            lines.append(f"  task: must be one of {list(TASKS)} (default classify), got {err['input'].get('task')!r}")
        else:
            # a section-level check (model_validator) names its keys itself; its input is the whole section
            got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"  {loc or '(top level)'}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def parse_config(raw: dict, overrides: list[str] | None = None, *, source: str = "<config>"):
    """A ClassifyConfig or an LMConfig (by the `task` key, absent = classify) from a YAML
    mapping plus `key=value` overrides; ConfigError naming every bad key otherwise."""
    raw = dict(raw or {})
    for item in overrides or []:
        apply_override(raw, item)
    raw.setdefault("task", "classify")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}:\n{_format(e)}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's top-level mapping; ConfigError naming the file when it is missing,
    not UTF-8, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the config as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None):
    """The validated config of a YAML file. Import paths in it (`arch: my_models:net`, view
    functions) are found next to the config file too: its folder goes on sys.path, as a
    script's folder does for the script."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if folder not in sys.path:
        sys.path.append(folder)
    return parse_config(read_yaml(path), overrides, source=str(path))
