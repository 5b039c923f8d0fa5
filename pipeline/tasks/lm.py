"""Language models: a row is a window of the corpus (a sequence of up to seq_len tokens),
a batch is its input ids x (B, Lb), next-token targets y (B, Lb) and mask (B, Lb) of real
positions, cut to the batch's longest window; a token is the unit counted. The metric is
perplexity (lower is better), the export a Hugging Face directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.device import keep_large_blocks
from pipeline.models.causal_lm import perplexity, save_pretrained
from pipeline.models.registry import param_counts

if TYPE_CHECKING:
    from pipeline.data.corpus import TokenCorpus
    from pipeline.views.base import Transform


class LanguageModelTask:
    name, metric, higher_is_better, unit = "lm", "perplexity", False, "tokens"

    def prepare(self) -> None:
        keep_large_blocks()  # (B, L, V) logits every step: no mmap/munmap per block

    def labelled(self, data: TokenCorpus) -> bool:
        return True  # the next tokens are the targets

    def batch(
        self, corpus: TokenCorpus, pos: np.ndarray, views: np.ndarray, transform: Transform | None = None
    ) -> dict[str, torch.Tensor]:
        if transform is not None and np.asarray(views).any():
            raise ValueError(f"corpus {corpus.name!r}: language-model windows have no views (view 0 only)")
        b = corpus.lm_batch(pos)  # (B, Lb) each
        return {"x": b["input_ids"], "y": b["targets"], "mask": b["mask"]}

    def units(self, batch: dict) -> torch.Tensor:
        return (batch["weight"][:, None] * batch["mask"]).sum()

    def score(self, model: nn.Module, corpus: TokenCorpus, *, device: torch.device | str) -> float:
        return perplexity(model, corpus, device=device)["perplexity"]

    def evaluate(
        self,
        model: nn.Module,
        corpus: TokenCorpus,
        *,
        teacher_logits: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ) -> dict:
        """perplexity, nll (mean nats per token), tokens, params; bits_per_byte and bytes
        where the tokens stand for the text's bytes (comparable across tokenizers)."""
        p = perplexity(model, corpus, device=device)
        return {
            "perplexity": p["perplexity"],
            "nll": p["loss"],
            "tokens": p["tokens"],
            "params": param_counts(model)["params"],
        } | {k: p[k] for k in ("bits_per_byte", "bytes") if k in p}

    def export(
        self,
        model: nn.Module,
        out_dir: str,
        name: str,
        example: TokenCorpus,
        *,
        quantize: bool = False,
        tokenizer_dir: str | None = None,
    ) -> dict:
        """A Hugging Face directory (config, safetensors, the tokenizer) at out_dir/name."""
        import os

        return {"hf_dir": save_pretrained(model, os.path.join(out_dir, name), tokenizer_dir=tokenizer_dir)}
