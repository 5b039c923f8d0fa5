"""Stored token labels joined to a student with its own tokenizer, by bytes.

The student's windows (pipeline/data/alignment.py aligned_windows) carry the sample ids
of the teacher's: window i of both reads the same bytes. A batch holds the student's
inputs, targets and mask (B, Ls), the teacher's labels at its own positions (B, Lt, ...)
placed as SequenceStream places them, and the batch's chunks (alignment.batch_alignment):
what the cross-tokenizer losses (objectives/xtok.py) compare. Labels are found by sample
id and checked by the teacher windows' fingerprint, and the two texts by their bytes'
sha256: never paired by position index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.data.alignment import batch_alignment, vocab_maps
from pipeline.training.stream import ALIGNED_STREAM, LabelStream, SequenceStream, check_token_lineage, place_rows

LABEL_KEYS = ("topk_ids", "topk_logprobs", "missing_mass", "target_logprob")


def check_alignment_fields(manifest: dict, uri: str, bytes_sha256: str) -> None:
    """Refuse labels a student with another tokenizer cannot use: older ones without the
    target log-probs and byte record (saying how to relabel), or made on other text."""
    rep, data = manifest["representation"], manifest.get("data") or {}
    if rep.get("kind") != "token_topk":
        raise ValueError(f"labels at {uri} are {rep.get('kind')}: cross-tokenizer losses learn from token_topk labels")
    if not rep.get("target_logprob") or "bytes" not in data:
        raise ValueError(
            f"labels at {uri} have no alignment fields (target log-probs, byte record): they predate "
            f"cross-tokenizer distillation; relabel with label.target_logprob: true (the default) "
            f"into another place, e.g. distill label CONFIG label.uri=NEW_DIR"
        )
    if "sha256" not in data["bytes"]:  # labelled, but the teacher's tokens do not keep the text's bytes
        raise ValueError(f"labels at {uri} have no byte spans: {data['bytes'].get('undefined')}")
    if data["bytes"]["sha256"] != bytes_sha256:
        raise ValueError(
            f"labels at {uri} were made on text of bytes sha256 {data['bytes']['sha256'][:16]}, the "
            f"student's text has {bytes_sha256[:16]}: other text"
        )


class CrossTokenizerStream(SequenceStream):
    """token_topk labels (with target log-probs) of the teacher's windows, joined to the
    aligned student windows `inputs` (inputs.teacher_windows: the teacher's split)."""

    def __init__(self, uri: str, inputs: Any, transform=None, **kw: Any):
        LabelStream.__init__(self, uri, inputs, transform, **kw)
        if self.extra_uris:
            raise ValueError("several teachers' token labels (extra_soft_labels) are not supported")
        check_alignment_fields(self.manifest, uri, inputs.aligned_to["bytes_sha256"])
        self.teacher = inputs.teacher_windows
        check_token_lineage(self.manifest, self.teacher, uri)
        self.vocab_size, self.seq_len = int(self.manifest["vocab_size"]), int(self.manifest["seq_len"])
        # the losses' vocabulary maps: twin, prefix, heads
        self.maps = {k: torch.from_numpy(v) for k, v in vocab_maps(self.teacher, inputs).items()}

    def join(self, b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = self._common(b)
        sid = out["sample_id"].numpy()  # (B,)
        tpos, n = self.positions(self.teacher, sid, b)  # the teacher's windows hold the stored rows
        spos = self.inputs.index_of(sid)
        t_mask = torch.from_numpy(self.teacher.label_mask(tpos)[:, : int(n.max())])  # (B, Lt)
        batch = self.task.batch(self.inputs, spos, out["view"].numpy(), None)  # the student's (B, Ls)
        for key in LABEL_KEYS:
            batch[key] = place_rows(b[key], n, t_mask)
        al = batch_alignment(self.teacher, self.inputs, sid, t_mask.shape[1], batch["mask"].shape[1])
        return batch | {k: torch.from_numpy(v) for k, v in al.items()} | out


ALIGNED_STREAM[:] = [CrossTokenizerStream]  # open_label_stream's choice for aligned windows
