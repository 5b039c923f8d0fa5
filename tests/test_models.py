import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from pipeline.models.registry import (
    ARCHS,
    Classifier,
    ModelAdapter,
    ModelSpec,
    UntrustedFactoryError,
    build_model,
    mlp,
    model_adapter,
    model_stats,
    resnet_cnn,
    small_cnn,
)

IMAGE_SHAPES = [(1, 28, 28), (1, 8, 8)]


@pytest.mark.parametrize("in_shape", IMAGE_SHAPES + [(64,)])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shapes_and_features(arch, in_shape):
    torch.manual_seed(0)
    if arch != "mlp" and len(in_shape) == 1:
        with pytest.raises(ValueError, match=r"needs image input in_shape=\(C, H, W\), found \(64,\)"):
            build_model({"arch": arch}, in_shape=in_shape, num_classes=10)
        return
    model = build_model({"arch": arch, "kwargs": {}}, in_shape=in_shape, num_classes=10)
    assert isinstance(model, Classifier) and isinstance(model.head, nn.Linear)
    model.eval()
    x = torch.rand(3, *in_shape)
    logits = model(x)
    feats = model.features(x)
    assert logits.shape == (3, 10)
    assert feats.shape == (3, model.feature_dim)
    assert torch.equal(model.head(feats), logits)


def test_feature_dims():
    assert small_cnn(in_shape=(1, 28, 28), num_classes=10).feature_dim == 64 * 7 * 7
    assert small_cnn(in_shape=(1, 8, 8), num_classes=10, channels=(8, 8, 8)).feature_dim == 8
    assert resnet_cnn(in_shape=(1, 8, 8), num_classes=10, width=16, blocks=(2, 1)).feature_dim == 32
    assert mlp(in_shape=(64,), num_classes=3, depth=0).feature_dim == 64
    with pytest.raises(ValueError, match="4 pooling stages are too many for input"):
        small_cnn(in_shape=(1, 8, 8), num_classes=10, channels=(8, 8, 8, 8))


def test_mlp_param_count_exact():
    m = mlp(in_shape=(1, 28, 28), num_classes=10, width=32, depth=1)
    assert sum(p.numel() for p in m.parameters()) == 784 * 32 + 32 + 32 * 10 + 10
    m2 = mlp(in_shape=(64,), num_classes=10, width=16, depth=2, dropout=0.1)
    assert sum(p.numel() for p in m2.parameters()) == (64 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10)


def test_resnet_trains():
    """Gradients reach every parameter, and optimizer steps really lower the loss on a batch."""
    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet", {"width": 8, "blocks": [1, 1]}), in_shape=[1, 8, 8], num_classes=4)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = nn.functional.cross_entropy(m(x), y)
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()


def test_build_errors():
    with pytest.raises(
        ValueError,
        match=r"unknown model arch 'vit'.*\['bag', 'cnn', 'hf-causal-lm', 'hf-encoder', 'hf-sequence-classification', "
        r"'llama', 'mlp', 'pruned', 'resnet', 'transformer'\], timm:<name>, torchvision:<name>",
    ):
        build_model({"arch": "vit"}, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match=r"unknown kwarg\(s\) \['widht'\]"):
        build_model({"arch": "mlp", "kwargs": {"widht": 3}}, in_shape=(64,), num_classes=2)
    with pytest.raises(ValueError, match=r"missing required argument\(s\) \['num_classes'\]"):
        build_model({"arch": "mlp"}, in_shape=(64,))
    with pytest.raises(ValueError, match="conflicts"):
        build_model({"arch": "mlp", "kwargs": {"num_classes": 3}}, in_shape=(64,), num_classes=2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['width'\]"):
        build_model({"arch": "mlp", "width": 3}, in_shape=(64,), num_classes=2)
    # matching duplicates are fine (yaml lists vs tuples)
    m = build_model({"arch": "mlp", "kwargs": {"in_shape": [64], "num_classes": 2}}, in_shape=(64,), num_classes=2)
    assert m(torch.rand(2, 64)).shape == (2, 2)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_student_zoo.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn
        from pipeline.models.registry import Classifier

        def tiny(*, in_shape, num_classes, hidden: int = 5):
            d = 1
            for s in in_shape:
                d *= s
            return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(d, hidden)),
                              nn.Linear(hidden, num_classes))

        def no_shapes(out: int = 3):
            return nn.Linear(4, out)

        def flexible(**kw):
            return nn.Linear(kw["in_shape"][0], kw["num_classes"])

        def not_a_model(**kw):
            return "oops"

        VALUE = 3

        def tokens_model(**kw):
            return nn.Linear(4, 2)
        tokens_model.input_kind = "tokens"

        def pixels_model(**kw):
            return nn.Linear(4, 2)
        pixels_model.input_kind = "pixels"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_student_zoo"
    sys.modules.pop("my_student_zoo", None)


