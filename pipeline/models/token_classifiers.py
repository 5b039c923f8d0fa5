"""Small students over a tokenizer's vocabulary: token ids (B, L) int64 -> logits (B, C).

Built-in archs (pipeline.models.registry.LAZY_ARCHS):
    "bag"          embedding_bag     mean of token embeddings -> MLP -> head      (fastText-like)
    "transformer"  tiny_transformer  token + position embeddings -> pre-norm TransformerEncoder
                                     -> masked mean pool -> LayerNorm -> head

Inputs are right-padded per batch with the tokenizer's pad id; a model masks every position
where ids == pad_id, so the same sentence padded to any length gives the same logits.
vocab_size / pad_id (and max_length for the transformer) come from the data
(models.complete_spec), so a checkpoint rebuilds the same model without the tokenizer.
Like models.Classifier: model(ids) == model.head(model.features(ids)), .feature_dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def check_token_ids(ids: torch.Tensor, vocab_size: int, *, max_length: int | None = None, what: str = "model") -> None:
    """ValueError unless ids is a (B, L) integer tensor of ids in [0, vocab_size) with
    L <= max_length. The value check is skipped while tracing (torch.jit.trace)."""
    if not torch.is_tensor(ids) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        desc = f"{tuple(ids.shape)} {ids.dtype}" if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"{what} takes token ids (B, L) int64, found {desc}")
    if max_length is not None and ids.shape[1] > max_length:
        raise ValueError(
            f"{what}: sequence length {ids.shape[1]} is longer than its max_length {max_length} "
            f"(truncate when tokenizing, or build the model with a larger max_length)"
        )
    if ids.numel() and not torch.jit.is_tracing():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= vocab_size:
            raise ValueError(
                f"{what}: token id {int(lo) if int(lo) < 0 else int(hi)} is outside the "
                f"vocabulary [0, {vocab_size}) (a different tokenizer?)"
            )


def _check_vocab(vocab_size, pad_id, num_classes, arch: str) -> tuple[int, int, int]:
    if vocab_size is None or int(vocab_size) < 2:
        raise ValueError(f"{arch}: vocab_size must be an int >= 2 (from the tokenizer), found {vocab_size!r}")
    if pad_id is None or not 0 <= int(pad_id) < int(vocab_size):
        raise ValueError(f"{arch}: pad_id must be a token id in [0, {vocab_size}), found {pad_id!r}")
    if int(num_classes) < 1:
        raise ValueError(f"{arch}: num_classes must be >= 1, found {num_classes!r}")
    return int(vocab_size), int(pad_id), int(num_classes)


def masked_mean(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of h (B, L, D) over the positions where keep (B, L) is True -> (B, D); a row with
    no kept position gives zeros. Pad positions are zeroed with masked_fill, not multiplied,
    so a NaN there cannot leak into the mean."""
    h = h.masked_fill(~keep.unsqueeze(-1), 0.0)  # (B, L, D)
    n = keep.sum(dim=1, keepdim=True).clamp_min(1).to(h.dtype)  # (B, 1)
    return h.sum(dim=1) / n  # (B, D)


class TokenClassifier(nn.Module):
    """Base of the token models: body features (B, F) -> Linear head (B, C)."""

    input_kind = "tokens"

    def __init__(self, head: nn.Linear, *, vocab_size: int, pad_id: int, max_length: int | None = None):
        super().__init__()
        self.head = head
        self.feature_dim = head.in_features
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.max_length = max_length

    def _check(self, ids: torch.Tensor) -> None:
        check_token_ids(ids, self.vocab_size, max_length=self.max_length, what=type(self).__name__)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))  # (B, C)


# ---------------------------------------------------------------- bag of embeddings


class EmbeddingBagClassifier(TokenClassifier):
    def __init__(
        self, *, vocab_size: int, pad_id: int, num_classes: int, dim: int, hidden: int, depth: int, dropout: float
    ):
        layers: list[nn.Module] = []
        d_in = dim
        for _ in range(depth):
            layers += [nn.Linear(d_in, hidden), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d_in = hidden
        super().__init__(nn.Linear(d_in, num_classes), vocab_size=vocab_size, pad_id=pad_id)
        # mode="mean" with padding_idx: pad ids are left out of both the sum and the count
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=pad_id)
        self.mlp = nn.Sequential(*layers)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids)
        bag = self.embed(ids)  # (B, L) -> (B, dim), mean over non-pad tokens (zeros if none)
        return self.mlp(bag)  # (B, F), F = hidden (depth >= 1) or dim


