"""The language-model half of the public API (`import distillery`): TokenLabels / Windows
items against the corpus windows and the stored sequences, collate_tokens against the
built-in label stream's batches, every distillery.losses function against hand-computed
float64 values, to_hf_dataset, corpus_of, and the refusals, on a tiny corpus labelled by a
tiny random Llama (packed windows, and variable-length document windows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_hf import WORDS, tiny_labelled_corpus
from torch.utils.data import DataLoader

import distillery
from pipeline.data.corpus import TokenCorpus
from pipeline.labelling.tokens import label_corpus_many, output_spec
from pipeline.models.registry import build_model
from pipeline.training.stream import open_label_stream
from pipeline.training.windows import PAD

L, K, DRAWS = 16, 8, 16
TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny"}
DOC_WORDS = [3, 40, 17, 1, 16, 29, 8, 55, 12, 2]  # words per document: windows of 1..16 positions
LABEL_FIELDS = {"topk": ("topk_ids", "topk_logprobs", "missing_mass"), "sampled": ("sample_ids", "sample_counts")}


def _outputs(root):
    return [
        output_spec(uri=str(root / "topk"), k=K),
        output_spec(uri=str(root / "sampled"), representation="token_sampled", draws=DRAWS),
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Packed windows of 16 tokens: train (24 windows, labelled top-k and sampled), val (8)."""
    return tiny_labelled_corpus(tmp_path_factory.mktemp("pubtok"))


@pytest.fixture(scope="module")
def varlen(env, tmp_path_factory):
    """Document windows of 1..16 positions (every window labelled, top-k and sampled)."""
    from pipeline.hf_files import load_tokenizer

    root = tmp_path_factory.mktemp("pubtok-varlen")
    rng = np.random.default_rng(0)
    (root / "docs").mkdir()
    for d, n in enumerate(DOC_WORDS):
        (root / "docs" / f"{d:02d}.txt").write_text(" ".join(rng.choice(WORDS, n)))
    corpus = TokenCorpus.from_text_files(
        root / "docs",
        tokenizer=load_tokenizer(env["tok_dir"]),
        tokenizer_path=env["tok_dir"],
        seq_len=L,
        cache_dir=str(root / "cache"),
        windows="documents",
    )
    label_corpus_many(env["teacher"], corpus, _outputs(root), shard_size=4, batch_size=3, teacher=TEACHER)
    return {"corpus": corpus, "topk": str(root / "topk"), "sampled": str(root / "sampled")}


