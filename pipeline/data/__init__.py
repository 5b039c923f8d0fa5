"""Data sources: their sample ids, fingerprints, splits and how rows become model inputs."""
