"""The ReID model: backbone -> pooling -> neck -> head, with the inference embedding and the
normalisation constants of the backbone's pretrained weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from jaguar.config import Config
from jaguar.models.backbone import Backbone, build_backbone
from jaguar.models.heads import build_head
from jaguar.models.neck import Neck, build_neck
from jaguar.models.pooling import GlobalPool, build_pooling


@dataclass
class ReIDOutput:
    features: torch.Tensor  # B x D before the BNNeck (triplet / center losses)
    embedding: torch.Tensor  # B x D after the BNNeck (retrieval)
    similarity: torch.Tensor  # B x classes, the head's margin-free similarity (the criterion applies margins)


class ReIDModel(nn.Module):
    """images -> ReIDOutput for training; `embed(images)` -> B x D for retrieval (not normalised)."""

    def __init__(self, backbone: Backbone, pooling: GlobalPool, neck: Neck, head: nn.Module,
                 num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.neck = neck
        self.head = head
        self.num_classes = num_classes
        self.embed_dim = neck.out_dim
        data_config = backbone.data_config()
        self.mean: tuple[float, ...] = tuple(float(v) for v in data_config["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in data_config["std"])

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooling(self.backbone(images))
        return self.neck(pooled)

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        features, embedding = self._features(images)
        similarity = self.head(self.neck.head_input(embedding))
        return ReIDOutput(features=features, embedding=embedding, similarity=similarity)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The retrieval embedding (post-neck, not L2-normalised), B x D in fp32; call under eval()
        and no_grad(). Images are cast to the weights' dtype (bf16 under DeepSpeed bf16)."""
        weight_dtype = self.head.weight.dtype
        return self._features(images.to(weight_dtype))[1].float()

    def gem_p(self) -> Optional[float]:
        """The current GeM exponent (for TensorBoard), or None when pooling is not GeM."""
        return self.pooling.gem_p()

    def dropped_weight_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the backbone layers dropped as unreached (Backbone.dropped): a
        checkpoint saved before they were dropped still holds them, unused."""
        return tuple(f"backbone.net.{name}." for name in self.backbone.dropped)

    def head_modules(self) -> nn.ModuleList:
        """Everything trained from scratch (pooling, neck, head): the optimizer's head-LR groups."""
        return nn.ModuleList([self.pooling, self.neck, self.head])


def build_model(cfg: Config, num_classes: int, load_pretrained: bool = True) -> ReIDModel:
    """Build the ReID model described by `cfg.model` for `num_classes` training identities
    (load_pretrained=False: without the pretrained weights, for a model whose checkpoint is loaded next).

    Every parameter left trainable gets a gradient from the configured losses, as DDP requires of
    the module it wraps without find_unused_parameters: backbone layers forward_features never
    reaches are dropped (Backbone.dropped), and with loss.ce_weight=0 the head and the BNNeck's
    scale, which only the cross-entropy trains, are frozen (the BNNeck still normalises the
    embedding with its running statistics)."""
    backbone = build_backbone(cfg.model, load_pretrained=load_pretrained)
    pooling = build_pooling(cfg.model)
    neck = build_neck(cfg.model, backbone.num_features)
    head = build_head(cfg.model, neck.out_dim, num_classes)
    if cfg.loss.ce_weight == 0:
        head.requires_grad_(False)
        neck.bnneck.requires_grad_(False)
    return ReIDModel(backbone, pooling, neck, head, num_classes)
