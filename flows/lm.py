"""The language-model task's half of the recipes (`task: lm`): its teacher (a pretrained
causal LM: a model directory, or a GGUF file converted once), the corpus cut into windows
with the teacher's tokenizer, the labeller storing every configured token layout from one
forward, and the inputs of each student. flows/recipes.py calls these through
`TASK_RECIPES`; everything passed in or out is a config, a path/URI or small JSON
metadata, never a tensor.
"""

from __future__ import annotations

import json
import os

from pipeline.data.corpus import TokenCorpus, corpus_splits
from pipeline.device import resolve_device
from pipeline.hf_files import resolve_model_path
from pipeline.labelling.generate import GenerationLabeller
from pipeline.labelling.tokens import TokenLabeller, output_spec
from pipeline.models.gguf import gguf_teacher_dir, load_causal_lm, teacher_fingerprint
from pipeline.models.registry import param_counts
from pipeline.paths import absolute_if_exists
from pipeline.training import student
from pipeline.training.stream import verifier

from .config import LMConfig as Config

# ------------------------------------------------------------------ teacher and corpus


def ensure_teacher(cfg: Config, *, retrain: bool = False) -> dict:
    """{"name", "dir", "fingerprint", "source"}: a GGUF file is converted once (cached by
    its sha256), a directory is used as it is. A pretrained teacher: nothing to train."""
    t = cfg.teacher
    d = gguf_teacher_dir(t.gguf) if t.gguf else resolve_model_path(t.path, what="teacher model")
    source = absolute_if_exists(t.gguf or t.path)  # what the manifest records: found from anywhere
    return {"name": t.name, "dir": d, "fingerprint": teacher_fingerprint(d), "source": source}


existing_teacher = ensure_teacher


def recipe(cfg: Config) -> dict:
    """What the manifest records so that `distill inspect --replay` rebuilds the labelled
    windows: the corpus section (key order kept: splits are cut in corpus.sizes order), its
    path made absolute (a relative one means the labelling run's working directory)."""
    corpus = json.loads(cfg.corpus.model_dump_json())
    corpus["path"] = absolute_if_exists(corpus["path"])
    return {"corpus": corpus, "label_split": "train"}


def teacher_from_source(source: str) -> str:
    """The model directory of a recorded teacher source (a GGUF file, converted once; or a directory)."""
    return gguf_teacher_dir(source) if str(source).endswith(".gguf") else resolve_model_path(source, what="teacher")


def manifest_teacher(teacher: dict) -> dict:
    """The manifest's teacher entry: name, fingerprint, source (not the cache directory)."""
    return {k: teacher[k] for k in ("name", "fingerprint", "source")}


def splits(cfg: Config) -> dict[str, TokenCorpus]:
    """The corpus tokenized with the teacher's tokenizer, cut into windows and split by
    corpus.sizes (deterministic in corpus.seed); cached per process."""
    return corpus_splits(cfg.corpus.model_dump(), ensure_teacher(cfg)["dir"])


def eval_split(cfg: Config) -> TokenCorpus:
    s = splits(cfg)
    return s.get("test") or s["val"]


# ------------------------------------------------------------------ labelling


def labeller(cfg: Config, teacher: dict, job: str = "windows") -> TokenLabeller | GenerationLabeller:
    """The teacher over every train window, into every configured layout (one forward);
    job "generate": the teacher writing answers to the train conversations' prompts, each
    written token labelled in the same layouts (label.generate)."""
    lab, uris, outputs = cfg.label, cfg.label_uris(job), []
    if lab.topk is not None:
        outputs.append(
            output_spec(
                uri=uris["topk"],
                representation="token_topk",
                k=lab.topk.k,
                value_dtype=lab.topk.dtype,
                tail_dtype=lab.topk.tail_dtype,
                backend=lab.backend,
                # what students with their own tokenizer align by (plain text; not the written answers)
                target_logprob=lab.target_logprob and cfg.corpus.kind != "chat" and job == "windows",
            )
        )
    if lab.sampled is not None:
        outputs.append(
            output_spec(
                uri=uris["sampled"],
                representation="token_sampled",
                draws=lab.sampled.draws,
                s_max=lab.sampled.s_max,
                backend=lab.backend,
            )
        )
    if job == "generate":
        g, model = lab.generate, load_causal_lm(teacher["dir"])
        return GenerationLabeller(
            model,
            splits(cfg)["train"],
            outputs,
            answers=g.answers,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
            stop_ids=stop_ids(teacher, g.stop),
            prompts=g.prompts,
            prompts_at=g.prompts_at,
            batch_size=lab.batch_size,
            device=lab.device,
            amp=lab.amp,
            recipe=recipe(cfg),
        )
    return TokenLabeller(
        load_causal_lm(teacher["dir"]),
        splits(cfg)["train"],
        outputs,
        batch_size=lab.batch_size,
        device=lab.device,
        amp=lab.amp,
        seed=lab.seed,
        recipe=recipe(cfg),
    )


