"""Language-model students that start from weights: pruned from the teacher, or a pretrained
Hugging Face directory. Both are spent with the teacher's stored labels like any student.

    student = pruned(teacher=teacher_dir, num_classes=V, keep_every=3)          # arch "pruned"
    student = pruned(teacher=teacher_dir, num_classes=V, keep_layers=[0, 4, 8], mlp_keep=0.5)
    student = pretrained(path="models/my-135m", num_classes=V, tokenizer_fingerprint=fp)  # "hf-causal-lm"

Depth pruning keeps chosen decoder layers of the teacher, in order, with their weights
(the embeddings, final norm and head too): a third of SmolLM2's 30 layers is `keep_every:
3` (layers 0, 3, ..., 27). Width pruning (`mlp_keep`, a fraction) keeps the MLP channels of
each kept layer with the largest weight-magnitude importance ||gate_i||·||up_i||·||down_:,i||
(no calibration data needed; Minitron ranks by activations on a calibration set, Sheared-
LLaMA learns masks: both at a scale far beyond this). Then distillation from the stored
labels recovers what pruning lost (Sanh et al. 2019, DistilBERT: a student initialised
from every other teacher layer; Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation" (Minitron); Xia et al. 2024, Sheared-LLaMA).

The architectures: decoders whose config has num_hidden_layers and intermediate_size and
whose MLP is gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2, SmolLM); others are
refused by name. Every check is in check_pruning / check_pretrained, run by preflight
before any work (nothing trained or written) and again by the factories.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from pipeline.models.causal_lm import CausalLM

MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _config(path: str, what: str) -> dict:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise ValueError(f"{what} {path}: no config.json (not a Hugging Face model directory)")
    with open(f) as fh:
        return json.load(fh)


def kept_layers(num_layers: int, keep_layers: list[int] | None, keep_every: int | None) -> list[int]:
    """The teacher layers a pruned student keeps, ascending. ValueError naming the key."""
    if (keep_layers is None) == (keep_every is None):
        raise ValueError("pruned student: give kwargs.keep_layers (a list of layer indices) or kwargs.keep_every, one")
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise ValueError(f"pruned student: kwargs.keep_every must be an integer >= 1, got {keep_every!r}")
        return list(range(0, num_layers, keep_every))
    if not isinstance(keep_layers, (list, tuple)) or not keep_layers:
        raise ValueError(
            f"pruned student: kwargs.keep_layers must be a non-empty list of layer indices, got {keep_layers!r}"
        )
    bad = [i for i in keep_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"pruned student: kwargs.keep_layers {bad} out of range: the teacher has {num_layers} "
            f"layers (0..{num_layers - 1})"
        )
    if len(set(keep_layers)) != len(keep_layers):
        raise ValueError(f"pruned student: kwargs.keep_layers {list(keep_layers)} names a layer twice")
    return sorted(keep_layers)


def check_pruning(
    teacher: str, keep_layers: list[int] | None = None, keep_every: int | None = None, mlp_keep: float | None = None
) -> dict:
    """The pruned student's shape from the teacher's config.json alone: {"layers": kept,
    "intermediate": width}. ValueError naming the key that is wrong."""
    cfg = _config(teacher, "teacher")
    for key in ("num_hidden_layers", "intermediate_size"):
        if key not in cfg:
            raise ValueError(f"pruned student: the teacher's config ({cfg.get('model_type')!r}) has no {key}")
    layers = kept_layers(int(cfg["num_hidden_layers"]), keep_layers, keep_every)
    width = int(cfg["intermediate_size"])
    if mlp_keep is not None:
        if isinstance(mlp_keep, bool) or not isinstance(mlp_keep, (int, float)) or not 0 < mlp_keep <= 1:
            raise ValueError(f"pruned student: kwargs.mlp_keep must be a fraction in (0, 1], got {mlp_keep!r}")
        width = max(1, round(width * float(mlp_keep)))
    return {"layers": layers, "intermediate": width}


def _mlp_channels(mlp: nn.Module, width: int) -> torch.Tensor:
    """The `width` channels of a gated MLP with the largest ||gate_i||·||up_i||·||down_:,i||, ascending."""
    g, u, d = (getattr(mlp, n).weight.detach().float() for n in MLP_NAMES)  # (I, H), (I, H), (H, I)
    score = g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)  # (I,)
    return score.topk(width).indices.sort().values


def pruned(
    *,
    teacher: str,
    num_classes: int,
    keep_layers: list[int] | None = None,
    keep_every: int | None = None,
    mlp_keep: float | None = None,
) -> CausalLM:
    """The teacher at `teacher` (a Hugging Face causal-LM directory) with only the chosen
    layers, and optionally narrower MLPs, initialised from its weights (module doc).
    num_classes: the stored labels' vocabulary, which must be the teacher's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models.gguf import load_causal_lm

    shape = check_pruning(teacher, keep_layers, keep_every, mlp_keep)
    src = load_causal_lm(teacher)
    if src.config.vocab_size != num_classes:
        raise ValueError(
            f"pruned student: the teacher at {teacher} has vocab_size {src.config.vocab_size}, the labels {num_classes}"
        )
    cfg = AutoConfig.from_pretrained(teacher, local_files_only=True)
    cfg.num_hidden_layers, cfg.intermediate_size = len(shape["layers"]), shape["intermediate"]
    if getattr(cfg, "layer_types", None) is not None:  # per-layer attention kinds follow their layers
        cfg.layer_types = [cfg.layer_types[i] for i in shape["layers"]]
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    old = src.model.layers
    for new_i, old_i in enumerate(shape["layers"]):
        layer = old[old_i]
        if shape["intermediate"] != src.config.intermediate_size:
            mlp = layer.mlp
            if not all(hasattr(mlp, n) for n in MLP_NAMES):
                raise ValueError(
                    f"pruned student: mlp_keep needs a gated MLP ({'/'.join(MLP_NAMES)}); the teacher's is not"
                )
            keep = _mlp_channels(mlp, shape["intermediate"])
            with torch.no_grad():
                for n in ("gate_proj", "up_proj"):
                    getattr(mlp, n).weight = nn.Parameter(getattr(mlp, n).weight[keep].clone())
                mlp.down_proj.weight = nn.Parameter(mlp.down_proj.weight[:, keep].clone())
        dst.model.layers[new_i].load_state_dict(layer.state_dict())
    rest = {k: v for k, v in src.state_dict().items() if not k.startswith("model.layers.")}
    missing, unexpected = dst.load_state_dict(rest, strict=False)
    if unexpected or any(not k.startswith("model.layers.") for k in missing):
        raise ValueError(f"pruned student: the teacher's weights do not fit ({unexpected or missing})")
    if getattr(cfg, "tie_word_embeddings", False):
        dst.tie_weights()
    return CausalLM(dst.train())


