"""Hugging Face models as distillery teachers and students: token ids (B, L) int64 -> logits (B, C).

Built-in archs (pipeline.models.registry.LAZY_ARCHS), both loading local weights only (a directory or
`pkg:<module>/<dir>`, see pipeline.hf_files), never remote code:
    "hf-encoder"                  hf_encoder_classifier   AutoModel (a plain encoder such as the packaged
                                                          MiniLM) + mean / [CLS] pooling + our Linear head
    "hf-sequence-classification"  hf_sequence_classifier  AutoModelForSequenceClassification: the model's
                                                          own pooling; its final Linear becomes our head
Like models.Classifier: model(ids) == model.head(model.features(ids)), .feature_dim, so hint /
RKD losses and head replacement work. The attention mask is ids != pad_id (right padding). The
tokenizer must be the model's: vocab_size / pad_id from the data (models.complete_spec) are
checked against the model's config and embedding rows at build time.

Transfer learning: freeze_prefixes (names as in the backbone's named_parameters, e.g.
"embeddings", "encoder.layer.0"), freeze_embeddings + freeze_layers=N (the first N layers),
or train_only_head. Frozen parameters get requires_grad=False; param_counts() reports them.

A checkpoint of these models (pipeline.models.checkpoint) holds all weights, but rebuilding it reads
the architecture (config.json) and weights from `path` again, so the directory must still exist.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from pipeline.hf_files import (  # sets HF offline mode before transformers is imported
    MODEL_LOAD_LOCK,
    resolve_model_path,
)
from pipeline.models.freezing import freeze_by_prefix, matches
from pipeline.models.token_classifiers import check_token_ids, masked_mean

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# where a backbone keeps its list of transformer blocks (BERT-likes, Llama-likes, DistilBERT, GPT-2)
LAYER_LISTS = ("encoder.layer", "layers", "encoder.layers", "transformer.layer", "h")


def model_dir(path: str) -> str:
    """The local directory of a Hugging Face model (config.json + weights); ValueError naming it."""
    d = resolve_model_path(path, what="model")
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise ValueError(f"model path {path!r}: {d} has no config.json (not a Hugging Face model directory)")
    if not any(os.path.isfile(os.path.join(d, f)) for f in WEIGHT_FILES):
        raise ValueError(f"model path {path!r}: {d} has no weights (expected one of {list(WEIGHT_FILES)})")
    return d


@contextlib.contextmanager
def _quiet():
    """transformers logs at error level, no progress bars, no Python warnings (restored after)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load(auto_class: str, path: str, num_classes: int) -> nn.Module:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, found {num_classes!r}")
    d = model_dir(path)
    import transformers

    with open(os.path.join(d, "config.json")) as f:
        if '"auto_map"' in f.read():
            raise ValueError(
                f"model path {path!r}: {d}/config.json asks for custom code (auto_map); "
                f"distillery never runs a model's own code (trust_remote_code)"
            )
    try:
        with _quiet(), MODEL_LOAD_LOCK:
            model = getattr(transformers, auto_class).from_pretrained(
                d, local_files_only=True, trust_remote_code=False, dtype=torch.float32
            )
    except Exception as e:  # OSError, ValueError, KeyError (unknown model_type), RuntimeError...
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"model path {path!r}: cannot load {auto_class} from {d}: {type(e).__name__}: {msg}") from e
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"model path {path!r}: {type(model).__name__} is an encoder-decoder model; "
            f"distillery's HF adapters take encoders and decoders only"
        )
    return model


def _check_tokenizer(backbone: nn.Module, config, path: str, *, pad_id, vocab_size, max_length) -> int:
    """The pad id to mask with, after checking the data's tokenizer against the model."""
    rows = backbone.get_input_embeddings().num_embeddings
    if vocab_size is not None and int(vocab_size) > rows:
        raise ValueError(
            f"model {path!r}: the tokenizer has {int(vocab_size)} tokens but the model's embedding "
            f"has {rows} rows: a different tokenizer than the model's (use the tokenizer saved "
            f"with the model)"
        )
    model_pad = getattr(config, "pad_token_id", None)
    if pad_id is None and model_pad is None:
        raise ValueError(f"model {path!r}: its config has no pad_token_id; pass pad_id (the tokenizer's)")
    if pad_id is not None and model_pad is not None and int(pad_id) != int(model_pad):
        raise ValueError(
            f"model {path!r}: the tokenizer pads with id {int(pad_id)} but the model's pad_token_id "
            f"is {int(model_pad)}: a different tokenizer than the model's"
        )
    pad = int(model_pad if pad_id is None else pad_id)
    if not 0 <= pad < rows:
        raise ValueError(f"model {path!r}: pad id {pad} is outside the embedding's {rows} rows")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_length is not None and max_pos is not None and int(max_length) > int(max_pos):
        raise ValueError(
            f"model {path!r}: the data's max_length {int(max_length)} exceeds the model's "
            f"max_position_embeddings {int(max_pos)}"
        )
    return pad