def stop_ids(teacher: dict, stop: list[str] | None) -> list[int] | None:
    """label.generate.stop as token ids (each must be one token of the teacher's tokenizer)."""
    if stop is None:
        return None
    from pipeline.hf_files import load_tokenizer

    tok = load_tokenizer(teacher["dir"])
    out = []
    for s in stop:
        ids = tok.convert_tokens_to_ids([s]) if s in tok.get_vocab() else tok(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"label.generate.stop: {s!r} is {len(ids)} tokens of the teacher's tokenizer, not one")
        out.append(int(ids[0]))
    return out


def check_label_lineage(cfg: Config, uri: str) -> dict:
    """The manifest of the labels at `uri`; the stream refuses labels of another corpus,
    tokenizer or windows when it opens them, naming both fingerprints."""
    return _open(cfg, uri).manifest


# ------------------------------------------------------------------ students


def teacher_vocab(teacher: dict) -> int:
    with open(os.path.join(teacher["dir"], "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def student_tokenizer(cfg: Config, spec) -> str:
    """The directory of a student's own tokenizer (students.models[].tokenizer): a path, or
    one trained once on the corpus' documents (cached by the file's sha256 and the spec)."""
    from pipeline.data.corpus import document_batches
    from pipeline.data.tokenizing import student_tokenizer as build
    from pipeline.paths import file_sha256

    c = cfg.corpus
    spec = spec.model_dump() if hasattr(spec, "model_dump") else spec
    if isinstance(spec, str):
        return build(spec, texts_factory=None, source_key="")
    spec = {k: v for k, v in spec.items() if v is not None}  # the config's dump: {train: bytes, vocab_size: None}
    fmt, field = ("parquet", "text_column") if c.kind == "parquet" else (c.kind, "text_field")
    source = {"path": os.path.abspath(c.path), field: c.text_field}
    key = f"{file_sha256(source['path']) if os.path.isfile(source['path']) else source['path']}:{c.text_field}"

    def texts():
        return (t for batch in document_batches(fmt, source) for t in batch if t is not None and t.strip())

    return build(spec, texts_factory=texts, source_key=key)


def student_splits(cfg: Config, run: dict) -> tuple[dict[str, TokenCorpus], str | None]:
    """The windows a student reads, by split, and its own tokenizer's directory: the
    teacher's windows, or (students.models[].tokenizer) the same bytes in the student's
    tokenization (pipeline/data/alignment.py)."""
    spec = run["model"].get("tokenizer")
    if spec is None:
        return splits(cfg), None
    from pipeline.data.alignment import aligned_splits

    d = student_tokenizer(cfg, spec)
    return aligned_splits(cfg.corpus.model_dump(), ensure_teacher(cfg)["dir"], d), d


def student_inputs(cfg: Config, teacher: dict, run: dict, manifests: list[dict]) -> dict:
    """run_student's task-specific arguments: the train windows (labelled by the teacher,
    and the baseline's next-token targets), the teacher's vocabulary as the output width
    (a student with its own tokenizer: its windows of the same bytes, its vocabulary)."""
    s, own = student_splits(cfg, run)
    train, extra, model = s["train"], {}, run["model"]
    if own is not None:  # its own windows of the same bytes, vocabulary and tokenizer
        out = {"eval_data": s.get("test") or s["val"], "num_classes": int(train.model_args()["vocab_size"])}
        out |= {"tokenizer_dir": own, "model_args": {}}
        model = model | {"kwargs": model["kwargs"] | {"tokenizer": model["tokenizer"]}}  # in the resume key
    else:
        out = {"eval_data": eval_split(cfg), "num_classes": teacher_vocab(teacher), "tokenizer_dir": teacher["dir"]}
        out["model_args"] = {"teacher": teacher["dir"]}  # a pruned student starts from the teacher's layers
        if run.get("data") == "generated":  # prompt + the teacher's written answer, its tokens the targets
            train = answers_corpus(cfg)
            s = s | {"answers": train}
            extra = {"equal_steps_to": len(s["train"])}  # as many steps as a student of the train windows
    return (
        extra
        | out
        | {
            "transfer": train,
            "labelled": train,
            "val": s["val"],
            "lineage": lambda t: student.student_lineage(
                data={name: d.fingerprint() for name, d in s.items()},
                split=cfg.corpus.model_dump(),
                views=None,
                model=model,
                train_config=t,
                teacher_fingerprint=teacher["fingerprint"],
                label_manifests=manifests,
            ),
        }
    )


def answers_corpus(cfg: Config) -> TokenCorpus:
    """The teacher's written answers (label.generate) as training windows: each prompt of
    the train conversations followed by one answer (pipeline/data/generated.py)."""
    from pipeline.data.generated import generated_corpus

    uri = next(iter(cfg.label_uris("generate").values()))
    return generated_corpus(_open(cfg, uri), splits(cfg)["train"])


def _open(cfg: Config, uri: str):
    import storage

    from . import secrets

    return storage.open_soft_labels(
        uri, storage_options=secrets.resolve(cfg.label.storage_options) or None, verifier=verifier(cfg.label.public_key)
    )


def teacher_evaluation(cfg: Config, teacher: dict) -> dict:
    """The report's teacher entry: its perplexity on the evaluation windows, cached in the
    run directory by (teacher fingerprint, windows' fingerprint): the same number every run."""
    data = eval_split(cfg)
    key = {"teacher": teacher["fingerprint"], "eval": data.fingerprint(), "bits_per_byte": True}
    path = cfg.run_dir() / "teacher_eval.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["eval"]
        except (OSError, ValueError):
            pass
    from pipeline.models.causal_lm import perplexity

    model = load_causal_lm(teacher["dir"])
    dev = resolve_device(cfg.label.device)  # where the teacher labels, by the same rule
    p = perplexity(model.to(dev), data, batch_size=cfg.label.batch_size, device=dev)
    ev = {
        "name": teacher["name"],
        "fingerprint": teacher["fingerprint"],
        "source": teacher["source"],
        "params": param_counts(model)["params"],
        "perplexity": p["perplexity"],
        "nll": p["loss"],
        "tokens": p["tokens"],
    } | {k: p[k] for k in ("bits_per_byte", "bytes") if k in p}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "eval": ev}, indent=2))
    os.replace(tmp, path)
    return ev


