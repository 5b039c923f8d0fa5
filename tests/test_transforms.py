"""pipeline/views/transforms.py: every view transform is a pure function of (transform,
sample_id, view, the row's input); view 0 is the identity; the identity dict round-trips."""

import importlib
import json
import math
import sys

import numpy as np
import pytest
import torch

from pipeline.views.images import ViewSpec
from pipeline.views.torchvision import TorchvisionViews
from pipeline.views.transforms import (
    KINDS,
    Compose,
    FunctionView,
    SignalViews,
    TokenViews,
    Transform,
    check_deterministic,
    row_generators,
    row_keys,
    transform_from_config,
    transform_from_dict,
)

PAD, MASK, CLS, SEP = 0, 103, 101, 102
SPECIALS = (PAD, CLS, SEP, MASK)


def _tokens(n=12, lmin=4, lmax=24, seed=0, width=None):
    """Right-padded rows [CLS, w..., SEP] with word ids in [1000, 2000)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lmin, lmax + 1, n)
    L = width or int(lens.max())
    a = np.full((n, L), PAD, np.int64)
    for i, m in enumerate(lens):
        a[i, :m] = [CLS, *rng.integers(1000, 2000, m - 2), SEP]
    return torch.from_numpy(a)


def _nonpad(row: torch.Tensor) -> list[int]:
    return [int(t) for t in row if int(t) != PAD]


def _signals(n=10, c=None, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) if c is None else torch.randn(n, c, d, generator=g)


TOK = TokenViews(pad_id=PAD, mask_id=MASK, special_ids=SPECIALS, mask_prob=0.3, drop_prob=0.2, seed=5)
SIG = SignalViews(shift=5, scale=0.2, noise_std=0.05, seed=3)
VIEWSPEC = ViewSpec(shift=2, hflip=True, noise_std=0.1, seed=1)

USER_MODULE = """
import torch

def jitter(x, generator, amount=0.5):
    return x + amount * torch.randn(x.shape, generator=generator, dtype=x.dtype)

def global_rng(x, generator):
    return x + torch.rand(x.shape, dtype=x.dtype)

def reshape(x, generator):
    return x[:-1]

def to_double(x, generator):
    return x.double()

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_mod(tmp_path, monkeypatch):
    name = f"user_views_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


def _cases(user_mod):
    """(transform, input, sample ids) for every kind; views 0..3."""
    toks, sig = _tokens(16), _signals(16)
    ids = np.arange(16, dtype=np.int64) * 13 + 7
    return [
        (TOK, toks, ids),
        (SIG, sig, ids),
        (SignalViews(shift=3, scale=0.1, seed=2), _signals(16, c=3), ids),
        (FunctionView(f"{user_mod}:jitter", {"amount": 0.25}, seed=9), sig, ids),
        (
            Compose(
                [
                    TokenViews(pad_id=PAD, mask_id=MASK, special_ids=SPECIALS, mask_prob=0.2, seed=1),
                    TokenViews(pad_id=PAD, special_ids=SPECIALS, drop_prob=0.3, seed=2),
                ]
            ),
            toks,
            ids,
        ),
        (Compose([SIG, FunctionView(f"{user_mod}:jitter")]), sig, ids),
        (VIEWSPEC, torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(4)), ids),
        (
            TorchvisionViews(
                steps=[{"RandomResizedCrop": {"size": [8, 8], "scale": [0.5, 1.0]}}, {"RandomHorizontalFlip": {}}],
                seed=3,
            ),
            torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(5)) / 255.0,
            ids,
        ),
    ]


def _same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------- the protocol, every kind


def test_view0_is_identity_for_every_transform(user_mod):
    for t, x, ids in _cases(user_mod):
        assert isinstance(t, Transform)
        out = t.apply(x, ids, np.zeros(len(ids), np.int64))
        assert _same(out, x) and out.data_ptr() != x.data_ptr(), t
        # mixed batch: view-0 rows untouched, others changed
        mixed = t.apply(x, ids, np.arange(len(ids)) % 2)
        for i in range(0, len(ids), 2):
            assert _nonpad(mixed[i]) == _nonpad(x[i]) if x.dtype == torch.int64 else torch.equal(mixed[i], x[i])
        if x.dtype == torch.int64:
            assert any(_nonpad(mixed[i]) != _nonpad(x[i]) for i in range(1, len(ids), 2))
        else:
            assert all(not torch.equal(mixed[i], x[i]) for i in range(1, len(ids), 2)), t