# ---------------------------------------------------------------- freezing


def transformer_layers(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the backbone's transformer blocks, e.g. ("encoder.layer", ...) for BERT."""
    for name in LAYER_LISTS:
        try:
            mod = backbone.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return name, mod
    raise ValueError(
        f"{type(backbone).__name__}: cannot find its list of transformer layers "
        f"(looked for {list(LAYER_LISTS)}); freeze by freeze_prefixes instead"
    )


def _embedding_prefixes(backbone: nn.Module) -> list[str]:
    if isinstance(getattr(backbone, "embeddings", None), nn.Module):  # BERT-likes: word + position + LayerNorm
        return ["embeddings"]
    names = {id(m): n for n, m in backbone.named_modules()}
    out = [names[id(backbone.get_input_embeddings())]]  # Llama: embed_tokens, GPT-2: wte
    out += [a for a in ("wpe", "embed_positions") if isinstance(getattr(backbone, a, None), nn.Module)]
    return out


def _valid_prefixes(module: nn.Module) -> list[str]:
    tops = list(dict.fromkeys(n.split(".")[0] for n, _ in module.named_parameters()))
    try:
        name, layers = transformer_layers(module)
        tops += [f"{name}.{i}" for i in range(len(layers))]
    except ValueError:
        pass
    return tops


def _freeze(
    backbone: nn.Module,
    path: str,
    *,
    freeze_embeddings: bool,
    freeze_layers: int,
    prefixes: Iterable[str],
    train_only_head: bool,
) -> None:
    what = f"model {path!r}"
    todo = list([prefixes] if isinstance(prefixes, str) else prefixes or ())
    if freeze_embeddings:
        todo += _embedding_prefixes(backbone)
    n = int(freeze_layers or 0)
    if n < 0:
        raise ValueError(f"{what}: freeze_layers must be >= 0, found {n}")
    if n:
        name, layers = transformer_layers(backbone)
        if n > len(layers):
            raise ValueError(f"{what}: freeze_layers={n} but the model has {len(layers)} layers")
        todo += [f"{name}.{i}" for i in range(n)]
    if todo:
        freeze_by_prefix(backbone, todo, what=what, valid=_valid_prefixes(backbone))
    if train_only_head:
        backbone.requires_grad_(False)


# ---------------------------------------------------------------- the adapters


class _HFTokenModel(nn.Module):
    input_kind = "tokens"

    def __init__(self, head: nn.Linear, *, pad_id: int, vocab_rows: int, max_positions: int | None):
        super().__init__()
        self.head = head
        self.feature_dim = head.in_features
        self.pad_id = pad_id
        self._vocab_rows = vocab_rows
        self._max_positions = max_positions

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self._vocab_rows, max_length=self._max_positions, what=type(self).__name__)
        return ids != self.pad_id  # (B, L) True at real tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))  # (B, H) -> (B, C)


