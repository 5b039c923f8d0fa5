"""Export and int8 compression of real (briefly trained) models on the digits data."""

import io

import pytest
import torch
import torch.nn as nn

from pipeline.data.datasets import load_digits8, split_dataset
from pipeline.models.export import (
    compression_report,
    export_safetensors,
    export_torchscript,
    load_safetensors,
    quantize_dynamic_int8,
)
from pipeline.models.registry import build_model

IN_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def data():
    s = split_dataset(load_digits8(), seed=0, sizes={"train": 1400, "test": 397})
    return s["train"].tensors(), s["test"].tensors()


@pytest.fixture(scope="module")
def trained_mlp(data):
    (_, x, y), _ = data
    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "kwargs": {"width": 64, "depth": 2}}, in_shape=IN_SHAPE, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # full batch, well under a second on CPU
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def cnn():
    torch.manual_seed(1)
    return build_model({"arch": "cnn", "kwargs": {"channels": [8, 16]}}, in_shape=IN_SHAPE, num_classes=10).eval()


def size_of(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_safetensors_round_trip_is_exact(tmp_path, trained_mlp, data, make):
    model = trained_mlp if make == "mlp" else cnn()
    x = data[1][1][:64]
    path = tmp_path / "m.safetensors"
    assert export_safetensors(model, str(path)) == path.stat().st_size > 0
    torch.manual_seed(123)  # a differently initialised copy of the same architecture
    kw = {"width": 64, "depth": 2} if make == "mlp" else {"channels": [8, 16]}
    fresh = build_model({"arch": make, "kwargs": kw}, in_shape=IN_SHAPE, num_classes=10).eval()
    assert load_safetensors(fresh, str(path)) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    wrong = build_model({"arch": "mlp", "kwargs": {"width": 16}}, in_shape=IN_SHAPE, num_classes=10)
    with pytest.raises(ValueError, match="does not fit"):
        load_safetensors(wrong, str(path))
    with pytest.raises(FileNotFoundError):
        load_safetensors(fresh, str(tmp_path / "missing.safetensors"))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_torchscript_reload_gives_same_outputs(tmp_path, trained_mlp, data, make):
    model = trained_mlp if make == "mlp" else cnn()
    x = data[1][1][:32]
    path = tmp_path / "m.pt"
    loaded = export_torchscript(model, str(path), x)
    again = torch.jit.load(str(path))
    other = data[1][1][32:96]  # a different batch size than the trace
    with torch.no_grad():
        torch.testing.assert_close(again(other), model(other), rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


def test_int8_mlp_is_smaller_and_about_as_accurate(trained_mlp, data):
    _, (_, x, y) = data
    q = quantize_dynamic_int8(trained_mlp)
    assert q is not trained_mlp and not any(type(m) is nn.Linear for m in q.modules())
    assert size_of(q) < size_of(trained_mlp) / 2.5
    with torch.no_grad():
        acc32 = (trained_mlp(x).argmax(1) == y).float().mean().item()
        acc8 = (q(x).argmax(1) == y).float().mean().item()
        diff = (q(x) - trained_mlp(x)).abs().max().item()
    assert acc32 > 0.85, acc32  # it did learn something
    assert abs(acc32 - acc8) < 0.03 and diff < 0.5, (acc32, acc8, diff)


def test_int8_cnn_quantizes_only_linear(data):
    model = cnn()
    q = quantize_dynamic_int8(model)
    assert isinstance(q.body[0], nn.Conv2d)  # convs stay float
    assert type(q.head) is not nn.Linear  # head is quantized
    x = data[1][1][:16]
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=0, atol=0.1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_dynamic_int8(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_compression_report(trained_mlp, data):
    _, (_, x, y) = data
    r = compression_report(trained_mlp, x.numpy(), y.numpy(), in_shape=IN_SHAPE, repeats=5)
    for name in ("fp32", "int8"):
        assert set(r[name]) == {"accuracy", "size_bytes", "latency_ms"}
        assert all(v > 0 for v in r[name].values()), r
    assert r["safetensors_bytes"] > 0 and r["params"] > 0
    assert r["int8"]["size_bytes"] < r["fp32"]["size_bytes"] and 0 < r["size_ratio"] < 0.5
    assert abs(r["accuracy_drop"]) < 0.03
    assert trained_mlp.head.weight.dtype == torch.float32  # the caller's model is untouched
