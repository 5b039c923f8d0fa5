"""Checks of a config that the schema cannot make because they need the data or the
teacher's file (flows.config validates everything else). The CLI runs preflight(cfg) after
load_config, before any work. Kept apart from flows.config, which must not import the
recipes (they import it)."""

from __future__ import annotations

import os

import numpy as np

from .config import ClassifyConfig, ConfigError, LMConfig
from .inputs import splits, view_spec


def preflight(cfg: ClassifyConfig | LMConfig, cmd: str = "run") -> None:
    """The checks the schema cannot make because they need the data or the teacher's
    file, for the config's task and the command (`label` and `students` need a trained
    teacher); the CLI runs them after load_config, before any work or server."""
    _check_factories(cfg)
    if cfg.task == "lm":
        preflight_lm(cfg)
    else:
        preflight_classify(cfg)
        if cmd in ("label", "students") and not os.path.isfile(cfg.teacher_path()):
            raise ConfigError(
                f"no teacher checkpoint at {cfg.teacher_path()}: run `distill teacher train` (or `distill run`) "
                f"with this config first, or set teacher.checkpoint"
            )


def _check_factories(cfg) -> None:
    """Every model named by an import path (`arch: my_models:net`) imports, before any work."""
    from pipeline.models.registry import is_import_path
    from pipeline.paths import import_object

    models = [("teacher.model", getattr(cfg.teacher, "model", None))]
    models += [(f"students.models[{i}]", m) for i, m in enumerate(cfg.student_models())]
    for key, m in models:
        if m is not None and is_import_path(m.arch):
            try:
                import_object(m.arch, what="model arch", noun="factory")
            except ValueError as e:
                raise ConfigError(
                    f"{key}.arch: {e} (a module is found on PYTHONPATH or next to the config file)"
                ) from None


def preflight_classify(cfg: ClassifyConfig) -> None:
    """The checks the schema cannot make because they need the data or the teacher's
    file: the CLI runs them after load_config, before any work, so a bad input costs
    seconds instead of a trained teacher. Raises ConfigError naming the key and file.

    Loads the dataset through flows.inputs.splits: the same cut, and in-process the same
    cache, the flows use next."""
    from pipeline.models.checkpoint import load_checkpoint  # torch: only when checking
    from pipeline.models.registry import ModelSpec, is_import_path

    teacher = None
    for key in ("checkpoint", "finetune_from"):
        path = getattr(cfg.teacher, key)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"teacher.{key}={path}: no such file")
        try:
            payload = load_checkpoint(path)
            arch = ModelSpec.from_dict(payload["arch"]).arch
        except ValueError as e:
            raise ConfigError(f"teacher.{key}: {e}") from None
        if is_import_path(arch) and arch not in cfg.model_factories():
            raise ConfigError(
                f"teacher.{key}={path}: the checkpoint names the model factory {arch!r}; building it would "
                f"import and run that code, named by the file, not by you. If you trust the file, name the "
                f"factory in your config (teacher.model.arch: {arch!r})"
            )
        if key == "checkpoint":
            teacher = payload

    data = (
        f"data.dataset={cfg.data.dataset}"
        if cfg.data.source is None
        else f"data.source ({cfg.data.source.kind} {cfg.data.source.path})"
    )
    try:
        s = splits(cfg)
    except TypeError as e:  # a loader kwarg the loader does not take
        raise ConfigError(f"data.loader={cfg.data.loader}: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{data}: {e}") from None
    try:
        spec = view_spec(cfg)  # a user view function is imported here; bad keys named
    except (ValueError, TypeError) as e:
        raise ConfigError(f"views: {e}") from None
    labelled, transfer = s.get("train"), s.get(cfg.data.label_split)
    if labelled is not None and transfer is not None and transfer is not labelled:
        both = np.intersect1d(labelled.sample_ids, transfer.sample_ids)
        if len(both):  # split_dataset cuts disjoint splits; this guards hand-made id columns
            raise ConfigError(
                f"{data}: {len(both)} sample ids of the transfer split {cfg.data.label_split!r} are "
                f"also in the labelled split 'train' (e.g. {both[:5].tolist()})"
            )
    in_shape = next(iter(s.values())).in_shape
    num_classes = next((d.num_classes for d in s.values() if d.num_classes), None)

    if teacher is not None:
        t_shape, t_classes = tuple(teacher["in_shape"]), int(teacher["num_classes"])
        where = f"teacher.checkpoint={cfg.teacher.checkpoint}"
        if t_shape != in_shape:
            raise ConfigError(f"{where} expects inputs {t_shape}, but {data} has {in_shape}")
        if num_classes and t_classes != num_classes:
            raise ConfigError(f"{where} outputs {t_classes} classes, but {data} has {num_classes}")
        num_classes, data = t_classes, where

    _check_hf_models(cfg)
    _check_vision_models(cfg, in_shape, num_classes)
    _check_views(cfg, spec, s.get(cfg.data.label_split) or next(iter(s.values())))

    k = cfg.label.k
    if k is not None and num_classes and k > num_classes:
        raise ConfigError(f"label.k={k} is larger than the {num_classes} classes of {data}")

    shift = cfg.views.shift
    if shift and len(in_shape) == 3 and shift >= min(in_shape[1:]):
        h, w = in_shape[1:]
        raise ConfigError(
            f"views.shift={shift} is not smaller than the {h}x{w} images of "
            f"data.dataset={cfg.data.dataset}: a view could be moved off the image entirely"
        )


