"""Mixup on a batch: images blended with a permutation of the same batch, weight lam ~ Beta(a, a).

The loss is then lam * loss(labels_a) + (1 - lam) * loss(labels_b). Metric losses on identities
(triplet, center) have no meaning for a blended image; the trainer should apply them only to
batches that were not mixed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

MixupResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def mixup_batch(images: torch.Tensor, labels: torch.Tensor, alpha: float, prob: float,
                generator: torch.Generator) -> Optional[MixupResult]:
    """Mix the batch with probability `prob`: returns (mixed images, labels_a, labels_b, lam), or
    None when this batch is left alone (also whenever alpha <= 0 or prob <= 0).

    All randomness comes from `generator`, so a resumed run mixes exactly as the original did."""
    if alpha <= 0 or prob <= 0:
        return None
    if float(torch.rand((), generator=generator)) >= prob:
        return None
    # torch's Beta sampler takes no generator; a numpy Generator seeded from ours keeps it reproducible.
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    permutation = torch.randperm(images.shape[0], generator=generator).to(images.device)
    mixed = images * lam + images[permutation] * (1.0 - lam)
    return mixed, labels, labels[permutation], lam

