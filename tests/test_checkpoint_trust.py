"""A checkpoint is data: loading one from elsewhere must not run code it names.

torch.load(weights_only=True) already refuses pickled objects; the remaining hole was the
checkpoint's `arch`, an import path "pkg.mod:factory" that build_model imports and calls.
These tests write real checkpoint files with torch.save and load them back."""

import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.models.checkpoint import FORMAT, VERSION, checkpoint_info, load_checkpoint, load_model, save_checkpoint
from pipeline.models.registry import UntrustedFactoryError, build_model


def _crafted(path, arch: dict, **extra):
    """A checkpoint as an attacker would write it: valid format, any arch."""
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "arch": arch,
            "in_shape": [4],
            "num_classes": 2,
            "state_dict": {},
            "metadata": {},
            **extra,
        },
        path,
    )
    return path


def test_pwned_checkpoint_is_refused_and_runs_nothing(tmp_path):
    pwned = tmp_path / "PWNED"
    evil = _crafted(tmp_path / "teacher.pt", {"arch": "os:system", "kwargs": {"command": f"touch {pwned}"}})
    with pytest.raises(UntrustedFactoryError) as e:
        load_model(evil)
    msg = str(e.value)
    assert str(evil) in msg and "'os:system'" in msg and "trusted_factories" in msg and "teacher.model.arch" in msg
    assert not pwned.exists()
    # trusting some other factory does not trust this one
    with pytest.raises(UntrustedFactoryError):
        load_model(evil, trusted_factories={"my_zoo:net"})
    assert not pwned.exists()
    # the metadata can still be read: nothing is built
    assert checkpoint_info(evil)["arch"]["arch"] == "os:system"
    assert not pwned.exists()


def test_refused_before_the_module_is_imported(tmp_path, monkeypatch):
    # importing a module runs its top level: the refusal must come before the import
    marker = tmp_path / "imported"
    (tmp_path / "evil_zoo_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef net(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _crafted(tmp_path / "m.pt", {"arch": "evil_zoo_mod:net", "kwargs": {}})
    with pytest.raises(UntrustedFactoryError, match="evil_zoo_mod:net"):
        load_model(path)
    with pytest.raises(UntrustedFactoryError):
        build_model({"arch": "evil_zoo_mod:net"}, trusted_factories=())
    assert not marker.exists() and "evil_zoo_mod" not in sys.modules


@pytest.fixture
def user_zoo(tmp_path, monkeypatch):
    (tmp_path / "user_zoo_mod.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn
        from pipeline.models.registry import Classifier

        def small(*, in_shape, num_classes, hidden: int = 3):
            body = nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0], hidden))
            return Classifier(body, nn.Linear(hidden, num_classes))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_zoo_mod:small"
    sys.modules.pop("user_zoo_mod", None)


def test_user_factory_loads_when_trusted(tmp_path, user_zoo):
    torch.manual_seed(0)
    arch = {"arch": user_zoo, "kwargs": {"hidden": 5}}
    model = build_model(arch, in_shape=(4,), num_classes=2)  # the user's own config: trusted
    path = tmp_path / "zoo.pt"
    save_checkpoint(path, model, arch=arch, in_shape=(4,), num_classes=2)
    with pytest.raises(UntrustedFactoryError, match=user_zoo):
        load_model(path)  # safe by default
    x = torch.rand(3, 4)
    for kw in ({"trusted_factories": {user_zoo}}, {"trust_code": True}):
        loaded, meta = load_model(path, **kw)
        assert torch.equal(loaded(x), model.eval()(x)) and meta["arch"] == arch


def test_builtin_archs_load_from_any_file(tmp_path):
    torch.manual_seed(0)
    for arch, shape in (
        ({"arch": "mlp", "kwargs": {"width": 8}}, (4,)),
        ({"arch": "cnn", "kwargs": {"channels": [4]}}, (1, 8, 8)),
        ({"arch": "resnet", "kwargs": {"width": 4, "blocks": [1]}}, (1, 8, 8)),
    ):
        model = build_model(arch, in_shape=shape, num_classes=3)
        path = tmp_path / f"{arch['arch']}.pt"
        save_checkpoint(path, model, arch=arch, in_shape=shape, num_classes=3)
        loaded, meta = load_model(path)  # no trust needed
        x = torch.rand(2, *shape)
        assert torch.equal(loaded(x), model.eval()(x)) and meta["arch"] == arch


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    npz = tmp_path / "data.pt"  # a zip file, but not torch's: inline_container.cc before
    with open(npz, "wb") as f:
        np.savez(f, x=np.zeros(3))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (text, npz, empty):
        with pytest.raises(ValueError, match=rf"{path} is not a torch checkpoint file"):
            load_model(path)
    # a pickle naming a function (the classic attack) is refused by weights_only, said plainly
    obj = tmp_path / "obj.pt"
    torch.save({"format": FORMAT, "payload": print}, obj)
    with pytest.raises(ValueError, match=rf"{obj}: refused: the file pickles print, an object other than tensors"):
        load_checkpoint(obj)
    # a torch file of another kind, and one that lacks parts
    other = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="is not a distillery model checkpoint"):
        load_model(other)
    partial = tmp_path / "partial.pt"
    torch.save({"format": FORMAT, "version": VERSION, "arch": {"arch": "mlp"}}, partial)
    with pytest.raises(ValueError, match=r"checkpoint lacks \['in_shape', 'num_classes', 'state_dict', 'metadata'\]"):
        load_model(partial)
