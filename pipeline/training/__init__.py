"""The training loop, the stored-label stream, teachers and the student recipe."""

from pipeline.training import cross_stream  # noqa: F401  (registers the aligned-windows stream)
