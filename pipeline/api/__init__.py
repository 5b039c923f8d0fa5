"""distillery's public API: one import name for what a user's own code needs to spend stored
labels (`import distillery`). Installed as the package `distillery` (pyproject.toml maps it
to this folder), so nobody has to import the generic top-level names `storage` or
`pipeline`, which other packages also use. Everything here is re-exported from its one
owner; nothing is defined twice.

    import distillery
    labels = distillery.open_labels("runs/quickstart/soft_labels")    # checked, streamable
    labels.iter_batches(256) / labels.take(sample_ids, views)        # numpy rows by sample id
    distillery.verify(uri).ok                                        # re-hash and check all
    data = distillery.StoredLabels(labels, my_dataset, sample_ids=ids) # map-style, joined by id
    distillery.distill_loss(student(x), target, labels=labels)       # the built-in loop's loss
    distillery.Objective(loss="kd", temperature=4.0, kind="dense", stored_temperatures=[4.0])
        .terms(student_logits, batch)                                # the loss the built-in loop uses
    distillery.LOSSES                                                # every registered loss, with its formula
    distillery.losses.topk_kl(logits, batch)                         # each loss as a plain function
    distillery.views_of(labels).apply(x, sample_ids, views)          # the stored views, replayed
    distillery.build_model({"arch": "timm:mobilenetv3_small_050"}, in_shape=(1, 32, 32), num_classes=10)

Language models:
    corpus = distillery.corpus_of(labels)                            # the labelled windows, checked
    data = distillery.TokenLabels(labels, corpus)                    # map-style, one window per item
    DataLoader(data, batch_size=8, collate_fn=distillery.collate_tokens)  # padded batches
    distillery.open_stream(uri, corpus, batch_size=8, rank=r, world_size=w)  # iterable, rank/worker split
    distillery.to_hf_dataset(labels)                                 # a datasets.Dataset
    distillery.DistillationTrainer(model=..., args=..., train_dataset=data, labels=labels)  # HF Trainer

A student with its own tokenizer (cross-tokenizer KD: losses uld, gold, alm):
    corpus = distillery.aligned_corpus(labels, "my_tokenizer_dir")   # the same bytes, its tokens
    stream = distillery.open_stream(uri, corpus, batch_size=8)       # + the chunks both sides share
    obj = distillery.Objective.for_labels(labels, loss="alm", alpha=0.5, stream=stream)

Signed datasets: distillery.keys.generate / load_signer / load_verifier (Ed25519).
"""

from pipeline.api import losses
from pipeline.api.labels import StoredLabels, distill_loss, views_of
from pipeline.api.tokens import aligned_corpus, corpus_of, generated_corpus, open_stream, to_hf_dataset
from pipeline.data.datasets import load_dataset
from pipeline.models.registry import build_model
from pipeline.objectives.losses import FAMILIES, LOSSES, register_loss
from pipeline.objectives.objective import Objective
from pipeline.training.windows import TokenLabels, Windows, collate_tokens
from storage import (
    CorruptShardError,
    CoverageError,
    IncompleteDatasetError,
    InvalidLogitsError,
    ManifestError,
    MismatchError,
    SoftLabelDataset,
    SoftLabelError,
    SoftLabelWriter,
    convert,
    verify,
)
from storage import open_soft_labels as open_labels

__all__ = [
    "open_labels",
    "StoredLabels",
    "distill_loss",
    "views_of",
    "build_model",
    "losses",
    "TokenLabels",
    "Windows",
    "collate_tokens",
    "corpus_of",
    "aligned_corpus",
    "generated_corpus",
    "open_stream",
    "to_hf_dataset",
    "DistillationTrainer",
    "collate_rows",
    "load_dataset",
    "SoftLabelDataset",
    "SoftLabelWriter",
    "verify",
    "convert",
    "Objective",
    "LOSSES",
    "FAMILIES",
    "register_loss",
    "keys",
    "SoftLabelError",
    "ManifestError",
    "MismatchError",
    "IncompleteDatasetError",
    "InvalidLogitsError",
    "CoverageError",
    "CorruptShardError",
]


def __getattr__(name: str):
    # `distillery.keys` (Ed25519 signing) imports cryptography, and the Trainer transformers,
    # only when asked for
    if name == "keys":
        import pipeline.keys as keys

        return keys
    if name in ("DistillationTrainer", "collate_rows"):
        import pipeline.training.hf as hf

        return getattr(hf, name)
    raise AttributeError(f"module 'distillery' has no attribute {name!r}")
