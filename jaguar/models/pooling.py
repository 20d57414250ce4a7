"""Global pooling of a backbone's feature grid into one vector: GeM (learnable p), avg, max, avgmax, cls."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from jaguar.config import ConfigError, ModelConfig
from jaguar.models.backbone import BackboneFeatures

_POWER_LIMIT = 2.0 ** 100


class GeM(nn.Module):
    """Generalised mean pooling, (mean x^p)^(1/p) over positions; p=1 is average, p→∞ is max
    (Radenović et al.). B x C x h x w -> B x C, in the input's dtype.

    Activations are clamped at `eps` (GeM is defined for positive inputs) and p at 1 (below 1 the
    mean favours small responses, which is never what a retrieval feature wants). The power is taken
    in fp32; where x^p would leave fp32's comfortable range (mean x^p underflows for an all-zero
    channel once eps^p < 1e-38, i.e. p > ~6.3, and x^p overflows for large activations) the channel is computed as
    max * (mean (x / max)^p)^(1/p), the same value, so output and gradients stay finite for any p."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        initial = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(initial)
        else:
            self.register_buffer("p", initial)
        self.eps = eps

    def current_p(self) -> float:
        return float(self.p.detach().clamp(min=1.0).item())

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        p = self.p.float().clamp(min=1.0)
        clamped = grid.float().clamp(min=self.eps)
        peak = clamped.detach().amax(dim=(-2, -1), keepdim=True)
        with torch.no_grad():
            # 2^+-100 leaves fp32 headroom for the backward's x^p * log(x) and mean^(1/p - 1) terms.
            in_range = ((peak[..., 0, 0].pow(p) <= _POWER_LIMIT)
                        & (clamped.pow(p).mean(dim=(-2, -1)) >= 1.0 / _POWER_LIMIT))
        # The direct form where it is exact (bit for bit what it always was). Channels out of range
        # see 1.0 there, so that branch's backward stays finite (a where() alone would pass 0 * inf).
        direct_input = torch.where(in_range[..., None, None], clamped, torch.ones_like(clamped))
        direct = direct_input.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        # peak is a constant per channel (GeM is 1-homogeneous), so only (x / peak) <= 1 is raised to p.
        rescaled = (clamped / peak).pow(p).mean(dim=(-2, -1)).pow(1.0 / p) * peak[..., 0, 0]
        return torch.where(in_range, direct, rescaled).to(grid.dtype)


class GlobalPool(nn.Module):
    """Pools BackboneFeatures to B x C with the configured method."""

    def __init__(self, method: str, gem_p: float = 3.0, gem_learnable: bool = True) -> None:
        super().__init__()
        self.method = method
        self.gem: Optional[GeM] = None
        self.pool: Optional[nn.Module] = None
        if method == "gem":
            self.gem = GeM(gem_p, gem_learnable)
        elif method in ("avg", "max", "avgmax"):
            # timm's avgmax is 0.5 * (avg + max): the sum up to a constant the neck's BN removes.
            self.pool = SelectAdaptivePool2d(pool_type=method, flatten=True)

    def gem_p(self) -> Optional[float]:
        return self.gem.current_p() if self.gem is not None else None

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        if self.method == "cls":
            if features.cls_token is None:
                raise ConfigError("model.pooling=cls needs a token backbone with a class token (ViT, EVA); "
                                  "use model.pooling=gem or avg for this backbone")
            return features.cls_token
        if self.gem is not None:
            return self.gem(features.grid)
        return self.pool(features.grid)


def build_pooling(model_cfg: ModelConfig) -> GlobalPool:
    return GlobalPool(model_cfg.pooling, model_cfg.gem_p, model_cfg.gem_learnable)
