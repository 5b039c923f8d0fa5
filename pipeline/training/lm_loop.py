"""Training a language-model student: next-token cross-entropy on the corpus alone, or
distillation from stored token labels streamed shard by shard (pipeline/training/token_stream.py).

    cfg = LMTrainConfig(loss="topk_kl", alpha=0.0, epochs=2, batch_size=8, lr=3e-3)
    out = train_lm_student(student, train_corpus, val_corpus, cfg, labels_uri="runs/lm/labels/topk")

One loop for every loss, read top to bottom:

    for epoch:                      batches of B windows, shuffled per (seed, epoch)
        logits = student(x)         (B, L, V) in the student's dtype
        loss   = ce | lm_kd_loss    fp32, chunked over rows (never a (B, L, V) teacher)
        AdamW step, grad clip, warmup + cosine learning rate

"ce" (the baseline) reads windows straight from the corpus; every other loss reads the
stored labels of the same windows through StoredTokenStream, whose epoch holds the same
number of batches of the same size: equal optimizer steps, so a comparison of students
measures the labels and nothing else. The teacher never runs here.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.device import keep_large_blocks, resolve_device
from pipeline.objectives.tokens import LM_LOSSES, lm_kd_loss, next_token_ce
from pipeline.models.causal_lm import causal_logits, perplexity

LOSSES = ("ce", *LM_LOSSES)
LABEL_KIND = {"topk_kl": "token_topk", "reverse_kl": "token_topk", "jsd": "token_topk", "sampled_kl": "token_sampled"}


@dataclass
class LMTrainConfig:
    loss: str = "ce"                 # ce | topk_kl | reverse_kl | jsd | sampled_kl
    alpha: float = 0.0               # weight of next-token CE next to the KD term (ignored by "ce")
    temperature: float = 1.0         # applied to the stored T = 1 log-probs at train time (top-k losses)
    epochs: int = 1
    batch_size: int = 8              # windows per step
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0             # DataLoader workers reading label shards
    chunk_size: int = 512            # loss rows per chunk (bounds the fp32 (rows, V) intermediates)
    eval_batch_size: int = 16

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or (self.loss == "sampled_kl" and self.temperature != 1.0):
            raise ValueError(f"temperature must be > 0 (and 1 for sampled_kl), got {self.temperature}")
        for name in ("epochs", "batch_size", "eval_batch_size", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("lr must be > 0; weight_decay, warmup_steps and num_workers >= 0")


def lr_at(step: int, total: int, cfg: LMTrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 10% of it at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def _corpus_batches(corpus, batch_size: int, seed: int, epoch: int):
    """The CE baseline's batches: every window once per epoch, shuffled per (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(corpus))
    for a in range(0, len(order), batch_size):
        b = corpus.lm_batch(order[a:a + batch_size])                           # (B, Lb) ids, targets, mask
        yield b | {"weight": torch.ones(len(b["mask"]))}


def _label_loader(stream, num_workers: int):
    from torch.utils.data import DataLoader
    if num_workers == 0:
        return stream
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=True,
                      multiprocessing_context="forkserver")


def _to(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_terms(student, batch: dict, cfg: LMTrainConfig) -> dict[str, torch.Tensor]:
    """The named loss terms of one batch: {"loss", and "task_loss" / "kd_loss" as they apply}."""
    logits = causal_logits(student, batch["input_ids"])                        # (B, L, V)
    mask = batch["mask"]                                                       # (B, L): real positions
    w = batch["weight"][:, None] * mask                                        # 0 on pad sequences and after an end
    if cfg.loss == "ce":
        V = logits.shape[-1]
        ce = next_token_ce(logits.reshape(-1, V), batch["targets"].reshape(-1), weights=w.reshape(-1),
                           chunk_size=cfg.chunk_size)
        return {"loss": ce, "task_loss": ce}
    return lm_kd_loss(logits, batch, loss=cfg.loss, alpha=cfg.alpha, temperature=cfg.temperature,
                      chunk_size=cfg.chunk_size, mask=mask, weights=w)


def train_lm_student(student, train_corpus, val_corpus, cfg: LMTrainConfig, *, labels_uri: str | None = None,
                     storage_options: dict | None = None, expect: dict | None = None,
                     progress: Callable[[dict], None] | None = None) -> dict:
    """Train `student` in place; returns {steps, tokens, seconds, train_tokens_per_s,
    final_train_loss, history: [{epoch, step, loss}], val: perplexity(...)}.
    labels_uri is needed by every loss but "ce" and must hold labels of `train_corpus`'
    windows made with its tokenizer (refused otherwise, before any step)."""
    from pipeline.training.token_stream import StoredTokenStream
    dev = resolve_device(cfg.device)
    keep_large_blocks()                 # (B, L, V) logits every step: no mmap/munmap per block
    stream = None
    if cfg.loss != "ce":
        if labels_uri is None:
            raise ValueError(f"loss {cfg.loss!r} learns from stored token labels: give labels_uri")
        stream = StoredTokenStream(labels_uri, train_corpus, batch_size=cfg.batch_size, seed=cfg.seed,
                                   storage_options=storage_options, expect=expect)
        want = LABEL_KIND[cfg.loss]
        if stream.kind != want:
            raise ValueError(f"loss {cfg.loss!r} needs {want!r} labels, but {labels_uri} holds {stream.kind!r}")
        steps_per_epoch = stream.num_batches(cfg.num_workers)
    else:
        steps_per_epoch = math.ceil(len(train_corpus) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    student.to(dev).train()
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    loader = None if stream is None else _label_loader(stream, cfg.num_workers)
    history, step, tokens, train_s = [], 0, 0, 0.0
    for epoch in range(cfg.epochs):
        if stream is not None:
            stream.set_epoch(epoch)
            batches = iter(loader)
        else:
            batches = _corpus_batches(train_corpus, cfg.batch_size, cfg.seed, epoch)
        t0 = time.perf_counter()
        for batch in batches:
            batch = _to(batch, dev)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            terms = loss_terms(student, batch, cfg)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            tokens += int((batch["weight"][:, None] * batch["mask"]).sum().item())
            rec = {"epoch": epoch, "step": step, "total_steps": total,
                   **{k: float(v.detach()) for k, v in terms.items()}}
            history.append(rec)
            if progress is not None:
                progress(rec)
        train_s += time.perf_counter() - t0
    if step != total:   # the stream's epoch must be the planned number of batches
        raise RuntimeError(f"trained {step} steps, planned {total}")
    student.eval()
    val = perplexity(student, val_corpus, batch_size=cfg.eval_batch_size, device=dev)
    tail = [h["loss"] for h in history[-max(1, steps_per_epoch // 4):]]
    return {"steps": step, "tokens": tokens, "seconds": train_s,
            "train_tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
            "final_train_loss": float(np.mean(tail)), "history": history, "val": val,
            "config": dataclasses.asdict(cfg)}
