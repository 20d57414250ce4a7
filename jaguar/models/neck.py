"""The neck between pooling and head: optional linear reduction, BNNeck (bias-frozen BatchNorm1d), dropout."""

from __future__ import annotations

import torch
from torch import nn

from jaguar.config import ModelConfig


class BNNeck(nn.BatchNorm1d):
    """BoT's BNNeck: a BatchNorm1d whose shift stays zero, so the embedding is only re-scaled per channel
    (metric losses see the feature before it, the classifier the one after it)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.bias.requires_grad_(False)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


class Neck(nn.Module):
    """pooled -> (Linear+BN reduction) -> features -> (BNNeck) -> embedding; dropout is applied by
    `head_input` so the retrieval embedding never sees it."""

    def __init__(self, in_dim: int, reduce_dim: int = 0, bnneck: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.reduction: nn.Module = nn.Identity()
        self.out_dim = in_dim
        if reduce_dim > 0:
            linear = nn.Linear(in_dim, reduce_dim, bias=False)
            nn.init.kaiming_normal_(linear.weight, mode="fan_out")
            self.reduction = nn.Sequential(linear, nn.BatchNorm1d(reduce_dim))
            self.out_dim = reduce_dim
        self.bnneck: nn.Module = BNNeck(self.out_dim) if bnneck else nn.Identity()
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features for triplet/center losses, embedding for the head and retrieval)."""
        features = self.reduction(pooled)
        return features, self.bnneck(features)

    def head_input(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.dropout(embedding)


def build_neck(model_cfg: ModelConfig, in_dim: int) -> Neck:
    return Neck(in_dim, model_cfg.reduce_dim, model_cfg.neck == "bnneck", model_cfg.dropout)
