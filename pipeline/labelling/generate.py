"""Teacher-written answers (sequence-level KD, Kim & Rush 2016) stored with their per-token
labels from the same forward passes: for each prompt of a chat corpus (a conversation up to
its first assistant message), the teacher writes `answers` answers; every token it writes is
stored with the teacher's top-k log-probs + missing mass and / or sampled draws of the
distribution it was drawn from (T = 1, before any sampling temperature or top-p), and the
token itself (storage `store_tokens`). labelling/loop.py runs GenerationLabeller like any
labeller: shards, resume, finalize.

    lab = GenerationLabeller(model, corpus, outputs, answers=2, max_new_tokens=64,
                             temperature=0.7, top_p=0.9, seed=0, stop_ids=[eos])
    label(lab, shard_size=32, teacher=...)

Samples: sample i is answer i % answers to prompt i // answers (GenerationPrompts), so a
shard of samples [a, b) is a fixed set of (prompt, answer) pairs, generated in batches of
`batch_size` in that order. One batch: prompts left-padded (attention mask 0, positions from
the mask's running count), one prefill forward, then one forward of (B, 1) new tokens per
step with the key/value cache, until every row wrote a stop token or max_new_tokens. Each
step's next-token logits (B, V) are kept in fp32 on the model's device, (B, G, V) per batch:
the summaries (labelling/tokens.py summaries, the same code as labelling a corpus) come from
them at the end, only the compact results reach the host.

Seeding: row j draws its tokens with its own generator seeded from (seed, its sample id),
and its sampled labels with the corpus rule (seed, row_offset = sample * max_new_tokens): an
answer depends on its prompt, answer index and seed only, never on the batch it came in
(up to float noise between batch shapes), so a resumed run writes the same shards.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.device import AMP_DTYPES, keep_large_blocks, resolve_amp, resolve_device
from pipeline.labelling.tokens import check_teacher, concat_labels, summaries, writer_args

if TYPE_CHECKING:
    from pipeline.data.corpus import TokenCorpus


def settings(
    *, answers: int, max_new_tokens: int, temperature: float, top_p: float, seed: int, stop_ids: list[int]
) -> dict:
    """The generation settings, checked (ValueError naming the key): the lineage entry."""
    if not isinstance(answers, int) or answers < 1:
        raise ValueError(f"label.generate.answers must be an int >= 1, got {answers!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"label.generate.max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and temperature >= 0):
        raise ValueError(f"label.generate.temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"label.generate.top_p must be in (0, 1], got {top_p!r}")
    return {
        "answers": answers,
        "max_new_tokens": max_new_tokens,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
        "stop_ids": sorted(int(t) for t in stop_ids),
        "sampling": "softmax(z / temperature), nucleus top_p, torch.multinomial with a generator per answer",
        "torch": torch.__version__,
    }


class GenerationPrompts:
    """The labeller's inputs: sample i = (prompt i // answers, answer i % answers) of a chat
    corpus' prompts (TokenCorpus.prompts)."""

    def __init__(self, corpus: TokenCorpus, answers: int, limit: int | None = None, at: str = "first"):
        self.conversations, self.prompts = corpus.prompts(at)
        if limit is not None:
            self.conversations, self.prompts = self.conversations[:limit], self.prompts[:limit]
        self.corpus, self.answers, self.at = corpus, int(answers), at
        self.name = f"{corpus.name}-prompts"
        self.sample_ids = np.arange(len(self.prompts) * self.answers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def prompt(self, i: int) -> np.ndarray:
        return self.prompts[int(i) // self.answers]

    def fingerprint(self) -> str:
        """The prompts' corpus (its fingerprint: text, template, split), their count and answers."""
        key = f"{self.corpus.fingerprint()}:{len(self.prompts)}:{self.answers}" + (
            "" if self.at == "first" else ":every"
        )
        return hashlib.sha256(key.encode()).hexdigest()


def _mix(seed: int, i: int) -> int:
    """A 63-bit generator seed from (seed, sample id): splitmix64 of the pair."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(i) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def next_tokens(z: torch.Tensor, gens: list[torch.Generator], *, temperature: float, top_p: float) -> torch.Tensor:
    """(B,) the next token of each row of z (B, V) fp32 raw logits: argmax when temperature
    is 0, else a draw from softmax(z / temperature) cut to its nucleus (the smallest set of
    most probable tokens holding top_p of the mass, the most probable always kept)."""
    if temperature == 0:
        return z.argmax(-1)
    p = torch.softmax(z / temperature, -1)
    if top_p < 1:
        sp, si = p.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # the mass before a token already reaches top_p
        p = torch.zeros_like(p).scatter_(-1, si, sp.masked_fill(drop, 0.0))
    return torch.stack([torch.multinomial(p[j], 1, generator=g)[0] for j, g in enumerate(gens)])


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: list[np.ndarray],
    sample_ids: np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop_ids: list[int],
    dev: torch.device,
    amp: str | None = None,
    pad_id: int = 0,
) -> tuple[list[np.ndarray], torch.Tensor]:
    """One batch: (each row's written tokens, stop token included, as int64 arrays; their
    next-token logits (B, G, V) fp32 on dev, G the longest answer, rows past their end
    garbage)."""
    B = len(prompts)
    x, mask = left_pad(prompts, pad_id)
    x, mask = x.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    gens = [torch.Generator(device=dev).manual_seed(_mix(seed, int(s))) for s in sample_ids]
    stop = torch.tensor(sorted(stop_ids), device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps, written = [], []
    with torch.autocast(dev.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None):
        out = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(max_new_tokens):
            z = out.logits[:, -1].float()  # (B, V) the next token's logits, T = 1
            steps.append(z)
            t = next_tokens(z, gens, temperature=temperature, top_p=top_p)  # (B,)
            t = torch.where(done, torch.full_like(t, int(pad_id)), t)
            written.append(t)
            done |= torch.isin(t, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], 1)
            pos = pos[:, -1:] + 1
            # transformers 5 names the key/value cache `cache` (past_key_values before)
            out = model(input_ids=t[:, None], attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    toks = torch.stack(written, 1).cpu().numpy()  # (B, G)
    return [cut_at_stop(toks[j], stop_ids).astype(np.int64) for j in range(B)], torch.stack(steps, 1)


class GenerationLabeller:
    """The teacher writes answers to a chat corpus' prompts; one output dataset per layout
    (top-k, sampled), each row a written token with its labels and the token itself."""

    def __init__(
        self,
        model: nn.Module,
        corpus: TokenCorpus,
        outputs: list[dict],
        *,
        answers: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: list[int] | None = None,
        prompts: int | None = None,
        prompts_at: str = "first",
        batch_size: int = 8,
        device: str = "cpu",
        amp: str | None = None,
        recipe: dict | None = None,
    ):
        if not outputs:
            raise ValueError("generation needs at least one output")
        if stop_ids is None:
            stop_ids = [int(corpus.describe()["separator_id"])]
        self.settings = settings(
            answers=answers,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_ids=stop_ids,
        )
        for o in outputs:
            self.vocab_size = check_teacher(model, corpus, k=o["k"] if o["representation"] == "token_topk" else None)
        self.inputs = GenerationPrompts(corpus, answers, prompts, prompts_at)
        if len(self.inputs) == 0:
            raise ValueError(f"corpus {corpus.name!r} has no prompt (no conversation with an assistant message)")
        longest = max(len(p) for p in self.inputs.prompts)
        ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if ctx is not None and longest + max_new_tokens > int(ctx):
            raise ValueError(
                f"label.generate.max_new_tokens {max_new_tokens} + the longest prompt's {longest} tokens "
                f"exceed the teacher's context of {ctx} positions: lower max_new_tokens or corpus.seq_len"
            )
        self.model, self.specs, self.recipe = model, list(outputs), recipe
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.device = resolve_device(device)
        self.amp = resolve_amp(amp, self.device)
        self.pad_id = int(corpus.model_args()["pad_id"])
        keep_large_blocks()
        model.to(self.device).eval()

    def outputs(self) -> list[dict]:
        G = self.settings["max_new_tokens"]
        extra = {"store_tokens": True, "extra": {"generation": self.settings}}
        return [
            writer_args(
                o, self.vocab_size, G, seed=self.seed, device=self.device, row_offset="sample * max_new_tokens", **extra
            )
            for o in self.specs
        ]

    def rows_per_sample(self) -> None:
        return None  # an answer's length is known once it is written

    def data(self) -> dict:
        c, p = self.inputs.corpus, self.inputs
        return {
            "name": p.name,
            "split": c.split_spec,
            "fingerprint": p.fingerprint(),
            "transform": None,
            "inputs": c.describe(),
            "generation": self.settings
            | {
                "prompts": len(p.prompts),
                "prompts_at": p.at,
                "prompt_conversations": p.conversations.tolist(),
                "corpus": c.fingerprint(),
            },
        } | ({"recipe": self.recipe} if self.recipe is not None else {})

    @torch.inference_mode()
    def shard(self, start: int, stop: int, outputs: list[int]) -> list[dict]:
        rows: dict[str, list] = {"sample_ids": [], "positions": [], "token": []}  # the same for every output
        labs: list[list[dict]] = [[] for _ in outputs]
        G = self.settings["max_new_tokens"]
        # sampled outputs first: a top-k output, last, may mask the logits in place
        order = sorted(range(len(outputs)), key=lambda m: self.specs[outputs[m]]["representation"] == "token_topk")
        for a in range(start, stop, self.batch_size):
            sids = self.inputs.sample_ids[a : min(a + self.batch_size, stop)]
            answers, logits = generate(
                self.model,
                [self.inputs.prompt(i) for i in sids],
                sids,
                max_new_tokens=G,
                temperature=self.settings["temperature"],
                top_p=self.settings["top_p"],
                seed=self.seed,
                stop_ids=self.settings["stop_ids"],
                dev=self.device,
                amp=self.amp,
                pad_id=self.pad_id,
            )
            n = np.array([len(t) for t in answers])
            keep = np.arange(logits.shape[1])[None, :] < n[:, None]  # (B, G) written positions
            for r, m in enumerate(order):
                spec = self.specs[outputs[m]]
                labs[m].append(summaries(logits, keep, spec, a=a, L=G, seed=self.seed, last=r == len(order) - 1))
            rows["sample_ids"].append(np.repeat(sids, n))
            rows["positions"].append(np.concatenate([np.arange(k) for k in n]).astype(np.int32))
            rows["token"].append(np.concatenate(answers))
            del logits
        common = {k: np.concatenate(v) for k, v in rows.items()}
        out = []
        for m, j in enumerate(outputs):
            kind = self.specs[j]["representation"]
            keys = ("ids", "logprobs", "missing_mass") if kind == "token_topk" else ("ids", "counts")
            lab = concat_labels(labs[m], kind)
            out.append(common | {k: lab[k] for k in keys})
        return out


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, P) int64 of prompts left-padded to the longest P:
    every prompt ends at column P - 1, where generation continues."""
    P = max(len(p) for p in prompts)
    x = torch.full((len(prompts), P), int(pad_id), dtype=torch.int64)
    mask = torch.zeros((len(prompts), P), dtype=torch.int64)
    for j, p in enumerate(prompts):
        x[j, P - len(p) :] = torch.from_numpy(np.asarray(p))
        mask[j, P - len(p) :] = 1
    return x, mask


def cut_at_stop(row: np.ndarray, stop_ids) -> np.ndarray:
    """A written row up to and including its first stop token (all of it when none)."""
    hit = np.flatnonzero(np.isin(row, stop_ids))
    return row[: int(hit[0]) + 1 if len(hit) else len(row)]


def plain_generate_rate(model, prompts: list[np.ndarray], *, batch_size: int, settings: dict, device="cpu") -> dict:
    """The teacher's own `generate` (sampling with the same temperature / top-p, no labels)
    over the same prompts and batches: {tokens, seconds, tokens_per_s}. The benchmark's
    reference for what labelling the written tokens costs on top."""
    dev = resolve_device(device)
    model.to(dev).eval()
    toks, t0 = 0, time.perf_counter()
    stop = settings["stop_ids"]
    for a in range(0, len(prompts), batch_size):
        x, m = left_pad(prompts[a : a + batch_size], stop[0])
        P = x.shape[1]
        torch.manual_seed(settings["seed"] + a)
        with torch.inference_mode():
            y = (
                model.generate(
                    input_ids=x.to(dev),
                    attention_mask=m.to(dev),
                    do_sample=settings["temperature"] > 0,
                    temperature=settings["temperature"] or None,
                    top_p=settings["top_p"],
                    top_k=0,
                    max_new_tokens=settings["max_new_tokens"],
                    eos_token_id=stop,
                    pad_token_id=stop[0],
                )[:, P:]
                .cpu()
                .numpy()
            )
        toks += sum(len(cut_at_stop(row, stop)) for row in y)
    dt = time.perf_counter() - t0
    return {"tokens": toks, "seconds": dt, "tokens_per_s": toks / dt}
