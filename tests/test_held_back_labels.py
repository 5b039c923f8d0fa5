"""A label split other than `train` is held back as unlabelled: its rows' true labels
(when it is cut from a labelled file) never reach a student (issue #19: `alphas: [1.0]`
trained on them and the report called the result distilled)."""

import yaml
from conftest import cli_in_process

from flows.config import load_config

BASE = {
    "name": "held",
    "data": {"dataset": "digits", "sizes": {"train": 100, "transfer": 300, "val": 50, "test": 100}},
}


def write(tmp_path, **over):
    cfg = {**BASE, "data": {**BASE["data"], **over.pop("data", {})}, **over}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(p)


def test_alpha_above_zero_on_a_held_back_split_is_refused_before_anything_runs(tmp_path):
    path = write(tmp_path, data={"label_split": "transfer"}, students={"alphas": [0.0, 1.0]})
    for cmd in ("run", "students"):
        r = cli_in_process(cmd, path)
        assert r.returncode == 2
        assert "students.alphas [0.0, 1.0]: alpha > 0 adds cross-entropy on the hard labels" in r.stderr
        assert "'transfer', which is held back as unlabelled" in r.stderr


def test_alpha_defaults_to_zero_on_a_held_back_split_and_stays_on_train(tmp_path):
    assert load_config(write(tmp_path, data={"label_split": "transfer"})).students.alphas == [0.0]
    assert load_config(write(tmp_path)).students.alphas == [0.5]  # label_split train: CE on train is fair
    assert load_config(write(tmp_path, students={"alphas": [0.3]})).students.alphas == [0.3]