def test_import_path_builder(factory_module):
    m = build_model({"arch": f"{factory_module}:tiny", "kwargs": {"hidden": 7}}, in_shape=(1, 8, 8), num_classes=4)
    assert m.feature_dim == 7 and m(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    # a factory that does not take in_shape/num_classes still builds
    lin = build_model({"arch": f"{factory_module}:no_shapes"}, in_shape=(4,), num_classes=3)
    assert isinstance(lin, nn.Linear)
    flex = build_model({"arch": f"{factory_module}:flexible"}, in_shape=(6,), num_classes=2)
    assert flex.in_features == 6 and flex.out_features == 2


def test_import_path_errors(factory_module):
    with pytest.raises(ValueError, match="cannot import module 'no_such_zoo_xyz'"):
        build_model({"arch": "no_such_zoo_xyz:tiny"})
    with pytest.raises(ValueError, match="has no attribute 'huge'"):
        build_model({"arch": f"{factory_module}:huge"})
    with pytest.raises(ValueError, match="'VALUE' is not callable"):
        build_model({"arch": f"{factory_module}:VALUE"})
    with pytest.raises(ValueError, match="factory returned str, expected a torch.nn.Module"):
        build_model({"arch": f"{factory_module}:not_a_model"}, in_shape=(4,), num_classes=2)
    with pytest.raises(ValueError, match=r"unknown kwarg\(s\) \['depth'\]"):
        build_model({"arch": f"{factory_module}:tiny", "kwargs": {"depth": 2}}, in_shape=(4,), num_classes=2)
    with pytest.raises(ValueError, match="must look like 'package.module:factory'"):
        build_model({"arch": ":tiny"})


def test_import_paths_outside_trusted_factories_are_refused(factory_module):
    # build_model trusts its caller's spec by default; with trusted_factories it builds
    # only the named import paths (what load_model passes for a file from elsewhere)
    arch = f"{factory_module}:tiny"
    m = build_model({"arch": arch}, in_shape=(4,), num_classes=2, trusted_factories={arch})
    assert m(torch.rand(1, 4)).shape == (1, 2)
    with pytest.raises(UntrustedFactoryError, match=rf"refusing to build arch '{arch}'"):
        build_model({"arch": arch}, in_shape=(4,), num_classes=2, trusted_factories={f"{factory_module}:flexible"})
    # built-in names import nothing, so no trust is needed
    assert isinstance(build_model({"arch": "mlp"}, in_shape=(4,), num_classes=2, trusted_factories=()), Classifier)


def test_model_stats():
    torch.manual_seed(0)
    small = mlp(in_shape=(1, 8, 8), num_classes=10, width=16)
    big = mlp(in_shape=(1, 8, 8), num_classes=10, width=128)
    s, b = (model_stats(m, in_shape=(1, 8, 8), batch_size=4, repeats=5) for m in (small, big))
    for st in (s, b):
        assert st["params"] > 0 and st["size_bytes"] > 0 and st["latency_ms"] > 0
    assert s["params"] == sum(p.numel() for p in small.parameters())
    assert b["size_bytes"] > s["size_bytes"] > 4 * s["params"]
    cnn = small_cnn(in_shape=(1, 8, 8), num_classes=10, channels=(4,))
    cnn.train()
    st = model_stats(cnn, in_shape=(1, 8, 8), repeats=2)
    assert st["latency_ms"] > 0 and cnn.training  # mode restored


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapter_builds_each_builtin_arch_and_says_dense(arch):
    ad = model_adapter({"arch": arch}, trusted_factories=())  # built-ins need no trust
    assert isinstance(ad, ModelAdapter) and ad.input_kind == "dense"
    m = ad.build((1, 8, 8), 10)
    assert isinstance(m, Classifier) and m(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    # the same model build_model gives
    torch.manual_seed(0)
    a = ad.build((1, 8, 8), 10)
    torch.manual_seed(0)
    b = build_model({"arch": arch}, in_shape=(1, 8, 8), num_classes=10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_adapter_for_a_factory_needs_trust(factory_module):
    arch = f"{factory_module}:tiny"
    sys.modules.pop(factory_module, None)
    with pytest.raises(UntrustedFactoryError, match=rf"refusing to build arch '{arch}'"):
        model_adapter({"arch": arch}, trusted_factories=())
    assert factory_module not in sys.modules  # refused before the import
    with pytest.raises(ValueError, match="unknown model arch 'nope'"):
        model_adapter({"arch": "nope"})
    ad = model_adapter({"arch": arch, "kwargs": {"hidden": 5}}, trusted_factories={arch})
    assert ad.input_kind == "dense" and ad.build((4,), 3)(torch.rand(1, 4)).shape == (1, 3)
    # the caller's own spec (trusted_factories=None), and a factory declaring another input kind
    assert model_adapter({"arch": f"{factory_module}:flexible"}).build((6,), 2).in_features == 6
    assert model_adapter({"arch": f"{factory_module}:tokens_model"}).input_kind == "tokens"
    with pytest.raises(ValueError, match="input_kind 'pixels' is not one of"):
        _ = model_adapter({"arch": f"{factory_module}:pixels_model"}).input_kind