def test_deterministic_across_calls_orders_and_batches(user_mod):
    for t, x, ids in _cases(user_mod):
        views = np.arange(len(ids)) % 4
        ref = t.apply(x, ids, views)
        assert _same(t.apply(x, ids, views), ref)
        perm = np.random.default_rng(1).permutation(len(ids))
        shuffled = t.apply(x[perm], ids[perm], views[perm])
        for j, i in enumerate(perm):
            if x.dtype == torch.int64:
                assert _nonpad(shuffled[j]) == _nonpad(ref[i])
            else:
                assert torch.equal(shuffled[j], ref[i])
        # three rows alone, then next to other rows (global RNG disturbed in between)
        torch.rand(7)
        rows = [2, 9, 14]
        alone = t.apply(x[rows], ids[rows], views[rows])
        other = x[[0, 1]]
        batch = torch.cat([other, x[rows]])
        out = t.apply(
            batch,
            np.concatenate([[5000, 5001], ids[rows]]),
            np.concatenate([[1, 3], views[rows]]),
        )
        for j, i in enumerate(rows):
            for got in (alone[j], out[2 + j]):
                if x.dtype == torch.int64:
                    assert _nonpad(got) == _nonpad(ref[i])
                else:
                    assert torch.equal(got, ref[i])
        check_deterministic(t, x, ids, views)


def test_views_and_seeds_differ(user_mod):
    for t, x, ids in _cases(user_mod):
        v1 = t.apply(x, ids, np.ones(len(ids), np.int64))
        v2 = t.apply(x, ids, np.full(len(ids), 2))
        if x.dtype == torch.int64:
            assert sum(_nonpad(v1[i]) != _nonpad(v2[i]) for i in range(len(ids))) >= len(ids) // 2
        else:
            assert all(not torch.equal(v1[i], v2[i]) for i in range(len(ids))), t
    other = SignalViews(shift=5, scale=0.2, noise_std=0.05, seed=4)
    x, ids = _signals(8), np.arange(8)
    assert not torch.equal(SIG.apply(x, ids, 1), other.apply(x, ids, 1))


def test_row_keys_and_generators_are_pure():
    ids, views = np.array([3, 4, 5]), np.array([1, 1, 2])
    k = row_keys(7, ids, views)
    assert k.dtype == np.uint64 and len(set(k.tolist())) == 3
    assert np.array_equal(row_keys(7, ids[::-1], views[::-1]), k[::-1])
    assert not np.array_equal(row_keys(8, ids, views), k)
    a = [torch.rand(4, generator=g) for g in row_generators(7, ids, views)]
    b = [torch.rand(4, generator=g) for g in row_generators(7, ids[[2]], views[[2]])]
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="seed"):
        row_keys(-1, ids, views)


# ---------------------------------------------------------------- tokens


def test_tokens_padding_invariance():
    x = _tokens(6, seed=3)
    ids, views = np.arange(6) + 40, np.array([1, 2, 3, 1, 2, 3])
    wide = torch.cat([x, torch.full((6, 30), PAD)], dim=1)  # same rows padded to L + 30
    left = torch.stack([torch.cat([torch.full((30,), PAD), r]) for r in x])  # padded on the left
    for t in (TOK, TokenViews(pad_id=PAD, mask_id=MASK, special_ids=SPECIALS, mask_prob=0.4, seed=2)):
        ref = t.apply(x, ids, views)
        for other in (wide, left):
            out = t.apply(other, ids, views)
            assert all(_nonpad(out[i]) == _nonpad(ref[i]) for i in range(6))
    # one row padded to 20 and to 50 columns, in different batches
    row = _tokens(1, lmin=18, lmax=18, seed=8)[0]
    b20 = torch.cat([_tokens(3, lmax=20, width=20, seed=1), torch.cat([row, torch.full((2,), PAD)])[None]])
    b50 = torch.cat([torch.cat([row, torch.full((32,), PAD)])[None], _tokens(5, lmax=50, width=50, seed=2)])
    o20 = TOK.apply(b20, np.array([1, 2, 3, 77]), np.array([1, 1, 1, 2]))
    o50 = TOK.apply(b50, np.array([77, 4, 5, 6, 7, 8]), np.array([2, 1, 1, 1, 1, 1]))
    assert _nonpad(o20[3]) == _nonpad(o50[0]) != _nonpad(row)


