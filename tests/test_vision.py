"""timm and torchvision models by name, their weights from files, torchvision v2 views that
replay per (sample, view), the pixel cache of image sources and labelling with the views made
in DataLoader workers."""

import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from pipeline.models.checkpoint import load_model, save_checkpoint
from pipeline.models.registry import build_model, model_adapter, param_counts
from pipeline.views.rng import MASK63, hash_row_keys
from pipeline.views.transforms import check_deterministic, transform_from_config, transform_from_dict

STEPS = [
    {"RandomResizedCrop": {"size": [16, 16], "scale": [0.5, 1.0]}},
    {"RandomHorizontalFlip": {}},
    {"RandAugment": {"num_ops": 2, "magnitude": 9}},
]


def images(n, c=1, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).float() / 255  # 8-bit pixels in [0, 1]


# ---------------------------------------------------------------- models by name


@pytest.mark.parametrize("arch", ["timm:resnet10t", "timm:mobilenetv3_small_050", "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_models_by_name_are_classifiers(arch, channels):
    torch.manual_seed(0)
    m = build_model({"arch": arch}, in_shape=(channels, 32, 32), num_classes=7).eval()
    x = torch.rand(3, channels, 32, 32)
    with torch.no_grad():
        z, f = m(x), m.features(x)
        assert z.shape == (3, 7) and f.shape == (3, m.feature_dim)
        torch.testing.assert_close(m.head(f), z)  # the seam hint / RKD losses use
    assert model_adapter({"arch": arch}).input_kind == "dense"


def test_timm_gets_in_chans_and_torchvision_repeats_one_channel():
    t = build_model({"arch": "timm:resnet10t"}, in_shape=(1, 32, 32), num_classes=4)
    assert t.model.conv1[0].in_channels == 1  # timm's own in_chans
    v = build_model({"arch": "torchvision:resnet18"}, in_shape=(1, 32, 32), num_classes=4).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # a grey image is the RGB image with three equal channels
        torch.testing.assert_close(v(x), v.head(v.body[1](x.expand(-1, 3, -1, -1))))


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet181'.*did you mean timm:resnet18\b"):
        model_adapter({"arch": "timm:resnet181"})
    with pytest.raises(
        ValueError, match=r"unknown torchvision model 'mobilenetv3_small'.*torchvision:mobilenet_v3_small"
    ):
        build_model({"arch": "torchvision:mobilenetv3_small"}, in_shape=(3, 32, 32), num_classes=2)


def test_pretrained_and_data_keys_are_refused():
    with pytest.raises(ValueError, match=r"timm:resnet10t: pretrained weights are downloaded.*kwargs.checkpoint"):
        build_model({"arch": "timm:resnet10t", "kwargs": {"pretrained": True}}, in_shape=(3, 32, 32), num_classes=2)
    with pytest.raises(ValueError, match=r"torchvision:resnet18: pretrained"):
        build_model(
            {"arch": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, in_shape=(3, 32, 32), num_classes=2
        )
    with pytest.raises(ValueError, match=r"kwargs.in_chans comes from the data"):
        build_model({"arch": "timm:resnet10t", "kwargs": {"in_chans": 3}}, in_shape=(1, 32, 32), num_classes=2)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_weights_load_exactly(tmp_path, suffix):
    """A state dict saved from the library's own model (torch or safetensors) gives the same
    outputs; nested {"state_dict": ...} is unwrapped."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = timm.create_model("resnet10t", num_classes=5, in_chans=1).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    m = build_model(
        {"arch": "timm:resnet10t", "kwargs": {"checkpoint": str(path)}}, in_shape=(1, 32, 32), num_classes=5
    ).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x), rtol=0, atol=0)


def test_checkpoints_that_do_not_fit_are_refused_in_one_line(tmp_path):
    import timm
    import torchvision

    ten = tmp_path / "ten.pt"
    torch.save(timm.create_model("resnet10t", num_classes=10, in_chans=1).state_dict(), ten)
    kw = {"arch": "timm:resnet10t", "kwargs": {"checkpoint": str(ten)}}
    with pytest.raises(ValueError, match=r"does not fit: shapes differ: fc.weight \(10, 512\) vs \(5, 512\).*new_head"):
        build_model(kw, in_shape=(1, 32, 32), num_classes=5)
    # new_head: the body's weights, a fresh classifier
    m = build_model(
        {"arch": "timm:resnet10t", "kwargs": {"checkpoint": str(ten), "new_head": True}},
        in_shape=(1, 32, 32),
        num_classes=5,
    )
    torch.testing.assert_close(m.model.conv1[0].weight, torch.load(ten)["conv1.0.weight"])
    # another architecture altogether
    other = tmp_path / "mnv3.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=5).state_dict(), other)
    with pytest.raises(ValueError, match=r"checkpoint .*mnv3.pt.* does not fit: .*missing keys"):
        build_model(
            {"arch": "timm:resnet10t", "kwargs": {"checkpoint": str(other)}}, in_shape=(1, 32, 32), num_classes=5
        )
    # a pickle that is not plain tensors: weights_only refuses to run it
    evil = tmp_path / "evil.pt"
    torch.save({"model": nn.Linear(2, 2)}, evil)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*evil.pt.*UnpicklingError"):
        build_model(
            {"arch": "timm:resnet10t", "kwargs": {"checkpoint": str(evil)}}, in_shape=(1, 32, 32), num_classes=5
        )
    with pytest.raises(ValueError, match=r"checkpoint .*missing.pt' is not a file"):
        build_model(
            {"arch": "timm:resnet10t", "kwargs": {"checkpoint": str(tmp_path / "missing.pt")}},
            in_shape=(1, 32, 32),
            num_classes=5,
        )


def test_freezing_for_fine_tuning():
    full = param_counts(build_model({"arch": "timm:resnet10t"}, in_shape=(1, 32, 32), num_classes=3))
    probe = build_model(
        {"arch": "timm:resnet10t", "kwargs": {"train_only_head": True}}, in_shape=(1, 32, 32), num_classes=3
    )
    assert param_counts(probe)["trainable"] == 512 * 3 + 3 < full["params"]
    part = build_model(
        {"arch": "torchvision:mobilenet_v3_small", "kwargs": {"freeze_prefixes": ["body.features.0"]}},
        in_shape=(3, 32, 32),
        num_classes=3,
    )
    frozen = [n for n, p in part.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("body.features.0.") for n in frozen)
    with pytest.raises(ValueError, match=r"freeze prefix 'stem' matches no parameter"):
        build_model(
            {"arch": "timm:resnet10t", "kwargs": {"freeze_prefixes": ["stem"]}}, in_shape=(1, 32, 32), num_classes=3
        )


def test_distillery_checkpoint_round_trip(tmp_path):
    """A trained timm / torchvision student saved by distillery rebuilds by name and loads."""
    for arch in ("timm:mobilenetv3_small_050", "torchvision:mobilenet_v3_small"):
        torch.manual_seed(0)
        m = build_model({"arch": arch}, in_shape=(1, 32, 32), num_classes=4).eval()
        path = tmp_path / f"{arch.replace(':', '_')}.pt"
        save_checkpoint(str(path), m, arch={"arch": arch, "kwargs": {}}, in_shape=(1, 32, 32), num_classes=4)
        back, _ = load_model(str(path))
        x = torch.rand(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(back.eval()(x), m(x), rtol=0, atol=0)


# ---------------------------------------------------------------- torchvision views


def test_views_replay_exactly_what_the_pipeline_gives_under_the_row_seed():
    """Each (sample, view) is the v2 pipeline run on the uint8 image right after torch's
    generator is seeded from the row key: computed here independently, row by row."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    t = transform_from_config({"kind": "torchvision", "seed": 5, "steps": STEPS})
    x = images(12)
    sids, views = np.arange(100, 112), np.array([0, 1, 2, 3] * 3)
    out = t.apply(x, sids, views)
    pipe = v2.Compose(
        [
            v2.RandomResizedCrop(size=[16, 16], scale=[0.5, 1.0]),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=2, magnitude=9),
        ]
    )
    keys = hash_row_keys(5, sids, views)
    for i in range(12):
        if views[i] == 0:
            assert torch.equal(out[i], x[i])  # view 0 is the image itself
            continue
        torch.manual_seed(int(keys[i]) & MASK63)
        want = pipe(tv_tensors.Image((x[i] * 255).round().to(torch.uint8))).float() / 255
        assert torch.equal(out[i], want)
    assert (out[views > 0] != x[views > 0]).float().mean() > 0.3  # the views do change pixels


def test_views_are_deterministic_whatever_the_batch_order_or_thread():
    t = transform_from_config({"kind": "torchvision", "steps": STEPS})
    x, sids, views = images(16), np.arange(16), np.arange(16) % 4
    check_deterministic(t, x, sids, views)  # reversed, interleaved with other rows
    ref = t.apply(x, sids, views)
    # rebuilt from the manifest's dict: the same rows
    assert torch.equal(transform_from_dict(t.to_dict()).apply(x, sids, views), ref)
    # threads applying at once: the lock keeps each row's draws together
    outs = [None] * 4

    def work(j):
        for _ in range(3):
            outs[j] = t.apply(x, sids, views)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert all(torch.equal(o, ref) for o in outs)
    # the global generator is left as it was
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    t.apply(x, sids, views)
    assert torch.equal(torch.rand(3), a)


def test_view_identity_and_refusals():
    t = transform_from_config({"kind": "torchvision", "seed": 2, "steps": STEPS})
    d = t.to_dict()
    import torchvision

    assert d["kind"] == "torchvision" and d["torchvision"] == torchvision.__version__.split("+")[0]
    assert d["steps"][0] == {"RandomResizedCrop": {"size": [16, 16], "scale": [0.5, 1.0]}}
    assert transform_from_config({"kind": "torchvision", "seed": 3, "steps": STEPS}).fingerprint() != t.fingerprint()
    with pytest.raises(
        ValueError, match=r"made with torchvision 0.1.0, this is .*install torchvision==0.1.0 or relabel"
    ):
        transform_from_dict(d | {"torchvision": "0.1.0"}).apply(images(2), [0, 1], [1, 1])
    with pytest.raises(
        ValueError,
        match=r"steps\[0\] RandomCrp: .RandomCrp. is not a torchvision.transforms.v2 transform; did you mean RandomCr",
    ):
        transform_from_config({"kind": "torchvision", "steps": [{"RandomCrp": {}}]})
    with pytest.raises(ValueError, match=r"steps\[0\] ColorJitter: .*unexpected keyword argument 'brightnes'"):
        transform_from_config({"kind": "torchvision", "steps": [{"ColorJitter": {"brightnes": 0.2}}]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['torchvision'\]"):
        transform_from_config({"kind": "torchvision", "steps": STEPS, "torchvision": "0.29.1"})
    small = transform_from_config({"kind": "torchvision", "steps": [{"RandomResizedCrop": {"size": 8}}]})
    with pytest.raises(
        ValueError, match=r"sample_id 1 view 1 from shape \(1, 16, 16\) to \(1, 8, 8\).*size \[16, 16\]"
    ):
        small.apply(images(2), [0, 1], [0, 1])


def test_a_pipeline_drawing_from_elsewhere_is_caught():
    """A step drawing from Python's `random` (not the seeded generator) does not replay:
    check_deterministic (what `distill inspect --replay` relies on) names the row."""
    import random

    t = transform_from_config({"kind": "torchvision", "steps": STEPS})
    object.__setattr__(t, "_pipeline", lambda img: img.roll(random.randint(1, 15), dims=-1))
    with pytest.raises(ValueError, match=r"transform 'torchvision' is not deterministic: sample_id"):
        check_deterministic(t, images(8), np.arange(8), np.ones(8, dtype=np.int64))


# ---------------------------------------------------------------- pixel cache


def png_table(path, n=40, size=(20, 24), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pngs, labels = [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
        labels.append(int(i % 3))
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "label": labels}), path, row_group_size=16)
    return path


def test_pixel_cache_gives_the_decoded_pixels(tmp_path):
    from pipeline.data.sources import open_table_source

    table = png_table(tmp_path / "imgs.parquet")
    spec = {
        "kind": "parquet",
        "path": str(table),
        "image_column": "image",
        "label_column": "label",
        "image_size": [16, 16],
    }
    cached = open_table_source(spec | {"pixel_cache": True}, cache_dir=tmp_path / "cache")
    plain = open_table_source(spec | {"pixel_cache": False}, cache_dir=tmp_path / "cache")
    pos = np.array([5, 0, 39, 17, 17])
    assert torch.equal(cached.encode(pos), plain.encode(pos))  # PIL decode + bilinear resize, once
    sub = cached.subset(np.arange(10, 30))
    assert torch.equal(sub.encode([0, 19]), plain.encode([10, 29]))
    files = list((tmp_path / "cache").glob("*.pixels-*.npy"))
    assert len(files) == 1 and np.load(files[0], mmap_mode="r").shape == (40, 1, 16, 16)
    # reopened: reused; a damaged file: rebuilt; another size: its own file
    mtime = files[0].stat().st_mtime_ns
    open_table_source(spec, cache_dir=tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == mtime
    files[0].write_bytes(files[0].read_bytes()[:200])
    again = open_table_source(spec, cache_dir=tmp_path / "cache")
    assert torch.equal(again.encode(pos), plain.encode(pos))
    open_table_source(spec | {"image_size": [8, 8]}, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pixels-*.npy"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_pixel_cache_in_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from pipeline.data.sources import open_table_source
    from pipeline.labelling.classify import ViewBatches

    table = png_table(tmp_path / "imgs.parquet", n=64)
    spec = {"kind": "parquet", "path": str(table), "image_column": "image", "image_size": [16, 16]}
    src = open_table_source(spec, cache_dir=tmp_path / "cache")
    t = transform_from_config({"kind": "torchvision", "steps": STEPS})
    pos, views = np.repeat(np.arange(64), 2), np.tile([0, 1], 64)
    ds = ViewBatches(src, pos, views, t, 16)
    inline = torch.cat(list(DataLoader(ds, batch_size=None)))
    workers = torch.cat(list(DataLoader(ds, batch_size=None, num_workers=2)))
    assert torch.equal(inline, workers)  # pickled source maps the cache again; views replay


def test_labelling_with_view_workers_stores_the_same_logits(tmp_path):
    from pipeline.data.sources import open_table_source
    from pipeline.labelling.classify import teacher_outputs

    table = png_table(tmp_path / "imgs.parquet", n=48)
    src = open_table_source(
        {"kind": "parquet", "path": str(table), "image_column": "image", "image_size": [16, 16]},
        cache_dir=tmp_path / "cache",
    )
    torch.manual_seed(0)
    teacher = build_model({"arch": "timm:resnet10t"}, in_shape=(1, 16, 16), num_classes=3)
    t = transform_from_config({"kind": "torchvision", "steps": STEPS})
    kw = dict(start=4, stop=44, view_spec=t, num_views=3, num_classes=3, batch_size=32, device="cpu")
    a = teacher_outputs(teacher, src, **kw)
    b = teacher_outputs(teacher, src, workers=2, **kw)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    assert a[2].shape == (40 * 3, 3)


def test_hint_from_a_timm_teacher_into_a_torchvision_student(tmp_path, digits):
    """A FitNets hint across libraries: the timm teacher's pooled feature (its global_pool
    module, stored at labelling) and the torchvision student's features() (B, 1024) meet
    through the learned regressor."""
    from pipeline.labelling.classify import label_dataset
    from pipeline.training.config import TrainConfig
    from pipeline.training.loop import train

    tr = digits["train"]
    torch.manual_seed(0)
    teacher = build_model({"arch": "timm:resnet10t"}, in_shape=(1, 8, 8), num_classes=10)
    uri = str(tmp_path / "feat")
    meta = {"teacher": {"name": "t", "fingerprint": "sha256:t"}, "shard_size": 150}
    label_dataset(teacher, tr, uri, temperature=2.0, feature_layer="model.global_pool", **meta)
    torch.manual_seed(0)
    s = build_model({"arch": "torchvision:mobilenet_v3_small"}, in_shape=(1, 8, 8), num_classes=10)
    cfg = TrainConfig(epochs=1, batch_size=50, lr=1e-3, device="cpu", loss="kd", hint_weight=1.0)
    cfg.ckpt_path = str(tmp_path / "ck.pt")
    seen = []
    res = train(s, cfg, train_data=tr, labels=uri, on_batch=lambda e, b: seen.append(tuple(b["teacher_feature"].shape)))
    assert res["epochs_run"] == 1 and seen and all(shape == (50, 512) for shape in seen)
    ck = torch.load(cfg.ckpt_path, weights_only=False)
    assert ck["hint"]["regressor.weight"].shape == (512, 1024)  # student 1024 -> teacher 512
