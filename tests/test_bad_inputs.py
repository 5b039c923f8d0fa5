"""Bad inputs are refused before any work starts, with one line that names the key or file.

Each case goes through the real CLI: its main() in-process for most refusals (they end
before Prefect starts), `python -m flows.cli` in a subprocess for one of each kind. Config and
YAML problems are refused by load_config (exit 2). Problems that need the data or the
teacher's file are found by flows.preflight.preflight; the CLI cases for those run once the
CLI calls it (they are skipped, and preflight is tested directly, until then).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, cli_in_process

from flows.config import ConfigError, load_config
from flows.preflight import preflight
from pipeline.models.checkpoint import FORMAT, VERSION, save_checkpoint
from pipeline.models.registry import build_model

REPO = Path(__file__).resolve().parents[1]


def distill(*args, env=None, timeout=600):
    """The console command in a new interpreter: the real entry point, ~3 s a call."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def refused(r, code: int, *needles: str) -> str:
    """The run failed with `code`, printed one `distill:` line naming every needle, no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    said = r.stderr[r.stderr.index("distill: ") :] if "distill: " in r.stderr else ""
    for n in needles:
        assert n in said, (n, r.stderr[-3000:])
    return said


# ------------------------------------------------------------------ bad files


def _digits_like(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8), dtype=np.float32), np.arange(n) % 10


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    x, y = _digits_like()
    stray = y.copy()
    stray[7] = 99
    np.savez(d / "stray.npz", x=x, y=stray)
    inf = x.copy()
    inf[3, 2, 2] = np.inf
    np.savez(d / "inf.npz", x=inf, y=y)
    np.savez(d / "empty.npz", x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64))
    (d / "notes.pt").write_text("this is not a checkpoint\n")
    # an attacker's checkpoint: valid format, arch os:system
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "arch": {"arch": "os:system", "kwargs": {"command": f"touch {d / 'PWNED'}"}},
            "in_shape": [1, 8, 8],
            "num_classes": 10,
            "state_dict": {},
            "metadata": {},
        },
        d / "evil.pt",
    )
    return d


def _overrides(tmp_path, *more):
    return [f"runs_dir={tmp_path}", *more]


# ------------------------------------------------------------------ config and YAML: exit 2 now


def test_non_utf8_yaml_names_the_file(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes(Path(TINY).read_bytes().replace(b"name: tiny", "name: tiny  # caf\u00e9".encode("latin-1")))
    refused(distill("run", str(cfg)), 2, str(cfg), "not UTF-8", "byte 0xe9")


def test_broken_yaml_override_value_names_the_key(tmp_path):
    said = refused(
        distill("run", TINY, *_overrides(tmp_path), "label.temperature=[1"), 2, "label.temperature", "not valid YAML"
    )
    assert "ParserError" not in said


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    refused(
        cli_in_process("label", TINY, *_overrides(tmp_path), f"label.temperature={value}"),
        2,
        "label.temperature",
        "finite number",
    )
    refused(
        cli_in_process("students", TINY, *_overrides(tmp_path), f"students.temperatures=[2, {value}]"),
        2,
        "students.temperatures",
    )


def test_k_with_dense_labels_names_the_key(tmp_path):
    refused(
        cli_in_process("label", TINY, *_overrides(tmp_path), "label.k=3"),
        2,
        "label.k=3 is only used with label.representation=topk",
    )


# ------------------------------------------------------------------ need the data: preflight

# (overrides, message parts) per case; {d} is the bad-files directory
DATA_CASES = {
    "stray-label": (
        ["data.dataset={d}/stray.npz"],
        [
            "data.dataset=",
            "stray.npz",
            "100 classes are inferred and 89 of them have no sample",
            "data.loader.num_classes",
        ],
    ),
    "inf-in-x": (["data.dataset={d}/inf.npz"], ["inf.npz", "1 row(s) of x hold inf or nan (first: row 3"]),
    "empty-npz": (["data.dataset={d}/empty.npz"], ["empty.npz", "the dataset has no rows"]),
    "not-a-checkpoint": (
        ["teacher.checkpoint={d}/notes.pt"],
        ["teacher.checkpoint", "notes.pt is not a torch checkpoint file"],
    ),
    "missing-checkpoint": (["teacher.checkpoint={d}/nothing.pt"], ["teacher.checkpoint=", "nothing.pt: no such file"]),
    "k-above-classes": (
        ["label.representation=topk", "label.k=12", "students.losses=[topk_kl]"],
        ["label.k=12 is larger than the 10 classes of data.dataset=digits"],
    ),
    "shift-beyond-image": (
        ["views.shift=8"],
        ["views.shift=8 is not smaller than the 8x8 images of data.dataset=digits"],
    ),
    "untrusted-factory": (
        ["teacher.checkpoint={d}/evil.pt"],
        ["teacher.checkpoint=", "evil.pt", "'os:system'", "teacher.model.arch"],
    ),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_preflight_refuses(case, bad_files, tmp_path):
    overrides, needles = DATA_CASES[case]
    cfg = load_config(TINY, _overrides(tmp_path, *(o.format(d=bad_files) for o in overrides)))
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not (bad_files / "PWNED").exists()


def test_preflight_passes_a_good_config_and_a_trusted_factory(tmp_path, monkeypatch):
    preflight(load_config(TINY, _overrides(tmp_path)))
    # a teacher checkpoint built by the user's own factory: fine once the config names it
    (tmp_path / "bad_inputs_zoo.py").write_text(
        textwrap.dedent("""
        from pipeline.models.registry import small_cnn
        def net(**kw):
            return small_cnn(**kw)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = {"arch": "bad_inputs_zoo:net", "kwargs": {"channels": [4]}}
    path = tmp_path / "zoo-teacher.pt"
    save_checkpoint(
        path, build_model(arch, in_shape=(1, 8, 8), num_classes=10), arch=arch, in_shape=(1, 8, 8), num_classes=10
    )
    with pytest.raises(ConfigError, match="bad_inputs_zoo:net"):
        preflight(load_config(TINY, _overrides(tmp_path, f"teacher.checkpoint={path}")))
    preflight(
        load_config(TINY, _overrides(tmp_path, f"teacher.checkpoint={path}", "teacher.model.arch=bad_inputs_zoo:net"))
    )


