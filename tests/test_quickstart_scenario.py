"""The quickstart's scenario (scarce labels, a large unlabelled transfer set) end to end on
the tiny config, and the shipped quickstart config itself."""

import json
import math
import struct

import numpy as np
import pytest
from conftest import TINY

import storage
from flows.config import load_config

pytestmark = pytest.mark.usefixtures("prefect_harness")

# tiny, but as the quickstart: 200 labelled images, 600 for the teacher to label
SCARCE = [
    "name=scarce",
    "data.sizes={train: 200, transfer: 600, val: 200, test: 300}",
    "data.label_split=transfer",
    "students.alphas=[0.0]",
    "students.quantize=false",
    "students.export=false",
]


@pytest.fixture(scope="module")
def scarce_run(tmp_path_factory):
    from flows.flows import distill_flow

    overrides = [f"runs_dir={tmp_path_factory.mktemp('runs')}", *SCARCE]
    return {"report": distill_flow(TINY, overrides), "cfg": load_config(TINY, overrides)}


def test_teacher_labels_the_transfer_set_and_students_learn_from_it(scarce_run):
    from flows.inputs import splits

    cfg, report = scarce_run["cfg"], scarce_run["report"]
    s = splits(cfg)
    ds = storage.open_soft_labels(cfg.soft_label_uri())
    ids = np.unique(np.concatenate([b["sample_id"] for b in ds.iter_batches(4096, shuffle=False)]))
    # the stored labels are exactly the transfer images, none of the labelled, val or test ones
    assert np.array_equal(ids, np.sort(s["transfer"].sample_ids)) and ds.manifest["num_views"] == 2
    assert ds.manifest["data"]["fingerprint"] == s["transfer"].fingerprint()
    assert report["data"] == {
        "labelled_split": "train",
        "labelled": 200,
        "label_split": "transfer",
        "label_samples": 600,
        "views": 2,
        "unit": "images",
        "eval_split": "test",
        "seeds": 1,
        "alphas": [0.0],
    }
    assert [x["name"] for x in report["students"]] == [
        "mlp-16-baseline",
        "mlp-16-T3-a0-kd",
        "mlp-32-baseline",
        "mlp-32-T3-a0-kd",
    ]


def test_baselines_get_the_same_number_of_steps_on_the_labelled_subset(scarce_run):
    cfg, report = scarce_run["cfg"], scarce_run["report"]
    B = cfg.students.train.batch_size
    stored = cfg.students.train.epochs * math.ceil(600 * 2 / B)  # every view of every transfer image
    hard_epoch = math.ceil(200 / B)  # the 200 labelled images once
    for st in report["students"]:
        if st["mode"] == "stored":
            assert st["steps"] == stored
        else:  # 3.6x the epochs of a stored student: as many steps as whole epochs allow
            assert abs(st["steps"] - stored) <= hard_epoch // 2 + 1 and st["steps"] % hard_epoch == 0
    log = cfg.run_dir() / "students" / "mlp-16-baseline.jsonl"
    epochs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert len(epochs) == round(stored / hard_epoch)
    # validation (which picks the best weights) about as often as for a stored student
    assert sum(e["val"] is not None for e in epochs) <= cfg.students.train.epochs + 1


def test_students_chart_is_a_png_beside_report_json_and_inline_in_the_artifact(scarce_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg, report = scarce_run["cfg"], scarce_run["report"]
    png = cfg.run_dir() / "students.png"
    on_disk = json.loads((cfg.run_dir() / "report.json").read_text())
    assert on_disk["chart"] == report["chart"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (600, 400)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["scarce-students-chart"]))
        )
    import base64

    # an image artifact: the UI renders its URL as a picture (its markdown drops data: URLs)
    assert arts[0].type == "image" and arts[0].data == "data:image/png;base64," + base64.b64encode(data).decode()
    assert len(arts[0].data) < 100_000


def test_quickstart_config_is_the_scarce_label_scenario():
    from flows.inputs import splits
    from flows.recipes import student_runs
    from pipeline.training.student import baseline_epochs

    cfg = load_config("configs/quickstart.yaml")
    s = splits(cfg)
    n_lab, n_tr, V = len(s["train"]), len(s[cfg.data.label_split]), cfg.views.num_views
    assert cfg.data.label_split == "transfer" and 300 <= n_lab <= 600 and n_tr >= 5 * n_lab
    assert cfg.students.alphas == [0.0]  # distilled students never see the transfer set's hard labels
    assert {r["loss"] for r in student_runs(cfg)} == {"ce", "kd"}
    B = cfg.students.train.batch_size
    stored = cfg.students.train.epochs * math.ceil(n_tr * V / B)
    fair = baseline_epochs(
        cfg.students.train.epochs, label_samples=n_tr, num_views=V, labelled_samples=n_lab, batch_size=B
    )
    assert abs(fair * math.ceil(n_lab / B) - stored) <= math.ceil(n_lab / B)
