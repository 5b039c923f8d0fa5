"""configs/vision.yaml's design end to end on its real data (Animal-MNIST PNGs in a Parquet
table, 28x28 upsampled to 32): a timm ResNet teacher, torchvision v2 views labelled once in a
DataLoader worker, timm and torchvision MobileNetV3 students next to their baselines,
`distill inspect --replay` on the stored crops, and one-line refusals of bad input."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_in_process

import storage

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMALS = os.path.join(ROOT, ".assets", "animal_mnist.parquet")


def vision_config(tmp_path, **over):
    """The recipe's config with its sizes cut down (a few hundred images, 1-3 epochs)."""
    with open(os.path.join(ROOT, "configs", "vision.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["runs_dir"] = str(tmp_path / "runs")
    cfg["data"]["source"]["path"] = ANIMALS
    cfg["data"]["sizes"] = {"train": 120, "transfer": 160, "val": 60, "test": 200}
    cfg["views"]["num_views"] = 3
    cfg["teacher"]["train"] |= {"epochs": 12, "batch_size": 16}  # BatchNorm needs ~100 steps
    cfg["label"] |= {"shard_size": 80, "batch_size": 128}
    cfg["students"]["train"] |= {"epochs": 1, "batch_size": 64}
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / "vision.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    if not os.path.exists(ANIMALS):
        from flows.assets import fetch_animals

        fetch_animals(os.path.dirname(ANIMALS), quiet=True)
    from flows.flows import distill_flow

    tmp = tmp_path_factory.mktemp("vision")
    path = vision_config(tmp)
    report = distill_flow(str(path), [])
    return {"tmp": tmp, "config": path, "report": report}


def test_vision_recipe_end_to_end(vision_run):
    from flows.config import load_config

    cfg = load_config(vision_run["config"])
    rep = json.loads((cfg.run_dir() / "report.json").read_text())
    assert rep["teacher"]["arch"]["arch"] == "timm:resnet10t"
    names = sorted(s["name"] for s in rep["students"])
    assert names == [
        "mobilenetv3-050-T4-a0-kd",
        "mobilenetv3-050-baseline",
        "tv-mobilenet-v3-small-T4-a0-kd",
        "tv-mobilenet-v3-small-baseline",
    ]
    for s in rep["students"]:
        assert 0.0 <= s["accuracy"] <= 1.0 and os.path.exists(s["checkpoint"])
    # 10 classes were learnt by the teacher from 120 labelled images: better than chance
    assert rep["teacher"]["accuracy"] > 0.2
    m = storage.open_soft_labels(cfg.soft_label_uri(), verify=True).manifest
    assert m["num_samples"] == 160 and m["num_views"] == 3 and m["num_classes"] == 10
    t = m["data"]["transform"]
    import torchvision

    assert t["kind"] == "torchvision" and t["torchvision"] == torchvision.__version__.split("+")[0]
    assert list(t["steps"][0]) == ["RandomResizedCrop"]
    assert m["data"]["inputs"]["image"]["size"] == [32, 32] and m["data"]["inputs"]["in_shape"] == [1, 32, 32]


def test_replay_recomputes_the_stored_crops(vision_run, capsys):
    from flows.cli import main
    from flows.config import load_config

    cfg = load_config(vision_run["config"])
    assert main(["inspect", cfg.soft_label_uri(), "--replay", "12"]) == 0
    out = capsys.readouterr().out
    assert "12 rows recomputed" in out and ": match" in out
    assert main(["inspect", cfg.soft_label_uri()]) == 0
    out = capsys.readouterr().out  # the pipeline the crops replay through, and its version
    assert "views torchvision 0.29" in out and "(RandomResizedCrop -> RandomHorizontalFlip -> RandAugment" in out


def test_bad_vision_input_is_one_line_and_writes_nothing(vision_run, tmp_path):
    path = vision_config(tmp_path)
    runs = tmp_path / "runs"
    cases = [
        ('teacher.model.arch="timm:resnet10"', "unknown timm model 'resnet10'"),
        (
            'students.models=[{name: s, arch: "torchvision:mobilenet_v3_smal"}]',
            "did you mean torchvision:mobilenet_v3_small",
        ),
        ("teacher.model.kwargs={pretrained: true}", "pretrained weights are downloaded"),
        ("views.transform.steps=[{RandomCrp: {}}]", "'RandomCrp' is not a torchvision.transforms.v2 transform"),
        ("views.transform.steps=[{RandomResizedCrop: {size: 20}}]", "views keep the image's shape"),
        ("students.max_parallel=2", "set students.max_parallel: 1"),
    ]
    for override, want in cases:
        r = cli_in_process("label", str(path), override)
        err = r.stderr.strip()
        assert r.returncode != 0 and want in err, (override, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (runs / "vision" / "soft_labels").exists() and not (runs / "vision" / "teacher.pt").exists()


def test_a_checkpoint_for_another_class_count_is_refused(vision_run, tmp_path):
    import timm
    import torch

    ckpt = tmp_path / "imagenet-like.pt"
    torch.save(timm.create_model("resnet10t", num_classes=1000, in_chans=1).state_dict(), ckpt)
    path = vision_config(tmp_path)
    r = cli_in_process("label", str(path), f"teacher.model.kwargs={{checkpoint: {ckpt}}}")
    err = r.stderr.strip()
    assert r.returncode != 0 and "fc.weight (1000, 512) vs (10, 512)" in err and "new_head" in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "runs" / "vision" / "teacher.pt").exists()


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    t = pq.read_table(ANIMALS).slice(0, 600)
    images = t.column("image").to_pylist()
    images[7] = b"\x89PNG not really"
    bad = tmp_path / "animals.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), bad)
    path = vision_config(tmp_path)
    r = cli_in_process("label", str(path), f"data.source.path={bad}")
    err = r.stderr.strip()
    sid = t.column("id")[7].as_py()
    assert r.returncode != 0 and f"image of sample_id {sid}" in err and "cannot decode" in err, err
    assert len(err.splitlines()) == 1


def test_public_api_replays_the_views_and_trains_a_timm_student(vision_run):
    """A user's own loop: the stored labels joined to the images by sample id, the stored
    torchvision views replayed with distillery.views_of (the teacher gives the stored logits
    on them), and a timm student built by name learning from them with distill_loss."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import distillery
    from flows import inputs
    from flows.config import load_config
    from pipeline.models.checkpoint import load_model

    cfg = load_config(vision_run["config"])
    labels = distillery.open_labels(cfg.soft_label_uri())
    src = inputs.splits(cfg)["transfer"]
    x = src.encode(np.arange(len(src)))  # (N, 1, 32, 32): the images, un-augmented
    ids, views = np.repeat(src.sample_ids, 3), np.tile([0, 1, 2], len(src))
    data = distillery.StoredLabels(labels, TensorDataset(x.repeat_interleave(3, 0)), sample_ids=ids, views=views)
    t = distillery.views_of(labels)
    assert t.to_dict()["kind"] == "torchvision"
    # the teacher on the replayed views gives the stored labels (float16 z/T)
    teacher, _ = load_model(cfg.teacher_path())
    rows = np.arange(0, 60, 7)
    xv = t.apply(x.repeat_interleave(3, 0)[rows], ids[rows], views[rows])
    with torch.no_grad():
        z = teacher.eval()(xv) / labels.manifest["temperature"]
    stored = torch.stack([data[int(i)][1]["stored_logits"] for i in rows]).float()
    torch.testing.assert_close(z, stored, atol=2e-2, rtol=1e-2)
    # a student by name, trained a few steps on the replayed views
    torch.manual_seed(0)
    student = distillery.build_model({"arch": "timm:mobilenetv3_small_050"}, in_shape=(1, 32, 32), num_classes=10)
    opt = torch.optim.AdamW(student.parameters(), 3e-3)
    loader = DataLoader(range(len(data)), batch_size=48, shuffle=True, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        for idx in loader:
            (xb,), target = torch.utils.data.default_collate(data.__getitems__(idx.tolist()))
            assert torch.equal(target["sample_id"], torch.from_numpy(ids[idx]))
            xb = t.apply(xb, target["sample_id"], target["view"])
            loss = distillery.distill_loss(student(xb), target, labels=labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
