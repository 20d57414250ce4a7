"""Randomness of a training run across its processes: what must be equal on every rank and what must
be independent (transformers#31412: one seed on every rank makes every rank draw the same dropout masks).

Every source, and how it is seeded:
- model initialisation (timm layers, head, BNNeck, the center loss's centres): `run.seed` on every
  rank, so the replicas start equal even where no broadcast follows (DDP and DeepSpeed broadcast
  rank 0's weights too);
- the batch plan (PK / shuffle sampler): (run.seed, epoch) on every rank, each rank taking its own
  share of the same global plan (jaguar.data.sampler);
- augmentation: a generator per sample from (run.seed, epoch, batch, slot, image) (jaguar.data.loader),
  so it differs between ranks because their images do, and is reproducible on resume;
- mixup: a generator from (run.seed, step, micro-batch, rank) (the trainer);
- dropout, stochastic depth and anything else drawn from torch's global generator during training:
  `rank_stream_seed(run.seed, rank)`, independent per rank; Accelerate's checkpoints save and restore
  each rank's generator states, so a resume continues the same streams."""

from __future__ import annotations

import numpy as np
import torch


def rank_stream_seed(seed: int, rank: int) -> int:
    """A 63-bit seed of rank `rank`'s training-time stream, from SeedSequence([seed, rank]): other
    ranks' streams and other seeds' streams do not overlap by construction (not seed + rank, which
    would give rank 1 of seed 0 the stream of rank 0 of seed 1)."""
    state = np.random.SeedSequence([int(seed), int(rank), 0x5EED]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed torch's global generators (CPU and every GPU) with this rank's own stream; call once the
    shared initialisation is done."""
    torch.manual_seed(rank_stream_seed(seed, rank))