def _student(V, seed=0):
    torch.manual_seed(seed)
    return build_model(
        {"arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2, "max_length": L}},
        in_shape=(L,),
        num_classes=V,
    )


def _separator(corpus) -> int:
    return int(corpus.describe()["separator_id"])


# ------------------------------------------------------------------ items


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_items_are_the_corpus_windows_joined_to_their_stored_sequences(env, kind):
    labels = distillery.open_labels(env[kind])
    corpus = env["train"]
    data = distillery.TokenLabels(labels, corpus)
    assert len(data) == len(corpus) == 24
    stored = labels.take_sequences(corpus.sample_ids, np.zeros(len(corpus), np.int64))
    windows = corpus.windows(np.arange(len(corpus)))  # (24, L + 1)
    for i in range(len(corpus)):
        it = data[i]
        assert set(it) == {"input_ids", "sample_id", *LABEL_FIELDS[kind]}
        assert it["sample_id"] == int(corpus.sample_ids[i])
        assert np.array_equal(it["input_ids"], windows[i])  # the window and the token after it
        for key in LABEL_FIELDS[kind]:
            assert np.array_equal(it[key], stored[key][i, :L]), key
    # a batch of indices is one read, item for item the same
    many = data.__getitems__([5, 0, 23])
    for j, i in enumerate([5, 0, 23]):
        assert all(np.array_equal(many[j][k], data[i][k]) for k in many[j])
    plain = distillery.Windows(corpus)
    assert len(plain) == 24 and set(plain[3]) == {"input_ids", "sample_id"}
    assert np.array_equal(plain[3]["input_ids"], windows[3])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shuffled_dataloader_epoch_sees_every_window_once(env, workers):
    data = distillery.TokenLabels(env["topk"], env["train"])
    kw = {"num_workers": 2, "multiprocessing_context": "forkserver"} if workers else {}  # the dataset is pickled
    loader = DataLoader(
        data,
        batch_size=5,
        shuffle=True,
        collate_fn=distillery.collate_tokens,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    seen, sizes = [], []
    for b in loader:
        assert b["x"].shape == b["y"].shape == b["mask"].shape == (len(b["sample_id"]), L) and b["mask"].all()
        assert b["topk_ids"].shape == (len(b["sample_id"]), L, K)
        sizes.append(len(b["sample_id"]))
        seen += b["sample_id"].tolist()
    assert sizes == [5, 5, 5, 5, 4]
    assert sorted(seen) == sorted(env["train"].sample_ids.tolist()) and len(set(seen)) == 24
    assert seen != sorted(seen)  # shuffled


# ------------------------------------------------------------------ collate_tokens


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_collate_pads_windows_of_unequal_length(varlen, kind):
    corpus = varlen["corpus"]
    data = distillery.TokenLabels(varlen[kind], corpus)
    n_all = corpus.lengths(np.arange(len(corpus)))
    idx = [int(np.argmax(n_all)), int(np.argmin(n_all)), *np.flatnonzero((n_all > 1) & (n_all < L))[:3].tolist()]
    items = data.__getitems__(idx)
    n = n_all[idx]
    assert n.max() == L and n.min() == 1 and len(set(n.tolist())) >= 3
    b = distillery.collate_tokens(items, pad_id=7)
    B, Lb = len(idx), int(n.max())
    assert b["x"].shape == b["y"].shape == b["mask"].shape == (B, Lb)
    assert int(b["mask"].sum()) == int(n.sum())
    assert b["mask"].tolist() == [[j < m for j in range(Lb)] for m in n]
    w = corpus.windows(idx)
    for j, m in enumerate(n):
        assert b["x"][j, :m].tolist() == w[j, :m].tolist() and b["y"][j, :m].tolist() == w[j, 1 : m + 1].tolist()
        # x holds the window's n + 1 tokens (its last target too: masked), then pad_id
        assert b["x"][j, m : m + 1].tolist() == w[j, m : min(m + 1, Lb)].tolist()
        assert (b["x"][j, m + 1 :] == 7).all() and (b["y"][j, m:] == 7).all()
        for key in LABEL_FIELDS[kind]:
            assert torch.equal(b[key][j, :m], torch.as_tensor(items[j][key])), key
            assert (b[key][j, m:] == PAD[key]).all(), key  # padded positions hold PAD
    assert b["sample_id"].tolist() == corpus.sample_ids[idx].tolist()
    assert b["view"].tolist() == [0] * B and b["weight"].tolist() == [1.0] * B
    assert b["topk_ids" if kind == "topk" else "sample_ids"].dtype == torch.int64
    if kind == "topk":
        assert b["topk_logprobs"].dtype == b["missing_mass"].dtype == torch.float32
        assert b["topk_ids"].shape == (B, Lb, K) and b["missing_mass"].shape == (B, Lb)
    else:
        assert b["sample_counts"].dtype == torch.int32
        assert (b["sample_counts"].sum(-1)[b["mask"]] == DRAWS).all()  # every real position's draws
    with pytest.raises(ValueError, match="empty batch"):
        distillery.collate_tokens([])


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_collated_items_are_the_built_in_streams_batches_and_give_its_loss(env, varlen, kind):
    corpus = varlen["corpus"]
    student = _student(env["V"])
    loss_fn = distillery.losses.topk_kl if kind == "topk" else distillery.losses.sampled_kl
    data = distillery.TokenLabels(varlen[kind], corpus)
    stream = open_label_stream(varlen[kind], corpus, batch_size=4, shuffle=False)
    seen = []
    for sb in stream:
        sid = sb["sample_id"].numpy()
        seen += sid.tolist()
        items = data.__getitems__(corpus.index_of(sid))
        mine = distillery.collate_tokens(items, pad_id=_separator(corpus))  # the stream pads with the separator
        assert set(mine) == set(sb), (sorted(mine), sorted(sb))
        for key in sb:
            assert mine[key].dtype == sb[key].dtype and torch.equal(mine[key], sb[key]), key
        with torch.no_grad():
            ref = loss_fn(student(sb["x"]), sb, alpha=0.5)
            got = loss_fn(student(mine["x"]), mine, alpha=0.5)
            b0 = distillery.collate_tokens(items)  # pad id 0: other padding, the same loss (causal)
            got0 = loss_fn(student(b0["x"]), b0, alpha=0.5)
        assert torch.isfinite(ref) and float(got) == pytest.approx(float(ref), rel=1e-6)
        assert float(got0) == pytest.approx(float(ref), rel=1e-5)
    assert sorted(seen) == sorted(corpus.sample_ids.tolist())


# ------------------------------------------------------------------ the losses, by hand


def _lm_batch(seed=0, V=6, k=2, s=4):
    """A handcrafted token batch: B = 2 windows of L = 3 positions, the last position of the
    second window padding; per-window weights 1 and 2; top-k rows whose stored missing mass
    is 3% off 1 − Σ p_k (the k + 1 buckets are renormalised); sampled rows with padding slots."""
    g = torch.Generator().manual_seed(seed)
    B, Lw = 2, 3
    p = torch.softmax(torch.randn(B, Lw, V, generator=g, dtype=torch.float64) * 1.5, -1)  # the teacher
    top = p.topk(k, -1)
    counts = torch.tensor(
        [[[3, 1, 0, 0], [2, 2, 1, 0], [4, 0, 0, 0]], [[1, 1, 1, 1], [5, 2, 0, 0], [1, 0, 0, 0]]], dtype=torch.int32
    )
    ids = torch.stack([torch.randperm(V, generator=g)[:s] for _ in range(B * Lw)]).reshape(B, Lw, s)
    ids = torch.where(counts > 0, ids, 0)  # padding slots: id 0, count 0
    batch = {
        "x": torch.zeros(B, Lw, dtype=torch.int64),
        "y": torch.randint(0, V, (B, Lw), generator=g),
        "mask": torch.tensor([[True, True, True], [True, True, False]]),
        "weight": torch.tensor([1.0, 2.0]),
        "topk_ids": top.indices,
        "topk_logprobs": top.values.log().float(),
        "missing_mass": ((1 - top.values.sum(-1)) * 1.03).float(),
        "sample_ids": ids,
        "sample_counts": counts,
    }
    z = torch.randn(B, Lw, V, generator=g, dtype=torch.float64) * 2
    return z.float(), batch


def _rows(batch, key):
    """(B, L, ...) -> the real positions, float64, and their weights."""
    m = batch["mask"]
    w = batch["weight"][:, None].expand(m.shape)[m].double()
    return batch[key][m], w


def _buckets(z, batch, T_student):
    """(log p, log q) (N, k + 1): the kept ids and the tail bucket, float64 (sparse.py's
    convention at stored T = 1: teacher buckets [log p_k, log m] · 1/T', renormalised;
    the student's softmax(z / T') at the kept ids and 1 − Σ_k q in the tail)."""
    m = batch["mask"]
    zz, w = _rows({**batch, "z": z.double()}, "z")
    ids = batch["topk_ids"][m]
    a = torch.cat([batch["topk_logprobs"][m].double(), batch["missing_mass"][m].double().log()[:, None]], 1)
    log_p = torch.log_softmax(a / T_student, -1)
    q = torch.softmax(zz / T_student, -1)
    qk = q.gather(1, ids)
    log_q = torch.cat([qk, 1 - qk.sum(1, keepdim=True)], 1).log()
    return log_p, log_q, w


def _kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _wmean(per_row, w):
    return float((per_row * w).sum() / w.sum())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_losses_equal_hand_computed_values(T):
    z, batch = _lm_batch()
    log_p, log_q, w = _buckets(z, batch, T)
    fkl = _wmean(T**2 * _kl(log_p, log_q), w)
    rkl = _wmean(T**2 * _kl(log_q, log_p), w)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    js = _wmean(T**2 * (0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)), w)
    assert distillery.losses.topk_kl(z, batch, temperature=T).item() == pytest.approx(fkl, rel=1e-5)
    assert distillery.losses.reverse_kl(z, batch, temperature=T).item() == pytest.approx(rkl, rel=1e-5)
    assert distillery.losses.jsd(z, batch, temperature=T).item() == pytest.approx(js, rel=1e-5)
    assert fkl > 0 and rkl > 0 and js > 0 and fkl != pytest.approx(rkl, rel=1e-3)
    # the padded position's rows never count: garbage there changes nothing
    junk = {**batch, "topk_logprobs": batch["topk_logprobs"].clone(), "missing_mass": batch["missing_mass"].clone()}
    junk["topk_logprobs"][1, 2], junk["missing_mass"][1, 2] = torch.tensor([-0.01, -9.0]), 0.9
    z2 = z.clone()
    z2[1, 2] = 50.0
    assert distillery.losses.topk_kl(z2, junk, temperature=T).item() == pytest.approx(fkl, rel=1e-5)


def test_sampled_kl_equals_the_hand_computed_estimate():
    z, batch = _lm_batch()
    logq, w = _rows({**batch, "z": torch.log_softmax(z.double(), -1)}, "z")
    ids, c = batch["sample_ids"][batch["mask"]], batch["sample_counts"][batch["mask"]].double()
    per_row = -(c / c.sum(1, keepdim=True) * logq.gather(1, ids)).sum(1)
    assert distillery.losses.sampled_kl(z, batch).item() == pytest.approx(_wmean(per_row, w), rel=1e-5)


def test_alpha_mixes_the_next_token_cross_entropy_in():
    z, batch = _lm_batch()
    logq, w = _rows({**batch, "z": torch.log_softmax(z.double(), -1)}, "z")
    ce = _wmean(-logq.gather(1, batch["y"][batch["mask"]][:, None])[:, 0], w)
    log_p, log_q, _ = _buckets(z, batch, 2.0)
    kd = _wmean(4.0 * _kl(log_p, log_q), w)
    got = distillery.losses.topk_kl(z, batch, temperature=2.0, alpha=0.3)
    assert got.item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)  # CE at T = 1, KD at T'
    y2 = torch.zeros_like(batch["y"])  # an explicit y wins over the batch's
    ce2 = _wmean(-logq[:, 0], w)
    got2 = distillery.losses.topk_kl(z, batch, temperature=2.0, alpha=0.3, y=y2)
    assert got2.item() == pytest.approx(0.3 * ce2 + 0.7 * kd, rel=1e-5)
    assert distillery.losses.topk_kl(z, batch, alpha=1.0).item() == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("T,T_student", [(4.0, 4.0), (4.0, 2.0), (1.0, 3.0)])
