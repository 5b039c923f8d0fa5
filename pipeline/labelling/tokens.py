"""A language-model teacher's part of labelling: a causal LM scores a TokenCorpus once
and its per-token next-token distributions are stored, as sparse summaries, in
`token_topk` and / or `token_sampled` soft-label datasets (docs/format.md, "Token
layouts"); TokenLabeller is what labelling/loop.py runs.

    model = load_causal_lm(teacher_dir)
    out = label_corpus(model, corpus, "runs/lm-labels", representation="token_topk", k=32,
                       teacher={"name": "smollm2-135m", "fingerprint": fp}, device="auto")

Shard i holds the windows [a, b) of the corpus' row order (labelling/loop.py's plan with
shard_size in sequences); its rows are the windows' labelled positions, sequence-major:
(b - a) * L of them, or sum(corpus.label_counts) when windows differ in length
(windows="documents": variable-length sequences) or only some positions are labelled (a
chat corpus: those whose target is an assistant token; row r of a window is its r-th).
Per batch of B windows the teacher runs once, input_ids (B, Lb) (Lb the batch's longest
window, shorter ones padded after their end) with an all-ones attention mask (a pad id
may equal the EOS/separator inside the text, so ids must never be used to build the
mask; causal attention keeps padding out of every real position), giving logits
(B, Lb, V); unlabelled positions are dropped. The summaries are computed from those
logits ON THE MODEL'S DEVICE (pipeline.labelling.token_summaries) and only the compact
results, (N, k) ids + log-probs + (N,) missing mass, or (N, u) ids + counts, are copied
to the host; the (B, Lb, V) block is dropped before the next batch, so the largest
teacher tensor is one batch's logits. A shard's batches are concatenated and
committed atomically; a re-run skips committed shards (resume) and must plan the same
shards (same corpus, shard_size).

Sampled draws are reproducible: each window draws over its own rows with its own
generator seeded from (seed, its position in the corpus' row order) (token_labels'
rng_block rule with rng_block = L, row_offset = position * L), so the draws do not depend
on batch_size, shard_size or resume. CPU and CUDA generators differ: draws reproduce per device type.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.device import AMP_DTYPES, keep_large_blocks, resolve_amp, resolve_device
from pipeline.labelling.loop import label
from pipeline.labelling.token_summaries import sampled_token_labels, topk_token_labels

if TYPE_CHECKING:
    from pipeline.data.corpus import TokenCorpus

KINDS = ("token_topk", "token_sampled")


def model_vocab(model: nn.Module) -> int:
    """V: the width of the model's logits (output embedding rows, else config.vocab_size)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def check_teacher(model: nn.Module, corpus: TokenCorpus, *, k: int | None = None) -> int:
    """Refusals before any work; returns V. The corpus' tokenizer must fit the model's
    vocabulary (else ids would index past the embedding or mean other tokens), its seq_len
    the model's context, and k the vocabulary."""
    V = model_vocab(model)
    tok = corpus.describe()["tokenizer"]
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    if int(tok["vocab_size"]) > V:
        raise ValueError(
            f"the corpus' tokenizer ({tok.get('path')!r}, fingerprint {tok['fingerprint'][:16]}) has "
            f"{tok['vocab_size']} ids but the teacher model ({name!r}) has a vocabulary of {V}: "
            f"label with the teacher's own tokenizer"
        )
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and corpus.seq_len > int(max_pos):
        raise ValueError(
            f"seq_len {corpus.seq_len} of corpus {corpus.name!r} is larger than the teacher model's "
            f"({name!r}) max_position_embeddings {max_pos}"
        )
    if k is not None and not 1 <= int(k) <= V:
        raise ValueError(f"k must be in [1, V={V}] (the teacher's vocabulary), got k={k}")
    return V


