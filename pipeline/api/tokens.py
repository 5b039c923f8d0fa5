"""Token labels in a user's own stack: the corpus windows they were made from, rebuilt from
the manifest; the labels as a `datasets.Dataset`; the label stream.

    labels = distillery.open_labels("runs/lm/token_labels/topk")
    corpus = distillery.corpus_of(labels)                   # the labelled windows, checked
    # (a chat corpus: rows at assistant targets; the teacher's written answers: prompt + answer)
    data = distillery.TokenLabels(labels, corpus)           # map-style, one window per item
    ds = distillery.to_hf_dataset(labels)                   # datasets.Dataset for TRL / axolotl
    stream = distillery.open_stream(uri, corpus, batch_size=8, rank=r, world_size=w)  # iterable
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pipeline.training.stream import check_token_lineage, open_label_stream
from pipeline.training.windows import TokenLabels, as_columns
from storage import SoftLabelDataset, open_soft_labels

if TYPE_CHECKING:
    from pipeline.data.corpus import TokenCorpus
    from pipeline.training.stream import LabelStream


def _open(labels: SoftLabelDataset | str) -> SoftLabelDataset:
    return labels if isinstance(labels, SoftLabelDataset) else open_soft_labels(labels)


def corpus_of(labels: SoftLabelDataset | str) -> TokenCorpus:
    """The windows token labels were made from, rebuilt from what their manifest records
    (the corpus section `distill label` used and the tokenizer directory), and checked
    against the labels' data fingerprint: a changed corpus file or tokenizer is refused."""
    from pipeline.data.corpus import corpus_splits

    ds = _open(labels)
    m = ds.manifest
    data = m.get("data") or {}
    recipe = data.get("recipe") or {}
    tok = ((data.get("inputs") or {}).get("tokenizer") or {}).get("path")
    if "corpus" not in recipe or not tok:
        raise ValueError(
            f"{ds.uri}: the manifest records no corpus recipe (labelled outside `distill label` or by an "
            f"older distillery): build the corpus yourself and pass it (TokenLabels(labels, corpus))"
        )
    if not os.path.isdir(tok):
        raise ValueError(f"{ds.uri}: the tokenizer directory the labels record, {tok}, does not exist here")
    corpus = corpus_splits(recipe["corpus"], tok)[recipe["label_split"]]
    if data.get("generation"):  # the teacher's written answers: prompt + answer per sample
        corpus = generated_corpus(ds, corpus)
    check_token_lineage(m, corpus, ds.uri)
    return corpus


def aligned_corpus(labels: SoftLabelDataset | str, tokenizer: str) -> TokenCorpus:
    """The labelled windows in a student's own tokenization (cross-tokenizer KD): corpus_of
    (labels) re-tokenized with the tokenizer at `tokenizer` (a directory or pkg: path; one the
    project trains: pipeline.data.tokenizing.student_tokenizer), window i holding the same
    bytes as the teacher's window i (pipeline/data/alignment.py). Refuses a tokenizer that
    cannot represent the text, other text, and labels without the alignment fields.
    open_stream(labels, it) then yields the aligned batches the cross-tokenizer losses take."""
    from pipeline.data.alignment import aligned_windows
    from pipeline.data.corpus import open_corpus
    from pipeline.hf_files import resolve_model_path
    from pipeline.training.cross_stream import check_alignment_fields

    ds = _open(labels)
    teacher = corpus_of(ds)
    student = open_corpus(ds.manifest["data"]["recipe"]["corpus"], resolve_model_path(tokenizer, what="tokenizer"), 1)
    out = aligned_windows(student, teacher)
    check_alignment_fields(ds.manifest, ds.uri, out.aligned_to["bytes_sha256"])
    return out


def generated_corpus(labels: SoftLabelDataset | str, prompt_corpus: TokenCorpus) -> TokenCorpus:
    """The teacher's written answers of a generation dataset (`label.generate`) as windows:
    prompt i // N of `prompt_corpus` (the chat corpus' train split they were written for)
    followed by answer i % N; the answer's tokens are the labelled positions (sequence-level
    KD: CE on them; the stored rows: the token term). Refuses other prompts or settings."""
    from pipeline.data.generated import generated_corpus as build

    return build(_open(labels), prompt_corpus)


def to_hf_dataset(labels: SoftLabelDataset | str, corpus: TokenCorpus | None = None, *, batch_size: int = 256):
    """A `datasets.Dataset`, one row per window: sample_id, input_ids (n + 1 tokens: the
    window and the token after it), attention_mask (ones), and the teacher's rows,
    topk_ids / topk_logprobs (n, k) and missing_mass (n,), or sample_ids / sample_counts
    (n, s). Row i of a teacher column is its distribution of input_ids[i + 1]: a causal
    LM's logits[:, :-1] line up with it. corpus: the windows (default corpus_of(labels)).
    distillery.collate_tokens batches its rows back into the built-in loop's batches."""
    try:
        import datasets
    except ImportError:
        raise ImportError("to_hf_dataset needs the `datasets` package: pip install datasets") from None
    ds = _open(labels)
    data = TokenLabels(ds, corpus if corpus is not None else corpus_of(ds))
    parts = []
    for a in range(0, len(data), batch_size):
        parts.append(
            datasets.Dataset.from_dict(as_columns(data.__getitems__(range(a, min(a + batch_size, len(data))))))
        )
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def open_stream(
    labels: str, data: Any, *, batch_size: int, rank: int = 0, world_size: int = 1, **kw: Any
) -> LabelStream:
    """The built-in loop's iterable label stream: batches of `batch_size` rows (classifier
    rows, or windows) of stored labels joined to `data` (a pipeline.data Source, or the
    token corpus), split by rank x DataLoader worker so every stored row is a non-pad row
    exactly once per epoch over all ranks; set_epoch(e) reshuffles. Batches hold the
    keys of training/stream.py's module doc. kw: seed, shuffle, storage_options,
    public_key, expect (LabelStream's)."""
    return open_label_stream(labels, data, batch_size=batch_size, rank=rank, world_size=world_size, **kw)
