"""Deterministic views: a row's view is a pure function of (transform, sample_id, view)."""