def _logit_batches(model, corpus, start: int, stop: int, batch_size: int, dev: torch.device, amp):
    """Yields (first position, labelled positions (B, Lb) bool numpy, logits (B, Lb, V) on
    `dev`, next-token targets (B, Lb) int64 on the host) for windows [start, stop); Lb is
    the batch's longest window (seq_len unless windows differ). Labelled: a window's real
    positions (a chat corpus: those whose target is an assistant token; corpus.label_mask)."""
    cuda = dev.type == "cuda"
    with torch.inference_mode(), torch.autocast(dev.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None):
        for a in range(start, stop, batch_size):
            pos = np.arange(a, min(a + batch_size, stop))
            n = corpus.lengths(pos)
            Lb = int(n.max())
            x = corpus.encode(pos)[:, :Lb]  # (B, Lb) int64
            if cuda:
                x = x.pin_memory().to(dev, non_blocking=True)
            # all ones: padding sits after a window's real positions and causal attention
            # never lets a real position see it (ids can't mark padding: pad may be EOS)
            mask = torch.ones_like(x)
            logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
            yield a, corpus.label_mask(pos)[:, :Lb], logits, corpus.targets(pos)[:, :Lb]


def _pad_cols(a: np.ndarray, width: int) -> np.ndarray:
    return a if a.shape[1] == width else np.concatenate([a, np.zeros((len(a), width - a.shape[1]), a.dtype)], 1)


def summaries(logits, keep: np.ndarray, spec: dict, *, a: int, L: int, seed: int, last: bool) -> dict:
    """One output's compact labels of a (B, Lb, V) logits block, computed on its device and
    copied to the host: numpy arrays of the keep.sum() labelled positions ((B, Lb) bool),
    window-major. The last consumer of the block may mask the logits in place (top-k),
    saving a copy of the block."""
    B = logits.shape[0]
    if spec["representation"] == "token_topk":
        # (M, V): only the labelled rows (a chat corpus: assistant targets) are summarised
        z = logits if keep.all() else logits[torch.from_numpy(keep).to(logits.device)]
        r = topk_token_labels(z, k=spec["k"], to_cpu=False, overwrite=last or z is not logits)
        return {key: r[key].cpu().numpy() for key in ("ids", "logprobs", "missing_mass")}
    # one generator per window, seeded by its position, over its own labelled rows: the
    # draws depend on the window alone, never on the batch it came in (rng_block = L)
    rows = torch.from_numpy(keep).to(logits.device)
    parts = [
        sampled_token_labels(
            logits[i][rows[i]], draws=spec["draws"], seed=seed, row_offset=(a + i) * L, rng_block=L, to_cpu=False
        )
        for i in range(B)
        if keep[i].any()
    ]
    parts = [{key: r[key].cpu().numpy() for key in ("ids", "counts")} for r in parts]
    return concat_labels(parts, "token_sampled")


def concat_labels(parts: list[dict], representation: str) -> dict:
    """Batches' compact labels -> one shard's (sampled: ids / counts padded to the widest)."""
    if representation == "token_sampled":
        u = max(p["ids"].shape[1] for p in parts)
        return {key: np.concatenate([_pad_cols(p[key], u) for p in parts]) for key in ("ids", "counts")}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def shard_labels(
    model: nn.Module,
    corpus: TokenCorpus,
    start: int,
    stop: int,
    *,
    specs: list[dict],
    seed: int = 0,
    batch_size: int = 8,
    dev: torch.device,
    amp: str | None = None,
) -> list[dict]:
    """The compact labels of windows [start, stop) on the host, one dict per spec
    ({"representation", "k" | "draws"}), all from the SAME forward per batch; N = the
    windows' labelled positions (sum of corpus.label_counts), window-major: top-k {"ids" (N, k)
    int64, "logprobs" (N, k) float32, "missing_mass" (N,) float32}; sampled {"ids" (N, u)
    int64, "counts" (N, u) int32} with u the largest unique-id count (padding id 0, count 0);
    a spec with "target_logprob" also gets "target_logprob" (N,) float32, the teacher's
    log-prob of each position's next token. specs=[] runs the forwards only."""
    L = corpus.seq_len
    parts: list[list[dict]] = [[] for _ in specs]
    model.eval()
    targets = [] if any(s.get("target_logprob") for s in specs) else None
    for a, keep, logits, y in _logit_batches(model, corpus, start, stop, batch_size, dev, amp):
        if not specs and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if targets is not None:  # before a top-k output masks the logits in place
            targets.append(target_logprobs(logits, y, keep))
        # sampled outputs first: a top-k output, last, masks the logits in place
        order = sorted(range(len(specs)), key=lambda j: specs[j]["representation"] == "token_topk")
        for m, j in enumerate(order):
            parts[j].append(summaries(logits, keep, specs[j], a=a, L=L, seed=seed, last=m == len(order) - 1))
        del logits  # one batch's (B, Lb, V) at a time
    out = [concat_labels(p, spec["representation"]) for spec, p in zip(specs, parts)]
    if targets is not None:
        tl = np.concatenate(targets)
        out = [o | {"target_logprob": tl} if spec.get("target_logprob") else o for spec, o in zip(specs, out)]
    return out


