"""The training loop, the stored-label stream, teachers and the student recipe."""