def _generation_note(cfg: Config, train: TokenCorpus) -> dict:
    g = cfg.label.generate
    have = len(train.prompts(g.prompts_at)[0])
    prompts = have if g.prompts is None else min(g.prompts, have)
    out = {"prompts": prompts, "answers": g.answers, "max_new_tokens": g.max_new_tokens}
    out |= {"temperature": g.temperature, "top_p": g.top_p}
    try:  # the written tokens, once the answers exist
        out["tokens"] = int(_open(cfg, next(iter(cfg.label_uris("generate").values()))).manifest["num_tokens"])
    except Exception:  # noqa: BLE001 - not written yet: the note has no count
        pass
    return out


def data_description(cfg: Config) -> dict:
    """What the students learned from, for the report's footnote."""
    c = cfg.corpus
    if c.kind == "chat":  # sizes count conversations; the windows and labelled share come from the corpus
        parts = splits(cfg)
        ev = "test" if "test" in c.sizes else "val"
        return {
            "corpus": c.path,
            "seq_len": c.seq_len,
            "windows": "turns",
            "train_windows": len(parts["train"]),
            "train_conversations": c.sizes["train"],
            "labelled_share": parts["train"].describe()["chat"]["labelled_share"],
            "eval_split": ev,
            "eval_windows": len(parts[ev]),
            "eval_conversations": c.sizes[ev],
            "eval_tokens": parts[ev].num_positions,
            "unit": "windows",
            **({"generated": _generation_note(cfg, parts["train"])} if cfg.label.generate is not None else {}),
        }
    return {
        "corpus": c.path,
        "seq_len": c.seq_len,
        "windows": c.windows,
        "train_windows": c.sizes["train"],
        "val_windows": c.sizes["val"],
        "eval_split": "test" if "test" in c.sizes else "val",
        "eval_windows": c.sizes.get("test", c.sizes["val"]),
        "unit": "windows",
    }