def test_kd_on_dense_labels_equals_the_hand_computed_value(T, T_student):
    g = torch.Generator().manual_seed(3)
    z_teacher = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    z = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 7, (5,), generator=g)
    batch = {"stored_logits": (z_teacher / T).float()}  # what the writer stores: z/T
    log_p = torch.log_softmax(z_teacher / T_student, -1)  # s·T/T' = z_t/T'
    log_q = torch.log_softmax(z / T_student, -1)
    kd = float((T_student**2 * _kl(log_p, log_q)).mean())
    got = distillery.losses.kd(z.float(), batch, temperature=T_student, stored_temperature=T)
    assert got.item() == pytest.approx(kd, rel=1e-5)
    ce = float(F.cross_entropy(z, y))
    mixed = distillery.losses.kd(z.float(), batch, temperature=T_student, stored_temperature=T, alpha=0.25, y=y)
    assert mixed.item() == pytest.approx(0.25 * ce + 0.75 * kd, rel=1e-5)
    # the same through distill_loss, the function the losses name
    same = distillery.distill_loss(z.float(), batch, kind="dense", stored_temperature=T, temperature=T_student)
    assert same.item() == pytest.approx(kd, rel=1e-6)
    with pytest.raises(ValueError, match="pass y"):
        distillery.losses.kd(z.float(), batch, stored_temperature=T, alpha=0.5)