class HFClassifier(_HFTokenModel):
    """A Hugging Face backbone (AutoModel) + pooling + dropout + our Linear head."""

    def __init__(
        self, backbone: nn.Module, head: nn.Linear, *, pad_id: int, pooling: str = "mean", dropout: float = 0.1
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', found {pooling!r}")
        super().__init__(
            head,
            pad_id=pad_id,
            vocab_rows=backbone.get_input_embeddings().num_embeddings,
            max_positions=getattr(backbone.config, "max_position_embeddings", None),
        )
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        keep = self._mask(ids)  # (B, L)
        h = self.backbone(input_ids=ids, attention_mask=keep.long()).last_hidden_state  # (B, L, H)
        pooled = h[:, 0] if self.pooling == "cls" else masked_mean(h, keep)  # (B, H)
        return self.dropout(pooled)


class HFSequenceClassifier(_HFTokenModel):
    """AutoModelForSequenceClassification whose final Linear is replaced by Identity, so the
    HF model returns the pooled representation (B, H) the classifier saw (after its own
    pooling, pooler and dropout); our `head` is that Linear, resized to num_classes."""

    def __init__(self, model: nn.Module, head: nn.Linear, *, pad_id: int):
        base = model.base_model
        super().__init__(
            head,
            pad_id=pad_id,
            vocab_rows=base.get_input_embeddings().num_embeddings,
            max_positions=getattr(model.config, "max_position_embeddings", None),
        )
        self.model = model

    @property
    def backbone(self) -> nn.Module:
        return self.model.base_model

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        keep = self._mask(ids)  # (B, L)
        return self.model(input_ids=ids, attention_mask=keep.long()).logits  # (B, H): Identity "classifier"


def _new_head(in_features: int, num_classes: int, std: float) -> nn.Linear:
    head = nn.Linear(in_features, num_classes)
    nn.init.normal_(head.weight, std=std)  # as HF initialises its heads (initializer_range)
    nn.init.zeros_(head.bias)
    return head


def hf_encoder_classifier(
    *,
    path: str,
    num_classes: int,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    max_length: int | None = None,
    pooling: str = "mean",
    dropout: float = 0.1,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    freeze_prefixes: Iterable[str] = (),
    train_only_head: bool = False,
) -> HFClassifier:
    """AutoModel from the local `path` + `pooling` ("mean" over non-pad tokens, or "cls": the
    first token) + Dropout + a new Linear head (hidden -> num_classes). A BERT pooler, unused
    here, is kept in the weights but frozen."""
    backbone = _load("AutoModel", path, num_classes)
    pad = _check_tokenizer(backbone, backbone.config, path, pad_id=pad_id, vocab_size=vocab_size, max_length=max_length)
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        # BERT's pooler (dense + tanh on [CLS]) is not used: we pool last_hidden_state. Frozen,
        # so it gets no optimizer state and DDP sees no parameter without a gradient.
        pooler.requires_grad_(False)
    hidden = int(backbone.config.hidden_size)
    head = _new_head(hidden, int(num_classes), float(getattr(backbone.config, "initializer_range", 0.02)))
    _freeze(
        backbone,
        path,
        freeze_embeddings=freeze_embeddings,
        freeze_layers=freeze_layers,
        prefixes=freeze_prefixes,
        train_only_head=train_only_head,
    )
    return HFClassifier(backbone, head, pad_id=pad, pooling=pooling, dropout=dropout).train()


hf_encoder_classifier.input_kind = "tokens"


def _classifier_linear(model: nn.Module, path: str) -> tuple[str, nn.Linear]:
    """The last Linear outside the backbone producing num_labels outputs: BERT's `classifier`,
    RoBERTa's `classifier.out_proj`, Llama's `score`."""
    prefix = model.base_model_prefix
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not matches(n, prefix) and m.out_features == model.config.num_labels
    ]
    if not found:
        raise ValueError(f"model {path!r}: cannot find the classification Linear of {type(model).__name__}")
    return found[-1]


def hf_sequence_classifier(
    *,
    path: str,
    num_classes: int,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    max_length: int | None = None,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    freeze_prefixes: Iterable[str] = (),
    train_only_head: bool = False,
) -> HFSequenceClassifier:
    """AutoModelForSequenceClassification from the local `path`, with its own pooling. A
    fine-tuned head with num_classes outputs is kept; one with another number of labels (or
    none: a plain encoder directory) is replaced by a new Linear. Freezing names are the
    backbone's (model.base_model), as for hf_encoder_classifier; train_only_head freezes the
    whole backbone."""
    model = _load("AutoModelForSequenceClassification", path, num_classes)
    pad = _check_tokenizer(
        model.base_model, model.config, path, pad_id=pad_id, vocab_size=vocab_size, max_length=max_length
    )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad  # decoders pool at the last non-pad token and need to know it
    name, old = _classifier_linear(model, path)
    head = _new_head(old.in_features, int(num_classes), float(getattr(model.config, "initializer_range", 0.02)))
    if old.out_features == int(num_classes):  # a fine-tuned head for these classes: keep it
        head.load_state_dict(
            {"weight": old.weight, "bias": torch.zeros(old.out_features) if old.bias is None else old.bias}
        )
    model.set_submodule(name, nn.Identity())
    _freeze(
        model.base_model,
        path,
        freeze_embeddings=freeze_embeddings,
        freeze_layers=freeze_layers,
        prefixes=freeze_prefixes,
        train_only_head=train_only_head,
    )
    return HFSequenceClassifier(model, head, pad_id=pad).train()


hf_sequence_classifier.input_kind = "tokens"