HF_ARCHS = ("hf-encoder", "hf-sequence-classification")


def _check_vision_models(cfg: ClassifyConfig, in_shape, num_classes) -> None:
    """timm / torchvision models are built once here (names, kwargs, a checkpoint's keys and
    shapes against the data's classes): a fraction of a second each, before any work."""
    from pipeline.models.registry import build_model
    from pipeline.models.vision import is_vision_arch

    models = [("teacher.model", cfg.teacher.model)] + [
        (f"students.models[{i}]", m) for i, m in enumerate(cfg.student_models())
    ]
    for key, m in models:
        if not is_vision_arch(m.arch) or (cfg.teacher.checkpoint and key == "teacher.model"):
            continue
        try:
            build_model({"arch": m.arch, "kwargs": m.kwargs}, in_shape=in_shape, num_classes=num_classes or 2)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: {e}") from None


def _check_views(cfg: ClassifyConfig, spec, src) -> None:
    """The view transform applied to one real row as view 1: a transform that cannot run on
    these inputs (a crop to another size, a step that does not take these images) is refused
    now, not after the teacher has trained."""
    from pipeline.data.datasets import model_inputs

    steps = getattr(spec, "steps", None) if getattr(spec, "kind", None) == "compose" else [spec]
    if cfg.students.max_parallel > 1 and any(getattr(t, "global_rng", False) for t in steps or []):
        raise ConfigError(
            f"views.transform kind torchvision seeds torch's global generator per row, which students "
            f"training in parallel threads also draw from (dropout): set students.max_parallel: 1 "
            f"(found {cfg.students.max_parallel}; one student already uses every CPU core)"
        )
    if spec is None or cfg.views.num_views < 2 or not len(src):
        return
    try:
        model_inputs(src, [0], [1], spec)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"views: {e}") from None


def _check_hf_models(cfg: ClassifyConfig) -> None:
    """A Hugging Face model's directory exists and its vocabulary fits the tokenizer: checked
    from config.json alone (no weights loaded), before any work or any file is written."""
    import json

    from pipeline.models.hf import model_dir

    from .inputs import tokenizer

    tok = tokenizer(cfg)
    models = [("teacher.model", cfg.teacher.model)] + [
        (f"students.models[{i}]", m) for i, m in enumerate(cfg.student_models())
    ]
    for key, m in models:
        if m.arch not in HF_ARCHS or cfg.teacher.checkpoint and key == "teacher.model":
            continue
        path = m.kwargs.get("path")
        if not path:
            raise ConfigError(
                f"{key}.kwargs.path: arch {m.arch!r} needs the model's local directory (or pkg:<module>/<dir>)"
            )
        try:
            d = model_dir(path)
        except ValueError as e:
            raise ConfigError(f"{key}.kwargs.path: {e}") from None
        with open(f"{d}/config.json") as f:
            rows = json.load(f).get("vocab_size")
        if tok is not None and rows is not None and len(tok) > int(rows):
            raise ConfigError(
                f"{key}.kwargs.path={path}: the model's vocabulary has {rows} tokens but "
                f"data.tokenizer ({cfg.data.tokenizer.path}) has {len(tok)}: a different tokenizer "
                f"than the model's (use the tokenizer saved with the model)"
            )


