"""docs/config.md stays true: every key the schema accepts (both tasks) is in the reference,
and every key the reference names exists in the schema. Sections of one shared type are
documented once: the training section as `train.<key>`, a model entry under
`teacher.model.<key>`, and `data.transfer` as a source like `data.source`."""

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from flows.config import ClassifyConfig, LMConfig, ModelConfig, StudentModelConfig, TrainSection

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        key = prefix + name
        args = typing.get_args(field.annotation) or (field.annotation,)
        subs = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        lists = [a for a in args if typing.get_origin(a) is list]
        if subs and subs[0] is TrainSection:
            out |= {key} | {f"train.{k}" for k in TrainSection.model_fields}
        elif subs and subs[0] is ModelConfig:
            out |= {key} | {f"teacher.model.{k}" for k in ModelConfig.model_fields}
        elif key == "data.transfer":
            out.add(key)
        elif subs:
            out |= schema_keys(subs[0], key + ".")
        else:
            out.add(key)
            if lists and any(typing.get_args(x) == (StudentModelConfig,) for x in lists):
                out |= {f"teacher.model.{k}" for k in ModelConfig.model_fields}
                out |= {
                    f"students.models.{k}" for k in set(StudentModelConfig.model_fields) - set(ModelConfig.model_fields)
                }
    return out


def documented_keys() -> set[str]:
    """The backticked keys in the first column of the reference's tables (`a` / `b` cells too)."""
    keys = set()
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        keys |= set(re.findall(r"`([a-z_][a-z0-9_.]*)`", first))
    return keys


def test_every_schema_key_is_documented_and_every_documented_key_exists():
    schema = schema_keys(ClassifyConfig) | schema_keys(LMConfig)
    doc = documented_keys()
    assert len(schema) > 90
    assert not schema - doc, f"keys the reference lacks: {sorted(schema - doc)}"
    assert not doc - schema, f"keys the reference names that the schema does not accept: {sorted(doc - schema)}"


def test_the_checker_sees_a_missing_or_a_stale_key(tmp_path, monkeypatch):
    """The check itself can fail: drop one documented row, add one stale row."""
    text = DOC.read_text()
    assert "| `label.retries` |" in text
    bad = tmp_path / "config.md"
    bad.write_text(text.replace("| `label.retries` |", "| retries |") + "\n| `label.colour` | red | no |\n")
    monkeypatch.setattr(__import__(__name__), "DOC", bad)
    schema = schema_keys(ClassifyConfig) | schema_keys(LMConfig)
    doc = documented_keys()
    assert "label.retries" in schema - doc and "label.colour" in doc - schema