def test_preflight_refuses_a_teacher_for_other_data(tmp_path):
    for shape, classes, said in (
        ((64,), 10, "expects inputs (64,), but data.dataset=digits has (1, 8, 8)"),
        ((1, 8, 8), 3, "outputs 3 classes, but data.dataset=digits has 10"),
    ):
        path = tmp_path / f"mlp-{classes}.pt"
        arch = {"arch": "mlp", "kwargs": {"width": 4}}
        save_checkpoint(
            path, build_model(arch, in_shape=shape, num_classes=classes), arch=arch, in_shape=shape, num_classes=classes
        )
        with pytest.raises(ConfigError) as e:
            preflight(load_config(TINY, _overrides(tmp_path, f"teacher.checkpoint={path}")))
        assert f"teacher.checkpoint={path} {said}" in str(e.value)


@pytest.mark.parametrize("case", sorted(DATA_CASES))
@pytest.mark.parametrize("cmd", ["run", "label"])
def test_cli_refuses_before_any_work(case, cmd, bad_files, tmp_path):
    overrides, needles = DATA_CASES[case]
    # one case per command through a new interpreter, the rest through main() in-process
    run = distill if case == "stray-label" else cli_in_process
    r = run(cmd, TINY, *_overrides(tmp_path, *(o.format(d=bad_files) for o in overrides)))
    refused(r, 2, *needles)
    assert not (tmp_path / "tiny").exists(), "work started: the run directory was created"
    assert not (bad_files / "PWNED").exists()


# ------------------------------------------------------------------ the PWNED attack through the CLI


def test_pwned_checkpoint_through_the_cli_runs_nothing(bad_files, tmp_path, prefect_server):
    # with preflight wired, refused before Prefect starts (exit 2); until then the
    # label flow's load_model refuses it (a ValueError: exit 1)
    r = distill(
        "label", TINY, *_overrides(tmp_path, f"teacher.checkpoint={bad_files / 'evil.pt'}"), env=prefect_server["env"]
    )
    refused(r, 2, "evil.pt", "'os:system'")
    assert not (bad_files / "PWNED").exists()


def test_a_teacher_from_a_factory_the_config_names_labels(tmp_path, prefect_server):
    (tmp_path / "cli_zoo.py").write_text(
        "from pipeline.models.registry import small_cnn\ndef net(**kw):\n    return small_cnn(**kw)\n"
    )
    arch = {"arch": "cli_zoo:net", "kwargs": {"channels": [4]}}
    sys.path.insert(0, str(tmp_path))
    try:
        model = build_model(arch, in_shape=(1, 8, 8), num_classes=10)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cli_zoo", None)
    path = tmp_path / "zoo-teacher.pt"
    save_checkpoint(path, model, arch=arch, in_shape=(1, 8, 8), num_classes=10)
    env = dict(prefect_server["env"], PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    r = distill(
        "label",
        TINY,
        *_overrides(tmp_path / "runs", f"teacher.checkpoint={path}", "teacher.model.arch=cli_zoo:net"),
        env=env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_multi_teacher_with_a_loss_it_does_not_define_is_refused(tmp_path):
    """students.extra_soft_labels + losses [mse] used to train KD KL silently (issue #9)."""
    from conftest import TINY

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "students",
            TINY,
            f"runs_dir={tmp_path}",
            "students.extra_soft_labels=[/tmp/other-teacher]",
            "students.losses=[kd, mse]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "students.losses ['mse'] cannot be combined with students.extra_soft_labels" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    "key, replaced_by",
    [
        ("students.train.temperature", "students.temperatures"),
        ("students.train.alpha", "students.alphas"),
        ("teacher.train.loss", "students.losses"),
    ],
)
def test_dead_training_section_keys_say_what_replaced_them(key, replaced_by):
    from conftest import TINY

    from flows.config import ConfigError, load_config

    value = "mse" if key.endswith("loss") else "0.5"
    with pytest.raises(ConfigError, match=replaced_by):
        load_config(TINY, [f"{key}={value}"])