def embedding_bag(
    *,
    vocab_size: int,
    pad_id: int,
    num_classes: int,
    dim: int = 64,
    hidden: int = 128,
    depth: int = 1,
    dropout: float = 0.0,
) -> EmbeddingBagClassifier:
    """Mean of token embeddings (dim) -> depth x (Linear hidden, ReLU, Dropout) -> Linear head.
    depth=0: a linear model on the mean embedding. ~vocab_size * dim parameters."""
    vocab_size, pad_id, num_classes = _check_vocab(vocab_size, pad_id, num_classes, "bag")
    if int(dim) < 1 or int(hidden) < 1 or int(depth) < 0:
        raise ValueError(
            f"bag: dim and hidden must be >= 1 and depth >= 0, found dim={dim}, hidden={hidden}, depth={depth}"
        )
    return EmbeddingBagClassifier(
        vocab_size=vocab_size,
        pad_id=pad_id,
        num_classes=num_classes,
        dim=int(dim),
        hidden=int(hidden),
        depth=int(depth),
        dropout=float(dropout),
    )


embedding_bag.input_kind = "tokens"


# ---------------------------------------------------------------- tiny transformer


class TinyTransformer(TokenClassifier):
    def __init__(
        self,
        *,
        vocab_size: int,
        pad_id: int,
        num_classes: int,
        max_length: int,
        d_model: int,
        nhead: int,
        layers: int,
        dim_feedforward: int,
        dropout: float,
    ):
        super().__init__(nn.Linear(d_model, num_classes), vocab_size=vocab_size, pad_id=pad_id, max_length=max_length)
        self.tok = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = nn.Embedding(max_length, d_model)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # norm_first cannot use nested tensors; saying so up front avoids torch's warning
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.tok.weight[pad_id].zero_()

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids)
        B, L = ids.shape
        pad = ids == self.pad_id  # (B, L) True at padding
        pos = torch.arange(L, device=ids.device)  # (L,)
        x = self.drop(self.tok(ids) + self.pos(pos))  # (B, L, d) + (L, d) -> (B, L, d)
        # a row that is all padding would mask every key (softmax over nothing = NaN): let it
        # attend to its pads; masked_mean below still pools it over no token (zeros)
        key_pad = pad & ~pad.all(dim=1, keepdim=True)  # (B, L)
        h = self.encoder(x, src_key_padding_mask=key_pad)  # (B, L, d)
        return self.norm(masked_mean(h, ~pad))  # (B, d)


def tiny_transformer(
    *,
    vocab_size: int,
    pad_id: int,
    num_classes: int,
    max_length: int = 128,
    d_model: int = 64,
    nhead: int = 4,
    layers: int = 2,
    dim_feedforward: int = 128,
    dropout: float = 0.1,
) -> TinyTransformer:
    """Token + learned position embeddings -> `layers` pre-norm TransformerEncoder layers
    (GELU) -> mean over non-pad tokens -> LayerNorm -> Linear head. Sequences longer than
    max_length are refused (there is no position embedding for them)."""
    vocab_size, pad_id, num_classes = _check_vocab(vocab_size, pad_id, num_classes, "transformer")
    if int(max_length) < 1 or int(layers) < 1 or int(dim_feedforward) < 1:
        raise ValueError(
            f"transformer: max_length, layers and dim_feedforward must be >= 1, found "
            f"{max_length}, {layers}, {dim_feedforward}"
        )
    if int(d_model) < 1 or int(nhead) < 1 or int(d_model) % int(nhead):
        raise ValueError(f"transformer: d_model ({d_model}) must be a positive multiple of nhead ({nhead})")
    return TinyTransformer(
        vocab_size=vocab_size,
        pad_id=pad_id,
        num_classes=num_classes,
        max_length=int(max_length),
        d_model=int(d_model),
        nhead=int(nhead),
        layers=int(layers),
        dim_feedforward=int(dim_feedforward),
        dropout=float(dropout),
    )


tiny_transformer.input_kind = "tokens"
