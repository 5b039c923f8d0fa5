"""The classifier seam: every dense-input model is a `body` mapping inputs to a penultimate
feature vector (B, F) and a linear `head` (F -> num_classes). Hint / relational (RKD) losses
use `model.features(x)`; `model(x) == model.head(model.features(x))`."""

from __future__ import annotations

import torch
import torch.nn as nn


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head
        self.feature_dim = head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)