def test_sampled_kl_exists_only_at_the_stored_temperature():
    # no temperature argument: the estimator is defined at T = 1 only
    import inspect

    assert "temperature" not in inspect.signature(distillery.losses.sampled_kl).parameters
    z, batch = _lm_batch()
    with pytest.raises(ValueError, match="stored temperature"):
        distillery.distill_loss(
            z, batch, loss="sampled_kl", kind="token_sampled", stored_temperature=1.0, temperature=2
        )


# ------------------------------------------------------------------ to_hf_dataset


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_hf_dataset_rows_are_the_items(env, varlen, kind):
    import datasets

    for corpus, uri in ((env["train"], env[kind]), (varlen["corpus"], varlen[kind])):
        data = distillery.TokenLabels(uri, corpus)
        ds = distillery.to_hf_dataset(uri, corpus, batch_size=7)  # several parts, concatenated
        assert isinstance(ds, datasets.Dataset) and len(ds) == len(corpus)
        assert set(ds.column_names) == {"sample_id", "input_ids", "attention_mask", *LABEL_FIELDS[kind]}
        for i in range(len(corpus)):
            row, it = ds[i], data[i]
            assert row["sample_id"] == it["sample_id"]
            assert row["input_ids"] == it["input_ids"].tolist()
            assert row["attention_mask"] == [1] * len(it["input_ids"])
            for key in LABEL_FIELDS[kind]:
                got = np.asarray(row[key]).astype(it[key].dtype)
                assert got.shape == it[key].shape and np.array_equal(got, it[key]), key
        idx = list(range(0, len(corpus), 3))
        a = distillery.collate_tokens([ds[i] for i in idx])
        b = distillery.collate_tokens(data.__getitems__(idx))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ corpus_of