pruned.input_kind = "tokens"


def check_pretrained(path: str, num_classes: int | None = None, tokenizer_fingerprint: str | None = None) -> str:
    """A pretrained student directory that can learn from these labels: config.json and
    weights there, the labels' vocabulary, the teacher's tokenizer (its fingerprint, computed
    from the directory's tokenizer files). ValueError naming the path; returns the directory."""
    from pipeline.hf_files import load_tokenizer, resolve_model_path
    from pipeline.hf_files import tokenizer_fingerprint as fingerprint_of

    d = resolve_model_path(path, what="pretrained student (kwargs.path)")
    cfg = _config(d, "pretrained student kwargs.path")
    if not any(os.path.isfile(os.path.join(d, f)) for f in WEIGHT_FILES):
        raise ValueError(
            f"pretrained student kwargs.path {path}: no weights there (expected one of {list(WEIGHT_FILES)})"
        )
    if num_classes is not None and int(cfg.get("vocab_size", -1)) != int(num_classes):
        raise ValueError(
            f"pretrained student kwargs.path {path}: vocab_size {cfg.get('vocab_size')}, but the teacher's labels "
            f"cover {num_classes} token ids: a student must share the teacher's vocabulary"
        )
    if tokenizer_fingerprint is not None:
        try:
            fp = fingerprint_of(load_tokenizer(d))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"pretrained student kwargs.path {path}: no tokenizer to compare with the teacher's ({e})"
            ) from None
        if fp != tokenizer_fingerprint:
            raise ValueError(
                f"pretrained student kwargs.path {path}: its tokenizer has fingerprint {fp[:16]}, the teacher's "
                f"{tokenizer_fingerprint[:16]}: its token ids would name other tokens than the stored labels'"
            )
    return d


@torch.no_grad()
def block_influence(model: nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Each decoder layer's block influence on these windows (Men et al. 2024, ShortGPT):
    BI_i = 1 − mean over positions of cos(x_i, y_i), x_i / y_i the hidden states entering /
    leaving layer i. A layer that barely turns its input (BI near 0) is the cheapest to
    drop: keep the layers with the largest BI (their indices as keep_layers).
    input_ids (B, L) int64; a Hugging Face causal LM (or a CausalLM around one)."""
    m = model.model if isinstance(model, CausalLM) else model
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x, out[0] if isinstance(out, tuple) else out))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in m.model.layers]
    try:
        m(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    cos = torch.nn.functional.cosine_similarity
    return [float(1 - cos(x.flatten(0, 1).float(), y.flatten(0, 1).float(), dim=-1).mean()) for x, y in seen]


def pretrained(*, path: str, num_classes: int, tokenizer_fingerprint: str | None = None) -> CausalLM:
    """A pretrained Hugging Face causal LM from a local directory (arch "hf-causal-lm"),
    checked by check_pretrained, in float32, in training mode."""
    from pipeline.models.gguf import load_causal_lm

    d = check_pretrained(path, num_classes, tokenizer_fingerprint)
    return CausalLM(load_causal_lm(d).train())


pretrained.input_kind = "tokens"
