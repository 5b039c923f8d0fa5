"""distillery's soft-label store: sharded Parquet/Zarr datasets of temperature-scaled
teacher logits with a manifest, atomic commits, verification and streaming reads.

numpy, pyarrow, zarr and fsspec only: never torch or Prefect. Format: docs/format.md.
"""

from .convert import convert
from .errors import (
    CorruptShardError,
    CoverageError,
    IncompleteDatasetError,
    InvalidLogitsError,
    ManifestError,
    MismatchError,
    SoftLabelError,
)
from .fs import Location
from .index import ShardIndex, total_bytes
from .layout import Column, columns_for
from .manifest import FORMAT_VERSION, lineage_digest, now_iso
from .partition import batches_per_partition
from .reader import SoftLabelDataset, open_soft_labels
from .shards import read_manifest
from .tokens import decode as decode_tokens
from .topk import softmax, topk_probs
from .verify import VerifyReport, verify
from .writer import SoftLabelWriter

__all__ = [
    "SoftLabelWriter",
    "open_soft_labels",
    "SoftLabelDataset",
    "verify",
    "VerifyReport",
    "convert",
    "SoftLabelError",
    "ManifestError",
    "IncompleteDatasetError",
    "MismatchError",
    "InvalidLogitsError",
    "CoverageError",
    "CorruptShardError",
    "FORMAT_VERSION",
    "read_manifest",
    "softmax",
    "topk_probs",
    "Location",
    "batches_per_partition",
    "lineage_digest",
    "now_iso",
    "Column",
    "columns_for",
    "decode_tokens",
    "ShardIndex",
    "total_bytes",
]