def test_corpus_of_refuses_labels_whose_manifest_records_no_recipe(env):
    assert "recipe" not in distillery.open_labels(env["topk"]).manifest["data"]
    with pytest.raises(ValueError, match="records no corpus recipe"):
        distillery.corpus_of(env["topk"])
    with pytest.raises(ValueError, match="records no corpus recipe"):
        distillery.to_hf_dataset(env["topk"])  # no corpus given: it would need corpus_of


def test_corpus_of_rebuilds_the_labelled_windows_from_the_recipe(env, tmp_path, monkeypatch):
    from pipeline.labelling.loop import label
    from pipeline.labelling.tokens import TokenLabeller

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))  # the rebuilt corpus' token cache
    recipe = {
        "corpus": {
            "kind": "text_files",
            "path": str(env["root"] / "docs"),
            "text_field": "text",
            "seq_len": L,
            "windows": "packed",
            "sizes": {"train": 24, "val": 8},
            "seed": 0,
        },
        "label_split": "train",
    }
    uri = str(tmp_path / "labels")
    labeller = TokenLabeller(env["teacher"], env["train"], [output_spec(uri=uri, k=K)], batch_size=4, recipe=recipe)
    label(labeller, shard_size=8, teacher=TEACHER)
    labels = distillery.open_labels(uri)
    assert labels.manifest["data"]["recipe"] == recipe
    corpus = distillery.corpus_of(labels)
    assert corpus is not env["train"] and corpus.fingerprint() == labels.manifest["data"]["fingerprint"]
    assert corpus.sample_ids.tolist() == env["train"].sample_ids.tolist()
    assert np.array_equal(corpus.windows(np.arange(24)), env["train"].windows(np.arange(24)))
    ds = distillery.to_hf_dataset(uri)  # the corpus from the manifest
    assert ds["sample_id"] == env["train"].sample_ids.tolist()
    # the recipe's tokenizer directory must exist here
    moved = {**labels.manifest, "data": {**labels.manifest["data"]}}
    moved["data"]["inputs"] = {**moved["data"]["inputs"], "tokenizer": {"path": str(tmp_path / "nowhere")}}
    monkeypatch.setattr(labels, "manifest", moved)
    with pytest.raises(ValueError, match="nowhere, does not exist here"):
        distillery.corpus_of(labels)


# ------------------------------------------------------------------ refusals


def test_token_labels_of_other_windows_are_refused(env):
    labels = distillery.open_labels(env["topk"])
    stored, val_fp = labels.manifest["data"]["fingerprint"], env["val"].fingerprint()
    with pytest.raises(ValueError, match="fingerprint") as e:
        distillery.TokenLabels(labels, env["val"])  # another split: other windows
    assert stored in str(e.value) and val_fp in str(e.value) and stored != val_fp


def test_token_labels_refuse_classifier_labels_and_a_non_token_corpus(env, tmp_path):
    from conftest import write_toy

    write_toy(str(tmp_path / "dense"), n=20, c=5, shards=1)
    with pytest.raises(ValueError, match="TokenLabels joins token labels; these are 'dense'"):
        distillery.TokenLabels(str(tmp_path / "dense"), env["train"])
    with pytest.raises(ValueError, match="need a token corpus"):
        distillery.TokenLabels(env["topk"], [1, 2, 3])
    with pytest.raises(ValueError, match="need a token corpus"):
        distillery.Windows(np.zeros((3, 4)))


def test_a_window_without_labels_is_named(env, monkeypatch):
    """A corpus whose lineage matches the labels' but which holds windows they lack (the
    fingerprint covers the window ids, so only a corpus claiming the labels' fingerprint
    gets this far): the first unlabelled sample id is named."""
    labels = distillery.open_labels(env["topk"])
    more = env["corpus"].subset(np.arange(len(env["corpus"])), split_spec=env["train"].split_spec)
    assert len(more) > 24
    with pytest.raises(ValueError, match="fingerprint"):
        distillery.TokenLabels(labels, more)
    monkeypatch.setattr(more, "fingerprint", lambda: labels.manifest["data"]["fingerprint"])
    first = int(np.setdiff1d(more.sample_ids, env["train"].sample_ids)[0])
    n_missing = len(more) - 24
    with pytest.raises(
        ValueError,
        match=rf"no sequence for window sample_id {first} .*\({n_missing} of {len(more)} windows unlabelled\)",
    ):
        distillery.TokenLabels(labels, more)