def target_logprobs(logits: torch.Tensor, y: torch.Tensor, keep: np.ndarray) -> np.ndarray:
    """(M,) float32 on the host: log p(y) = z_y - logsumexp(z) in fp32 at the keep.sum()
    labelled positions of a (B, Lb, V) logits block, window-major (what a cross-tokenizer
    chunk likelihood sums; one window at a time: no (B, Lb, V) fp32 copy)."""
    out = []
    for i in range(logits.shape[0]):
        rows = torch.from_numpy(keep[i]).to(logits.device)
        z = logits[i][rows].float()  # (m, V)
        t = y[i][torch.from_numpy(keep[i])].to(logits.device)
        out.append((z.gather(1, t[:, None])[:, 0] - torch.logsumexp(z, 1)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def token_rows(corpus: TokenCorpus, a: int, b: int) -> dict[str, np.ndarray]:
    """Per-token sample_ids / positions of windows [a, b): the rows a shard stores, one per
    labelled position (corpus.label_counts), numbered 0..m-1 inside each window (a chat
    window's row r is its r-th labelled position: corpus.label_mask says which)."""
    n = corpus.label_counts(np.arange(a, b))
    starts = np.repeat(np.cumsum(n) - n, n)
    return {
        "sample_ids": np.repeat(corpus.sample_ids[a:b], n),
        "positions": (np.arange(int(n.sum())) - starts).astype(np.int32),
    }


def output_spec(
    *,
    uri: str,
    representation: str = "token_topk",
    k: int | None = None,
    draws: int | None = None,
    s_max: int | None = None,
    value_dtype: str = "float16",
    tail_dtype: str = "float32",
    backend: str = "parquet",
    target_logprob: bool = False,
) -> dict:
    """One label dataset to write: where, which layout and its parameters (checked here);
    target_logprob: also store the teacher's log-prob of each position's next token (with
    the manifest's byte record: what a student with another tokenizer aligns by)."""
    if representation not in KINDS:
        raise ValueError(f"representation must be one of {list(KINDS)}, got {representation!r}")
    if representation == "token_sampled" and (not isinstance(draws, int) or draws < 1):
        raise ValueError(f"token_sampled needs draws (a positive integer), got {draws!r}")
    return {
        "uri": uri,
        "representation": representation,
        "k": k,
        "draws": draws,
        "s_max": s_max,
        "value_dtype": value_dtype,
        "tail_dtype": tail_dtype,
        "backend": backend,
        "target_logprob": bool(target_logprob),
    }


def writer_args(
    spec: dict, V: int, L: int, *, seed: int, device: torch.device, row_offset: str = "position * seq_len", **extra
) -> dict:
    """SoftLabelWriter arguments of one output (output_spec) of V-way labels of sequences of
    at most L rows; a sampled one records how its draws were seeded (generator per sequence:
    rng_block L, row_offset), so a replay draws them again. extra: more writer arguments."""
    w = {"uri": spec["uri"], "backend": spec["backend"], "representation": spec["representation"]}
    w |= {"vocab_size": V, "seq_len": L} | extra
    if spec.get("target_logprob"):
        w["store_target_logprob"] = True
    if spec["representation"] == "token_topk":
        return w | {"k": spec["k"], "dtype": spec["value_dtype"], "tail_dtype": spec["tail_dtype"]}
    sampling = {
        "seed": int(seed),
        "rng_block": L,
        "row_offset": row_offset,
        "device_type": device.type,
        "torch": torch.__version__,
    }
    s_max = spec["s_max"] if spec["s_max"] is not None else min(int(spec["draws"]), V)
    return w | {"draws": spec["draws"], "s_max": s_max, "extra": (w.get("extra") or {}) | {"sampling": sampling}}


class TokenLabeller:
    """A causal-LM teacher over every window of `corpus`: one output dataset per layout in
    `outputs` (output_spec dicts, e.g. a top-k and a sampled one), all from ONE teacher
    forward per batch: the teacher, the expensive part, runs once per window however many
    layouts are stored (labelling/loop.py runs it). Sampled draws are seeded per window, so
    a shard recomputed for one output draws the same as it did for another."""

    def __init__(
        self,
        model: nn.Module,
        corpus: TokenCorpus,
        outputs: list[dict],
        *,
        batch_size: int = 8,
        device: str = "cpu",
        amp: str | None = None,
        seed: int = 0,
        recipe: dict | None = None,
    ):
        """recipe: what the manifest's data entry records to rebuild these windows (a
        config's corpus section), for `distill inspect --replay`."""
        if not outputs:
            raise ValueError("token labelling needs at least one output")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for o in outputs:
            self.vocab_size = check_teacher(model, corpus, k=o["k"] if o["representation"] == "token_topk" else None)
        self.model, self.inputs, self.specs, self.recipe = model, corpus, list(outputs), recipe
        self.batch_size, self.seed = batch_size, seed
        self.device = resolve_device(device)
        self.amp = resolve_amp(amp, self.device)
        keep_large_blocks()  # (B, L, V) logits every batch: no mmap/munmap per block
        model.to(self.device)

    def outputs(self) -> list[dict]:
        L = self.inputs.seq_len
        return [writer_args(o, self.vocab_size, L, seed=self.seed, device=self.device) for o in self.specs]

    def rows_per_sample(self) -> np.ndarray:
        return self.inputs.label_counts(np.arange(len(self.inputs)))  # labelled tokens per window

    def data(self) -> dict:
        c = self.inputs
        return (
            {
                "name": c.name,
                "split": c.split_spec,
                "fingerprint": c.fingerprint(),
                "transform": None,
                "inputs": c.describe(),
            }
            | ({"recipe": self.recipe} if self.recipe is not None else {})
            | self._bytes()
        )

    def _bytes(self) -> dict:
        """With target log-probs: the byte stream's record (alignment.py), so that a student
        with another tokenizer can check its text is the one labelled."""
        if not any(o.get("target_logprob") for o in self.specs):
            return {}
        from pipeline.data.alignment import byte_record

        try:
            return {"bytes": byte_record(self.inputs)}
        except ValueError as e:  # a tokenizer that does not keep the text's bytes: labels still useful
            return {"bytes": {"undefined": str(e)}}

    def shard(self, start: int, stop: int, outputs: list[int]) -> list[dict]:
        labs = shard_labels(
            self.model,
            self.inputs,
            start,
            stop,
            specs=[self.specs[j] for j in outputs],
            seed=self.seed,
            batch_size=self.batch_size,
            dev=self.device,
            amp=self.amp,
        )
        rows = token_rows(self.inputs, start, stop)  # per token
        return [
            rows
            | {
                k: lab[k]
                for k in (
                    ("ids", "logprobs", "missing_mass")
                    if self.specs[j]["representation"] == "token_topk"
                    else ("ids", "counts")
                )
                + (("target_logprob",) if self.specs[j].get("target_logprob") else ())
            }
            for j, lab in zip(outputs, labs)
        ]


def label_corpus(
    model: nn.Module,
    corpus: TokenCorpus,
    uri: str,
    *,
    representation: str = "token_topk",
    k: int | None = None,
    draws: int | None = None,
    s_max: int | None = None,
    value_dtype: str = "float16",
    tail_dtype: str = "float32",
    backend: str = "parquet",
    target_logprob: bool = False,
    **kw: Any,
) -> dict:
    """Label every window of `corpus` with the causal LM `model` into a token dataset at
    `uri` and finalize it; committed shards are skipped. label_corpus_many with one output.

    token_topk: k ids per token, log-probs stored as `value_dtype` (float16 | bfloat16 |
    uint8 | float32), missing mass as `tail_dtype`. token_sampled: `draws` per token, at
    most `s_max` unique ids stored (default min(draws, V)). target_logprob: also store the
    teacher's log-prob of each next token and the text's byte record (cross-tokenizer KD).
    Returns {uri, manifest, shards: [per-shard stats], skipped, seconds, tokens_per_s}.
    """
    spec = output_spec(
        uri=uri,
        representation=representation,
        k=k,
        draws=draws,
        s_max=s_max,
        value_dtype=value_dtype,
        tail_dtype=tail_dtype,
        backend=backend,
        target_logprob=target_logprob,
    )
    return label_corpus_many(model, corpus, [spec], **kw)[0]


def label_corpus_many(
    model: nn.Module,
    corpus: TokenCorpus,
    outputs: list[dict],
    *,
    shard_size: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    amp: str | None = None,
    teacher: dict,
    storage_options: dict | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Several token-label datasets of the same corpus from ONE teacher forward per batch
    (TokenLabeller), labelled in this process by labelling/loop.py. The model is moved to
    `device` ("auto" picks CUDA when present); amp="bf16" autocasts the forward on CUDA.
    Returns one result per output, in order: {uri, manifest, shards, skipped, seconds,
    tokens_per_s}."""
    labeller = TokenLabeller(model, corpus, outputs, batch_size=batch_size, device=device, amp=amp, seed=seed)
    results = label(
        labeller,
        shard_size=shard_size,
        teacher=teacher,
        storage_options=storage_options,
        overwrite=overwrite,
        progress=progress,
    )
    return [r | {"tokens_per_s": r["rows_per_s"]} for r in results]


def lm_teacher_forward(
    model: nn.Module,
    corpus: TokenCorpus,
    *,
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    amp: str | None = None,
    representation: str | None = None,
    k: int | None = None,
    draws: int | None = None,
    seed: int = 0,
) -> dict:
    """The batches label_corpus runs for windows [start, stop), without storing: the
    forwards alone (representation=None), or with the on-device summaries too (their
    host arrays returned under "labels"). For benchmarks: labelling vs forward alone.
    Returns {sequences, tokens, seconds, tokens_per_s, labels}."""
    if representation is not None and representation not in KINDS:
        raise ValueError(f"representation must be None or one of {list(KINDS)}, got {representation!r}")
    check_teacher(model, corpus, k=k if representation == "token_topk" else None)
    stop = len(corpus) if stop is None else int(stop)
    if not 0 <= start < stop <= len(corpus):
        raise ValueError(f"need 0 <= start < stop <= {len(corpus)} (windows), got [{start}, {stop})")
    dev = resolve_device(device)
    keep_large_blocks()
    amp = resolve_amp(amp, dev)
    model.to(dev)
    specs = [] if representation is None else [{"representation": representation, "k": k, "draws": draws}]
    t0 = time.perf_counter()
    labels = shard_labels(model, corpus, start, stop, specs=specs, seed=seed, batch_size=batch_size, dev=dev, amp=amp)
    dt = time.perf_counter() - t0
    n = int(corpus.label_counts(np.arange(start, stop)).sum())
    return {
        "sequences": stop - start,
        "tokens": n,
        "seconds": dt,
        "tokens_per_s": n / dt if dt > 0 else 0.0,
        "labels": labels[0] if labels else None,
    }
