"""Sharded feature extraction: each process embeds one contiguous, disjoint slice of a split (every
image exactly once at any world size), writes its part atomically, and rank 0 merges the parts into
RUN/features/<split>.safetensors after checking that together they cover the split exactly."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from jaguar.retrieval.features import FeatureSet

log = logging.getLogger(__name__)


def contiguous_slice(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s share of `count` items: sizes differ by at most one, no padding."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@torch.no_grad()
def embed_batches(embed: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
                  flip_tta: bool = True, scales: Sequence[float] = (1.0,),
                  autocast_dtype: Optional[torch.dtype] = None, progress: bool = False,
                  desc: str = "extract") -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of `loader` (yielding (images, positions)); returns (positions, embeddings)
    with embeddings L2-normalised float32. Flip TTA averages the image and its mirror; several
    scales average the embeddings of resized inputs."""
    all_positions, all_embeddings = [], []
    for images, positions in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        total = None
        for scale in scales:
            scaled = images if scale == 1.0 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False)
            views = [scaled, torch.flip(scaled, dims=[3])] if flip_tta else [scaled]
            for view in views:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    emb = embed(view).float()
                emb = F.normalize(emb, dim=1)
                total = emb if total is None else total + emb
        all_embeddings.append(F.normalize(total, dim=1).cpu())
        all_positions.append(torch.as_tensor(positions).cpu())
    if not all_embeddings:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(all_positions), torch.cat(all_embeddings)


def fingerprint(obj: dict) -> str:
    """A short stable hash of what determines a part's content (checkpoint, split, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def part_path(parts_dir: Path, split: str, start: int, end: int, key: str) -> Path:
    return parts_dir / f"{split}-{start:07d}-{end:07d}-{key}.safetensors"


def merge_parts(part_files: list[Path], expected_names: list[str], label_names: dict[int, str],
                meta: dict) -> FeatureSet:
    """Join parts in order and check the union is exactly the split: no image missing or repeated."""
    parts = [FeatureSet.load(path) for path in part_files]
    names = [name for part in parts for name in part.names]
    if names != list(expected_names):
        missing = sorted(set(expected_names) - set(names))
        extra = sorted(set(names) - set(expected_names))
        raise RuntimeError(f"feature parts do not cover the split exactly: {len(missing)} missing "
                           f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), "
                           f"{len(names)} rows for {len(expected_names)} images")
    embeddings = torch.cat([part.embeddings for part in parts]) if parts else torch.zeros(0, 0)
    labels = torch.cat([part.labels for part in parts]) if parts else torch.zeros(0, dtype=torch.long)
    return FeatureSet(names, embeddings, labels, dict(label_names), dict(meta))
