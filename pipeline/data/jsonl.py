"""JSON lines read with located errors: each value of one field, with its line number."""

from __future__ import annotations

import json


def field_values(path: str, field: str, setting: str):
    """(line number, row[field]) of every non-blank line of `path`; a line that is not a
    JSON object or lacks the field is refused naming the file, the line and `setting` (the
    config key that names the field)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}: line {n} has no field {field!r} (found {keys}); set {setting}")
            yield n, row[field]