def preflight_lm(cfg: LMConfig) -> None:
    """A `task: lm` config's files, before any work: the corpus (a .jsonl / .parquet file
    or a folder) and the teacher (a GGUF file or a model directory with config.json)."""
    from pipeline.hf_files import resolve_model_path
    from pipeline.models.gguf import resolve_gguf

    c = cfg.corpus
    path = os.path.expanduser(c.path)
    ok = os.path.isdir(path) if c.kind == "text_files" else os.path.isfile(path)
    if not ok:
        hint = " (the shipped configs' data: run `distill assets`)" if c.path.startswith(".assets/") else ""
        raise ConfigError(
            f"corpus.path: {c.kind} {'folder' if c.kind == 'text_files' else 'file'} not found: {c.path}{hint}"
        )
    try:
        if cfg.teacher.gguf:
            resolve_gguf(cfg.teacher.gguf)
        else:
            d = resolve_model_path(cfg.teacher.path, what="teacher.path")
            if not os.path.isfile(os.path.join(d, "config.json")):
                raise ValueError(
                    f"teacher.path {cfg.teacher.path!r}: {d} holds no config.json (not a Hugging Face model directory)"
                )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    import json

    from .lm import ensure_teacher, splits

    with open(os.path.join(ensure_teacher(cfg)["dir"], "config.json")) as f:
        max_pos = json.load(f).get("max_position_embeddings")
    if max_pos is not None and c.seq_len > int(max_pos):
        raise ConfigError(
            f"corpus.seq_len {c.seq_len} is larger than the teacher's context (its config.json: "
            f"max_position_embeddings {max_pos})"
        )
    _check_weight_students(cfg, ensure_teacher(cfg)["dir"])
    try:  # tokenize and cut the corpus now (cached: the flows reuse it): its errors before any server
        splits(cfg)
    except ValueError as e:
        raise ConfigError(f"corpus: {e}") from None
    _check_own_tokenizers(cfg)


def _check_own_tokenizers(cfg: LMConfig) -> None:
    """Students with their own tokenizer: the tokenizer built (or trained, once) and the
    corpus tokenized with it, refusing one that cannot represent the text; labels already
    stored must carry the alignment fields of this text (cached: the flows reuse it all)."""
    import storage
    from pipeline.data.alignment import byte_record
    from pipeline.training.cross_stream import check_alignment_fields

    from .lm import splits, student_splits

    own = [(i, m) for i, m in enumerate(cfg.student_models()) if m.tokenizer is not None]
    for i, m in own:
        try:
            student_splits(cfg, {"model": m.model_dump()})
        except ValueError as e:
            raise ConfigError(f"students.models[{i}].tokenizer: {e}") from None
    if not own or cfg.label.topk is None:
        return
    uri = cfg.label_uris()["topk"]
    try:
        manifest = storage.read_manifest(storage.Location(uri, None))
    except (storage.SoftLabelError, OSError):
        return  # not labelled yet: the labeller stores the fields
    try:
        check_alignment_fields(manifest, uri, byte_record(splits(cfg)["train"])["sha256"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_weight_students(cfg: LMConfig, teacher_dir: str) -> None:
    """Students that start from weights, from config.json and tokenizer files alone: a pruned
    student's layers exist in the teacher; a pretrained student's directory has weights,
    the teacher's vocabulary and the teacher's tokenizer (both fingerprints named)."""
    from pipeline.hf_files import load_tokenizer, tokenizer_fingerprint
    from pipeline.models.pruning import check_pretrained, check_pruning

    from .lm import teacher_vocab

    for i, m in enumerate(cfg.student_models()):
        kw, key = m.kwargs, f"students.models[{i}]"
        try:
            if m.arch == "pruned":
                check_pruning(teacher_dir, kw.get("keep_layers"), kw.get("keep_every"), kw.get("mlp_keep"))
            elif m.arch == "hf-causal-lm":
                if not kw.get("path"):
                    raise ValueError("kwargs.path: arch 'hf-causal-lm' needs the model's local directory")
                fp = tokenizer_fingerprint(load_tokenizer(teacher_dir))
                check_pretrained(kw["path"], teacher_vocab({"dir": teacher_dir}), fp)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
