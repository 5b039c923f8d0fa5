"""The flows receive the config as its JSON dump (a Prefect parameter) and validate it
again: every shipped config, and every sweep shape, must survive that round trip with the
same meaning. (`configs/lm.yaml`'s `students.seeds` once failed here: the dump carried
the default `students.train.seed` too and was refused as "both given".)"""

from pathlib import Path

import pytest

from flows import recipes, secrets
from flows.config import load_config, parse_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "tests" / "configs").glob("*.yaml"))


def _round_trip(cfg):
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # what flows/flows.py hands to its tasks
    again = parse_config(raw)
    assert again.model_dump(mode="json") == raw
    assert recipes.student_runs(again) == recipes.student_runs(cfg)
    assert again.label_uris() == cfg.label_uris()
    return again


def test_there_are_configs_to_check():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "reviews.yaml", "lm.yaml", "tiny.yaml"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_survives_the_flow_parameter_round_trip(path):
    _round_trip(load_config(path))


@pytest.mark.parametrize(
    "students",
    [
        {"seeds": [3, 5]},
        {"train": {"seed": 7}},
        {},
    ],
    ids=["seeds", "train.seed", "neither"],
)
def test_student_seeds_survive_the_round_trip_for_both_tasks(students):
    for path in (ROOT / "tests/configs/tiny.yaml", ROOT / "configs/lm.yaml"):
        raw = read_yaml(path)
        raw["students"].pop("seeds", None)  # configs/lm.yaml names its seed
        raw["students"]["train"] = raw["students"].get("train", {}) | students.get("train", {})
        if "seeds" in students:
            raw["students"]["seeds"] = students["seeds"]
        again = _round_trip(parse_config(raw))
        want = students.get("seeds") or [students.get("train", {}).get("seed", 0)]
        assert sorted({r["seed"] for r in recipes.student_runs(again)}) == want, path


def test_seeds_and_train_seed_together_are_still_refused():
    from flows.config import ConfigError

    with pytest.raises(ConfigError, match="students.seeds or students.train.seed, not both"):
        load_config(ROOT / "tests/configs/tiny.yaml", ["students.seeds=[1]", "students.train.seed=2"])
