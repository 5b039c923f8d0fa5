"""Model checkpoints, fingerprints, teacher training and fine-tuning with frozen layers."""

import numpy as np
import pytest
import torch

from pipeline.data.datasets import ArrayDataset
from pipeline.models.checkpoint import fingerprint, load_checkpoint, load_model, save_checkpoint
from pipeline.models.freezing import freeze_by_prefix
from pipeline.models.registry import build_model
from pipeline.training.config import TrainConfig
from pipeline.training.teacher import finetune, train_teacher
from pipeline.views.images import ViewSpec

CNN = {"arch": "cnn", "kwargs": {"channels": [8, 16]}}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fingerprint_stable_and_sensitive(tmp_path):
    torch.manual_seed(0)
    model = build_model(CNN, in_shape=(1, 8, 8), num_classes=10)
    fp = fingerprint(model.state_dict())
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint({k: v.clone() for k, v in reversed(model.state_dict().items())}) == fp  # order-free
    meta = save_checkpoint(
        tmp_path / "m.pt",
        model,
        arch=CNN,
        in_shape=(1, 8, 8),
        num_classes=10,
        metadata={"data": {"fingerprint": "abc"}, "metrics": {"acc": 0.5}},
    )
    assert meta["fingerprint"] == fp and "created_at" in meta
    loaded, lmeta = load_model(tmp_path / "m.pt")
    assert fingerprint(loaded.state_dict()) == fp and lmeta["fingerprint"] == fp
    assert lmeta["arch"] == CNN and lmeta["in_shape"] == [1, 8, 8] and lmeta["metrics"] == {"acc": 0.5}
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    # one changed weight, a changed dtype, or a renamed tensor change the fingerprint
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["head.bias"][0] += 1e-6
    assert fingerprint(sd) != fp
    sd = dict(model.state_dict(), **{"head.bias": model.state_dict()["head.bias"].double()})
    assert fingerprint(sd) != fp
    sd = {("x" + k if k == "head.bias" else k): v for k, v in model.state_dict().items()}
    assert fingerprint(sd) != fp
    # tampering with the stored weights is detected on load
    payload = load_checkpoint(tmp_path / "m.pt")
    payload["state_dict"]["head.bias"] += 1.0
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match the recorded"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def test_train_teacher_checkpoint_metadata_and_resume(digits, tmp_path):
    tr, va = digits["train"], digits["val"]
    cfg = TrainConfig(epochs=5, batch_size=32, lr=1e-2, device="cpu")
    out = str(tmp_path / "teacher.pt")
    spec = ViewSpec(shift=1, seed=2)
    model, meta = train_teacher(CNN, tr, va, cfg=cfg, out_path=out, transform=spec)
    assert meta["role"] == "teacher" and meta["data"]["fingerprint"] == tr.fingerprint()
    assert meta["view_spec"] == spec.to_dict() and meta["metrics"]["epochs_run"] == 5
    assert meta["metrics"]["val"] == meta["metrics"]["best_val"] > 0.5  # the saved weights are the best
    assert meta["fingerprint"] == fingerprint(model.state_dict())
    loaded, lmeta = load_model(out)
    assert lmeta["fingerprint"] == meta["fingerprint"] and lmeta["data"] == meta["data"]
    # resume: the run is complete, so the same weights come back without training
    again, meta2 = train_teacher(CNN, tr, va, cfg=cfg, out_path=out, transform=spec, resume=True)
    assert meta2["fingerprint"] == meta["fingerprint"]
    # same seed, fresh run: identical weights (deterministic on CPU)
    _, meta3 = train_teacher(CNN, tr, va, cfg=cfg, out_path=str(tmp_path / "t2.pt"), transform=spec)
    assert meta3["fingerprint"] == meta["fingerprint"]


def test_finetune_freeze_body(digits, tmp_path):
    tr, va = digits["train"], digits["val"]
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-2, device="cpu")
    src, src_meta = train_teacher(CNN, tr, va, cfg=cfg, out_path=str(tmp_path / "src.pt"))
    before = {k: v.clone() for k, v in src.state_dict().items()}
    # transfer to a 5-class task (digits 0-4 of the val split): new head, frozen body
    keep = va.y < 5
    small = ArrayDataset("digits0-4", va.x[keep], va.y[keep], va.sample_ids[keep], 5)
    model, meta = finetune(
        str(tmp_path / "src.pt"),
        small,
        cfg=TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu"),
        out_path=str(tmp_path / "ft.pt"),
        freeze=["body"],
    )
    assert meta["parent"]["fingerprint"] == src_meta["fingerprint"] and meta["frozen"] == ["body"]
    assert model.head.out_features == 5
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("body.")), name
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("body."):  # weights AND BatchNorm running stats unchanged
            assert torch.equal(v, after[k]), k
    assert not torch.equal(model.head.weight, torch.zeros_like(model.head.weight))
    loaded, lmeta = load_model(str(tmp_path / "ft.pt"))
    assert lmeta["num_classes"] == 5 and torch.equal(loaded.head.weight, model.head.weight)
    # unfrozen fine-tune changes the body
    model2, _ = finetune(
        str(tmp_path / "src.pt"),
        small,
        cfg=TrainConfig(epochs=1, batch_size=16, lr=0.05, device="cpu"),
        out_path=str(tmp_path / "ft2.pt"),
    )
    assert not torch.equal(model2.state_dict()["body.0.weight"], before["body.0.weight"])
    with pytest.raises(ValueError, match="freeze prefix 'bod' matches no parameter"):
        freeze_by_prefix(build_model(CNN, in_shape=(1, 8, 8), num_classes=10), ["bod"])


def test_head_trains_with_frozen_body(digits, tmp_path):
    # a linear probe on a frozen body still learns: head weights move
    tr, va = digits["train"], digits["val"]
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-2, device="cpu")
    src, _ = train_teacher(CNN, tr, None, cfg=cfg, out_path=str(tmp_path / "src.pt"))
    head0 = src.head.weight.detach().clone()
    model, meta = finetune(
        str(tmp_path / "src.pt"), tr, va, cfg=cfg, out_path=str(tmp_path / "probe.pt"), freeze=["body"]
    )
    assert not torch.equal(model.head.weight, head0) and meta["num_frozen_params"] > 0
    assert np.isfinite(meta["metrics"]["val"])
