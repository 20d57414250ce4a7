"""Classification heads for identity training: ArcFace, sub-center ArcFace, CosFace and a plain softmax.

A head is two parts: a similarity (cosine to the class centres, or linear logits for softmax), which
is the model's `head`, and a parameter-free margin that turns similarities into logits given the target
labels, which belongs to the loss (`ReIDCriterion` applies it, once per target set under mixup).
Both stay finite, with bounded gradients, for every input: an embedding of zero length, cos = +-1, and
fp32/bf16/fp16 inputs (the cosines and margins are computed in fp32)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from jaguar.config import ConfigError, ModelConfig

_COS_EPS = 1e-6  # keeps acos-free ArcFace away from |cos| = 1, where sqrt(1 - cos^2) has an infinite slope
# Features are divided by max(|x|, _NORM_FLOOR): the gradient of x / |x| grows as 1 / |x| (1e13 at
# torch's default 1e-12 for an all-zero embedding, inf in fp16), so a shorter embedding is only scaled.
# Real embeddings are far longer (about sqrt(D) after the BNNeck); with it, the feature gradient stays
# below about 1.5 * scale / _NORM_FLOOR, finite in fp16 for scales up to ~400.
_NORM_FLOOR = 1e-2


def _fp32(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class NoMargin(nn.Module):
    """Logits are the similarities themselves (softmax head)."""

    def forward(self, similarity: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return similarity.float()


class CosFaceMargin(nn.Module):
    """s * (cos θ - m) on the target class, s * cos θ elsewhere."""

    def __init__(self, scale: float, margin: float) -> None:
        super().__init__()
        self.scale, self.margin = float(scale), float(margin)

    def forward(self, cosine: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        cosine = cosine.float()
        if labels is None:
            return self.scale * cosine
        one_hot = F.one_hot(labels.long(), cosine.shape[1]).to(cosine.dtype)
        return self.scale * (cosine - self.margin * one_hot)


class ArcFaceMargin(nn.Module):
    """s * cos(θ + m) on the target class, s * cos θ elsewhere (Deng et al.), computed in fp32.

    When θ + m would pass π the target logit falls back to cos θ - m·sin(m) (keeps it monotonic in θ);
    with easy_margin the margin is applied only where cos θ > 0."""

    def __init__(self, scale: float, margin: float, easy_margin: bool = False) -> None:
        super().__init__()
        self.scale, self.margin, self.easy_margin = float(scale), float(margin), easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def forward(self, cosine: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        with _fp32(cosine.device):
            cosine = cosine.float().clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
            if labels is None:
                return self.scale * cosine
            target_cos = cosine.gather(1, labels.long().view(-1, 1))
            sine = (1.0 - target_cos * target_cos).clamp(min=0.0).sqrt()
            shifted = target_cos * self.cos_m - sine * self.sin_m
            if self.easy_margin:
                shifted = torch.where(target_cos > 0, shifted, target_cos)
            else:
                shifted = torch.where(target_cos > self.threshold, shifted, target_cos - self.fallback)
            logits = cosine.scatter(1, labels.long().view(-1, 1), shifted)
            return self.scale * logits


class CosineClassifier(nn.Module):
    """Cosine similarity between L2-normalised features and k L2-normalised centres per class
    (max over the k sub-centres), in fp32."""

    def __init__(self, in_dim: int, num_classes: int, subcenters: int = 1) -> None:
        super().__init__()
        self.num_classes, self.subcenters = num_classes, subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, in_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with _fp32(features.device):
            cosine = F.linear(F.normalize(features.float(), dim=1, eps=_NORM_FLOOR),
                              F.normalize(self.weight.float(), dim=1))
        if self.subcenters > 1:
            cosine = cosine.view(-1, self.num_classes, self.subcenters).amax(dim=2)
        return cosine


class LinearClassifier(nn.Linear):
    """BoT's bias-free linear classifier."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes, bias=False)
        nn.init.normal_(self.weight, std=0.001)


def build_margin(model_cfg: ModelConfig) -> nn.Module:
    """The parameter-free margin of `model.head` (shared by the head and the mixup-aware criterion)."""
    kind = model_cfg.head
    if kind in ("arcface", "subcenter_arcface"):
        return ArcFaceMargin(model_cfg.head_scale, model_cfg.head_margin, model_cfg.easy_margin)
    if kind == "cosface":
        return CosFaceMargin(model_cfg.head_scale, model_cfg.head_margin)
    return NoMargin()  # softmax


def build_head(model_cfg: ModelConfig, in_dim: int, num_classes: int) -> nn.Module:
    """The similarity part of `model.head` over `in_dim` features for `num_classes` identities:
    features (B x in_dim) -> B x num_classes cosines (margin heads) or linear logits (softmax)."""
    if num_classes < 1:
        raise ConfigError(f"the training data has {num_classes} identities; a head needs at least one")
    if model_cfg.head == "softmax":
        return LinearClassifier(in_dim, num_classes)
    subcenters = model_cfg.subcenters if model_cfg.head == "subcenter_arcface" else 1
    return CosineClassifier(in_dim, num_classes, subcenters)