def test_mask_rate_matches_mask_prob_and_specials_are_kept():
    p = 0.15
    t = TokenViews(pad_id=PAD, mask_id=MASK, special_ids=SPECIALS, mask_prob=p, seed=11)
    x = _tokens(400, lmin=20, lmax=40, seed=5)  # ~11k eligible tokens
    ids = np.arange(400)
    out = t.apply(x, ids, np.ones(400, np.int64))
    assert out.shape == x.shape
    eligible = x >= 1000
    n = int(eligible.sum())
    assert n > 10_000
    masked = int((out[eligible] == MASK).sum())
    assert abs(masked / n - p) < 3 * math.sqrt(p * (1 - p) / n)
    # only eligible tokens change, and only to MASK
    changed = out != x
    assert not (changed & ~eligible).any() and bool((out[changed] == MASK).all())
    # probability 1: every word masked, specials and pads kept
    all_m = TokenViews(pad_id=PAD, mask_id=MASK, special_ids=SPECIALS, mask_prob=1.0).apply(x, ids, 1)
    assert bool((all_m[eligible] == MASK).all()) and torch.equal(all_m[~eligible], x[~eligible])


def test_drop_repacks_trims_and_keeps_specials():
    t = TokenViews(pad_id=PAD, special_ids=SPECIALS, drop_prob=0.5, seed=3)
    x = _tokens(50, lmin=10, lmax=30, seed=6)
    ids = np.arange(50)
    out = t.apply(x, ids, np.ones(50, np.int64))
    assert out.dtype == x.dtype and out.shape[1] < x.shape[1]
    for i in range(50):
        src, got = _nonpad(x[i]), _nonpad(out[i])
        row = out[i].tolist()
        assert row[: len(got)] == got and all(v == PAD for v in row[len(got) :])  # packed left
        assert got[0] == CLS and got[-1] == SEP  # specials kept
        it = iter(src)
        assert all(tok in it for tok in got)  # a subsequence
    assert (out != PAD).any(dim=0)[-1]  # trailing empties trimmed
    rate = 1 - sum(len(_nonpad(out[i])) - 2 for i in range(50)) / sum(len(_nonpad(x[i])) - 2 for i in range(50))
    assert 0.4 < rate < 0.6
    # everything dropped (only specials... none here): at least one column stays
    bare = torch.tensor([[1500, 1501], [1600, PAD]])
    gone = TokenViews(pad_id=PAD, drop_prob=1.0).apply(bare, np.array([0, 1]), 1)
    assert gone.shape == (2, 1) and bool((gone == PAD).all())
    # view-0 rows keep their width: nothing is trimmed from under them
    mixed = t.apply(x, ids, np.array([0] + [1] * 49))
    assert torch.equal(mixed[0], x[0, : mixed.shape[1]]) and bool((x[0, mixed.shape[1] :] == PAD).all())
    # padding the input had beyond its longest row is kept when nothing is dropped from it
    padded = torch.cat([x, torch.full((50, 7), PAD)], dim=1)
    none = TokenViews(pad_id=PAD, mask_id=MASK, mask_prob=0.5).apply(padded, ids, 1)
    assert none.shape == padded.shape


