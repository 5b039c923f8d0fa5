"""Every error the storage package raises derives from SoftLabelError.

Callers that only care "is this dataset usable" catch SoftLabelError; callers that
want to react to a specific cause (resume vs. refuse) catch the subclass.
"""


class SoftLabelError(Exception):
    """Base class of every error raised by distillery's soft-label store."""


class ManifestError(SoftLabelError):
    """manifest.json is missing, unreadable, of an unknown format_version, or invalid."""


class IncompleteDatasetError(SoftLabelError):
    """The dataset's manifest does not say status == "complete"."""


class MismatchError(SoftLabelError):
    """A manifest value differs from what the caller expected or what a writer was opened with."""


class InvalidLogitsError(SoftLabelError):
    """Logits handed to the writer are NaN/Inf, overflow the storage dtype, or have the wrong shape."""


class CoverageError(SoftLabelError):
    """Shards do not cover every (sample_id, view) exactly once."""


class CorruptShardError(SoftLabelError):
    """A shard's bytes do not match its recorded checksum, or it cannot be decoded."""
