"""One recipe, other data by changing the source section only: the same `distill run`
on a folder of image files, on image bytes in a Parquet table and on a saved Hugging Face
dataset (text), each to a complete report with verified labels."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from _tiny_hf import tiny_encoder
from PIL import Image

import storage

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _digit_png(rng, cls: int, size: int = 12) -> Image.Image:
    """A bright bar at a class-dependent row, plus noise: learnable, and not one pixel pattern."""
    a = (rng.random((size, size)) * 60).astype(np.uint8)
    a[2 + 3 * cls : 4 + 3 * cls, 1:-1] = 230
    return Image.fromarray(a, mode="L")


def image_folder(root, n_per_class=60, classes=("bar0", "bar1", "bar2")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n_per_class):
            _digit_png(rng, c).save(d / f"{i:03d}.png")
    return root


def image_table(path, n_per_class=60):
    import io

    rng = np.random.default_rng(1)
    rows, labels = [], []
    for c in range(3):
        for _ in range(n_per_class):
            buf = io.BytesIO()
            _digit_png(rng, c).save(buf, format="PNG")
            rows.append(buf.getvalue())
            labels.append(c)
    pq.write_table(pa.table({"png": pa.array(rows, pa.binary()), "label": labels}), path)
    return path


IMAGE_RECIPE = {
    "views": {"num_views": 2, "shift": 1, "seed": 0},
    "teacher": {
        "model": {"name": "cnn", "arch": "cnn", "kwargs": {"channels": [8, 16]}},
        "train": {"epochs": 4, "lr": 0.01, "batch_size": 32, "device": "cpu"},
    },
    "students": {
        "models": [{"name": "mlp", "arch": "mlp", "kwargs": {"width": 16, "depth": 1}}],
        "temperatures": [2.0],
        "alphas": [0.0],
        "losses": ["kd"],
        "baseline": True,
        "train": {"epochs": 2, "lr": 0.01, "batch_size": 32, "device": "cpu"},
    },
}


def _run(tmp_path, name, data, rest):
    from flows.flows import distill_flow

    cfg = {
        "name": name,
        "runs_dir": str(tmp_path / "runs"),
        "data": data,
        "label": {
            "shard_size": 60,
            "device": "cpu",
            "temperature": 2.0,
            "runner": {"kind": "thread", "max_workers": 1},
        },
        **rest,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    distill_flow(str(path), [])
    run = tmp_path / "runs" / name
    report = json.loads((run / "report.json").read_text())
    m = storage.open_soft_labels(str(run / "soft_labels"), verify=True).manifest
    return report, m


SIZES = {"train": 45, "transfer": 90, "val": 15, "test": 30}


def test_image_folder_source(tmp_path):
    folder = image_folder(tmp_path / "images")
    report, m = _run(
        tmp_path,
        "folder",
        {
            "source": {"kind": "image_folder", "path": str(folder), "image_size": [12, 12], "channels": 1},
            "sizes": SIZES,
            "label_split": "transfer",
        },
        IMAGE_RECIPE,
    )
    assert m["num_samples"] == 90 and m["num_classes"] == 3 and m["data"]["inputs"]["kind"] == "dense"
    assert report["teacher"]["accuracy"] > 0.6  # the bar's row is easy to see
    assert sorted(s["name"] for s in report["students"]) == ["mlp-T2-a0-kd", "mlp-baseline"]


def test_image_bytes_in_a_table(tmp_path):
    table = image_table(tmp_path / "images.parquet")
    report, m = _run(
        tmp_path,
        "bytes",
        {
            "source": {
                "kind": "parquet",
                "path": str(table),
                "image_column": "png",
                "label_column": "label",
                "image_size": [12, 12],
                "channels": 1,
            },
            "sizes": SIZES,
            "label_split": "transfer",
        },
        IMAGE_RECIPE,
    )
    assert m["num_samples"] == 90 and report["teacher"]["accuracy"] > 0.6


def test_saved_hf_dataset_source(tmp_path):
    import datasets

    enc = tiny_encoder(tmp_path / "enc")
    rng = np.random.default_rng(0)
    pos, neg = ["love", "great", "perfect", "soft"], ["hate", "poor", "cheap", "ugly"]
    label = rng.integers(0, 2, 240)
    text = [" ".join(rng.choice(pos if y else neg, 3)) + " the dress" for y in label]
    datasets.Dataset.from_dict({"text": text, "label": label.tolist()}).save_to_disk(str(tmp_path / "hf"))
    rest = {
        "views": {"num_views": 1},
        "teacher": {
            "model": {"arch": "hf-encoder", "kwargs": {"path": str(enc), "freeze_embeddings": True}},
            "train": {"epochs": 3, "lr": 0.005, "batch_size": 16, "device": "cpu"},
        },
        "students": {
            "models": [{"name": "bag", "arch": "bag", "kwargs": {"dim": 16, "hidden": 16}}],
            "temperatures": [2.0],
            "alphas": [0.0],
            "losses": ["kd"],
            "baseline": True,
            "train": {"epochs": 2, "lr": 0.01, "batch_size": 32, "device": "cpu"},
        },
    }
    report, m = _run(
        tmp_path,
        "hfdisk",
        {
            "source": {"kind": "hf_disk", "path": str(tmp_path / "hf"), "text_column": "text", "label_column": "label"},
            "tokenizer": {"path": str(enc), "max_length": 12},
            "sizes": {"train": 60, "transfer": 120, "val": 20, "test": 40},
            "label_split": "transfer",
        },
        rest,
    )
    assert m["num_samples"] == 120 and m["data"]["inputs"]["kind"] == "tokens"
    assert len(report["students"]) == 2