def test_tokens_refusals():
    with pytest.raises(ValueError, match="mask_id"):
        TokenViews(pad_id=PAD, mask_prob=0.1)
    with pytest.raises(ValueError, match="mask_prob"):
        TokenViews(pad_id=PAD, mask_id=MASK, mask_prob=1.5)
    with pytest.raises(ValueError, match="drop_prob"):
        TokenViews(pad_id=PAD, drop_prob=-0.1)
    with pytest.raises(ValueError, match="pad_id"):
        TokenViews(pad_id=-1)
    with pytest.raises(ValueError, match="special_ids"):
        TokenViews(pad_id=PAD, special_ids=[1, "a"])
    with pytest.raises(ValueError, match="integer token ids"):
        TOK.apply(torch.rand(2, 3), np.arange(2), 1)
    assert TokenViews(pad_id=PAD).is_identity and not TOK.is_identity


# ---------------------------------------------------------------- signals


def test_signal_shift_is_a_circular_roll_and_scale_is_bounded():
    t = SignalViews(shift=7, seed=1)
    x = _signals(64, d=20)
    ids, views = np.arange(64), np.ones(64, np.int64)
    out = t.apply(x, ids, views)
    p = t.params(ids, views)
    assert set(p["shift"].tolist()) <= set(range(-7, 8)) and len(set(p["shift"].tolist())) > 8
    for i in range(64):
        assert torch.equal(out[i], torch.roll(x[i], int(p["shift"][i]), dims=-1))
    x3 = _signals(8, c=3, d=20)
    out3 = t.apply(x3, ids[:8], views[:8])
    for i in range(8):
        assert torch.equal(out3[i], torch.roll(x3[i], int(p["shift"][i]), dims=-1))
    s = SignalViews(scale=0.25, seed=2)
    f = s.params(np.arange(2000), np.ones(2000, np.int64))["factor"]
    assert f.min() >= 0.75 and f.max() <= 1.25 and f.min() < 0.76 and f.max() > 1.24
    ones = torch.ones(2000, 5)
    scaled = s.apply(ones, np.arange(2000), 1)
    assert torch.equal(scaled, torch.from_numpy(f).float()[:, None].expand(2000, 5))
    n = SignalViews(noise_std=0.5, seed=3).apply(torch.zeros(200, 100), np.arange(200), 1)
    assert abs(float(n.std()) - 0.5) < 0.02 and abs(float(n.mean())) < 0.02
    with pytest.raises(ValueError, match="scale"):
        SignalViews(scale=1.5)
    with pytest.raises(ValueError, match="shift"):
        SignalViews(shift=-1)
    with pytest.raises(ValueError, match="noise_std"):
        SignalViews(noise_std=float("nan"))
    with pytest.raises(ValueError, match="floating point"):
        SIG.apply(torch.zeros(2, 3, dtype=torch.int64), np.arange(2), 1)
    assert SignalViews().is_identity


# ---------------------------------------------------------------- a user function


def test_function_view_uses_the_generator(user_mod):
    t = FunctionView(f"{user_mod}:jitter", {"amount": 1.0}, seed=4)
    x = _signals(6)
    ids = np.arange(6)
    out = t.apply(x, ids, np.array([0, 1, 2, 0, 1, 2]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[3], x[3])
    g = row_generators(4, ids[[1]], np.array([1]))[0]
    assert torch.equal(out[1], x[1] + torch.randn(x[1].shape, generator=g))
    check_deterministic(t, x, ids, np.array([0, 1, 2, 0, 1, 2]))
    assert not t.is_identity


def test_function_view_with_global_rng_is_caught(user_mod):
    t = FunctionView(f"{user_mod}:global_rng")
    x, ids = _signals(5), np.arange(5) + 20
    with pytest.raises(ValueError, match=r"not deterministic: sample_id 21, view 1"):
        check_deterministic(t, x, ids, np.array([0, 1, 1, 2, 0]))
    # view-0 rows never reach the function, so an all-view-0 batch passes
    check_deterministic(t, x, ids, np.zeros(5, np.int64))


def test_function_view_refusals(user_mod):
    x, ids = _signals(3), np.arange(3)
    with pytest.raises(ValueError, match=r"reshape.*returned shape \(31,\).*sample_id 0, view 1"):
        FunctionView(f"{user_mod}:reshape").apply(x, ids, 1)
    with pytest.raises(ValueError, match=r"to_double.*dtype torch.float64"):
        FunctionView(f"{user_mod}:to_double").apply(x, ids, 1)
    with pytest.raises(ValueError, match=r"'no_such_module_xyz:f'.*cannot import"):
        FunctionView("no_such_module_xyz:f").apply(x, ids, 1)
    with pytest.raises(ValueError, match=rf"'{user_mod}:missing'.*no attribute"):
        FunctionView(f"{user_mod}:missing").to_dict()
    with pytest.raises(ValueError, match="not callable"):
        transform_from_config({"kind": "function", "fn": f"{user_mod}:NOT_CALLABLE"})
    with pytest.raises(ValueError, match="package.module:function"):
        FunctionView("just_a_name")
    with pytest.raises(ValueError, match="JSON"):
        FunctionView(f"{user_mod}:jitter", {"amount": object()})


def test_function_source_is_part_of_the_identity(user_mod, tmp_path):
    t = FunctionView(f"{user_mod}:jitter", {"amount": 0.5}, seed=1)
    d = t.to_dict()
    assert d["kind"] == "function" and d["fn"] == f"{user_mod}:jitter" and len(d["source_sha256"]) == 64
    assert d["kwargs"] == {"amount": 0.5} and d["seed"] == 1
    # edit the function: a new import gives another source hash, so another fingerprint
    (tmp_path / f"{user_mod}.py").write_text(USER_MODULE.replace("amount * torch.randn", "amount * 2 * torch.randn"))
    sys.modules.pop(user_mod, None)
    importlib.invalidate_caches()
    edited = FunctionView(f"{user_mod}:jitter", {"amount": 0.5}, seed=1)
    assert edited.to_dict()["source_sha256"] != d["source_sha256"]
    assert edited.fingerprint() != t.fingerprint()
    # a FunctionView rebuilt from the old record refuses the edited function
    with pytest.raises(ValueError, match="changed since"):
        transform_from_dict(d).apply(_signals(2), np.arange(2), 1)


# ---------------------------------------------------------------- identity dicts


def test_to_dict_round_trip_for_every_kind(user_mod):
    seen = set()
    for t, _, _ in _cases(user_mod):
        d = t.to_dict()
        json.dumps(d)
        back = transform_from_dict(json.loads(json.dumps(d)))
        assert back.to_dict() == d and back.fingerprint() == t.fingerprint() and type(back) is type(t)
        seen.add(d.get("kind"))
    assert seen == set(KINDS) | {None}
    # a ViewSpec dict has no kind and stays exactly as it was
    assert VIEWSPEC.to_dict() == {"shift": 2, "hflip": True, "noise_std": 0.1, "seed": 1}
    assert transform_from_dict({"shift": 2}) == ViewSpec(shift=2)
    assert transform_from_dict(None) is None
    nested = Compose([Compose([VIEWSPEC]), SIG])
    assert transform_from_dict(nested.to_dict()) == nested
    assert nested.to_dict()["steps"][0] == {"kind": "compose", "steps": [VIEWSPEC.to_dict()]}
    # fingerprints: versioned, differ by parameters
    assert (
        len(TOK.fingerprint()) == 64
        and TOK.fingerprint()
        != TokenViews(
            pad_id=PAD, mask_id=MASK, special_ids=SPECIALS, mask_prob=0.3, drop_prob=0.2, seed=6
        ).fingerprint()
    )
    assert Compose([]).is_identity and Compose([TokenViews(pad_id=0)]).is_identity
    assert not Compose([TokenViews(pad_id=0), SIG]).is_identity


def test_unknown_kinds_and_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown transform kind 'rotate'.*tokens.*signal.*function.*compose"):
        transform_from_dict({"kind": "rotate"})
    with pytest.raises(ValueError, match=r"'signal'.*unknown key\(s\) \['jitter'\]"):
        transform_from_dict({"kind": "signal", "jitter": 1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mask'\]"):
        transform_from_dict({"kind": "tokens", "pad_id": 0, "mask": 0.1})
    with pytest.raises(ValueError, match=r"ViewSpec: unknown key\(s\) \['rotate'\]"):
        transform_from_dict({"shift": 1, "rotate": 5})
    with pytest.raises(ValueError, match=r"unknown transform kind 'bogus'"):
        transform_from_dict({"kind": "compose", "steps": [{"kind": "bogus"}]})
    with pytest.raises(ValueError, match="steps"):
        transform_from_dict({"kind": "compose", "steps": "abc"})
    with pytest.raises(ValueError, match="must be a dict"):
        transform_from_dict([1, 2])
    with pytest.raises(ValueError, match="pad_id is required"):
        transform_from_dict({"kind": "tokens", "mask_prob": 0.0})


# ---------------------------------------------------------------- config


def test_transform_from_config_fills_tokenizer_ids():
    info = {"pad_id": 0, "mask_id": 103, "special_ids": [0, 100, 101, 102, 103], "vocab_size": 30522}
    t = transform_from_config({"kind": "tokens", "mask_prob": 0.15, "seed": 2}, tokenizer_info=info)
    assert t == TokenViews(pad_id=0, mask_id=103, special_ids=(0, 100, 101, 102, 103), mask_prob=0.15, seed=2)
    # explicit values win (except a pad_id the rows are not padded with)
    t = transform_from_config(
        {"kind": "tokens", "drop_prob": 0.1, "mask_id": 100, "special_ids": []}, tokenizer_info=info
    )
    assert t.mask_id == 100 and t.special_ids == () and t.pad_id == 0
    with pytest.raises(ValueError, match="pad_id 5 differs from the tokenizer's pad_id 0"):
        transform_from_config({"kind": "tokens", "pad_id": 5}, tokenizer_info=info)
    with pytest.raises(ValueError, match="pad_id is required"):
        transform_from_config({"kind": "tokens", "drop_prob": 0.1})
    with pytest.raises(ValueError, match="mask_id is required"):
        transform_from_config({"kind": "tokens", "mask_prob": 0.1}, tokenizer_info={"pad_id": 0, "mask_id": None})
    # nested in a compose, filled too
    c = transform_from_config({"kind": "compose", "steps": [{"kind": "tokens", "mask_prob": 0.1}]}, tokenizer_info=info)
    assert c.steps[0].mask_id == 103
    # ViewSpec keys give a ViewSpec
    assert transform_from_config({"shift": 2, "hflip": True, "noise_std": 0.1, "seed": 3}) == ViewSpec(
        shift=2, hflip=True, noise_std=0.1, seed=3
    )
    assert transform_from_config(None) is None


def test_transform_from_config_refusals_name_the_field(user_mod):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['maskprob'\]"):
        transform_from_config({"kind": "tokens", "maskprob": 0.1}, tokenizer_info={"pad_id": 0})
    with pytest.raises(ValueError, match=r"TokenViews.mask_prob must be a probability"):
        transform_from_config({"kind": "tokens", "mask_prob": 2}, tokenizer_info={"pad_id": 0, "mask_id": 1})
    with pytest.raises(ValueError, match=r"TokenViews.drop_prob must be a probability.*'0.1'"):
        transform_from_config({"kind": "tokens", "drop_prob": "0.1"}, tokenizer_info={"pad_id": 0})
    with pytest.raises(ValueError, match=r"SignalViews.shift must be an int >= 0"):
        transform_from_config({"kind": "signal", "shift": 1.5})
    with pytest.raises(ValueError, match=r"SignalViews.seed"):
        transform_from_config({"kind": "signal", "seed": -3})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['source_sha256'\]"):
        transform_from_config({"kind": "function", "fn": f"{user_mod}:jitter", "source_sha256": "ab"})
    with pytest.raises(ValueError, match=r"'nope_mod:f'.*cannot import"):
        transform_from_config({"kind": "function", "fn": "nope_mod:f"})
    with pytest.raises(ValueError, match=r"unknown transform kind 'crop'"):
        transform_from_config({"kind": "crop"})
    f = transform_from_config({"kind": "function", "fn": f"{user_mod}:jitter", "kwargs": {"amount": 0.1}})
    assert isinstance(f, FunctionView) and f.kwargs == {"amount": 0.1}
