"""Training and evaluation DataLoaders over a shard split, and the train/val split of its labels.

Training batches come from a rank-aware PK (or shuffle) batch sampler that yields sample keys
(index, epoch, batch, slot); each sample's augmentation RNG is derived from (seed, epoch, batch,
slot, index), so a batch is the same tensor whatever num_workers is, and a resumed run sees
exactly the batches the uninterrupted one would have. Set the epoch / resume position through
`loader.batch_sampler` (set_epoch, set_position, state_dict, load_state_dict).

Do not pass the training loader through `accelerator.prepare`: its sampler already shards by
rank, and Accelerate would re-shard it.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from jaguar.config import Config, ConfigError
from jaguar.data.sampler import PKBatchSampler, SampleKey, ShuffleBatchSampler
from jaguar.data.splits import split_train_val  # noqa: F401  (moved to jaguar.data.splits; old import path)
from jaguar.data.transforms import build_eval_transform, build_train_transform

logger = logging.getLogger(__name__)


def make_label_map(labels_subset: Sequence[int]) -> dict[int, int]:
    """Original label -> contiguous class 0..C-1 (in label order) over the labelled (>= 0) entries."""
    present = sorted({int(v) for v in np.asarray(labels_subset).ravel() if int(v) >= 0})
    return {label: cls for cls, label in enumerate(present)}


def sample_rng(seed: int, key: SampleKey) -> np.random.Generator:
    """The augmentation RNG of one sample key (index, epoch, batch, slot)."""
    index, epoch, batch, slot = key
    return np.random.default_rng(np.random.SeedSequence([int(seed), epoch, batch, slot, index]))


class TrainDataset(Dataset):
    """Subset `indices` of a shard split with contiguous labels; item key = a SampleKey or a position.

    Returns (image tensor, class in 0..C-1, position in the split). A bare int key uses epoch,
    batch and slot 0 (handy outside the loader)."""

    def __init__(self, split, indices: Sequence[int], transform: Callable, seed: int,
                 label_map: dict[int, int] | None = None) -> None:
        self.split = split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = int(seed)
        subset_labels = np.asarray(split.labels, dtype=np.int64)[self.indices]
        if (subset_labels < 0).any():
            bad = self.indices[subset_labels < 0][:5].tolist()
            raise ValueError(f"training indices include unlabelled samples (label -1), e.g. positions "
                             f"{bad}; pass only labelled indices (split_train_val does this)")
        self.label_map = make_label_map(subset_labels) if label_map is None else dict(label_map)
        missing = sorted(set(subset_labels.tolist()) - set(self.label_map))
        if missing:
            raise ValueError(f"labels {missing[:5]} are not in the label map; build it from these indices")
        self.targets = np.array([self.label_map[int(v)] for v in subset_labels], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int, int]:
        if isinstance(key, (int, np.integer)):
            key = (int(key), 0, 0, 0)
        local = key[0]
        position = int(self.indices[local])
        # a JPEG member decodes at the reduced size the transform's canvas still resolves
        image, meta = self.split.read_rgba(position, reduction=self.transform.decode_reduction)
        tensor = self.transform(image, meta, sample_rng(self.seed, key))
        return tensor, int(self.targets[local]), position


class EvalDataset(Dataset):
    """Positions `indices` of a split in the given order; returns (image tensor, position in the split)."""

    def __init__(self, split, indices: Sequence[int], transform: Callable) -> None:
        self.split = split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        position = int(self.indices[j])
        image, meta = self.split.read_rgba(position)
        return self.transform(image, meta), position


def build_train_loader(cfg: Config, split, indices: Sequence[int], rank: int, world_size: int,
                       mean: Sequence[float], std: Sequence[float], batches_per_epoch: int | None = None,
                       label_map: dict[int, int] | None = None) -> DataLoader:
    """The training DataLoader for this rank over labelled positions `indices` (split_train_val gives
    only those; an unlabelled one is a ValueError). `label_map` (shard label -> class) defaults to
    make_label_map of their labels; `loader.dataset.label_map` holds it. An epoch holds whole
    optimizer steps of train.grad_accum batches. Seeded by run.seed."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ConfigError(f"no labelled training images in {cfg.data.shards or 'the given split'}; "
                          f"check data.shards and data.val_fraction")
    seed = cfg.run.seed
    dataset = TrainDataset(split, indices, build_train_transform(cfg, mean, std), seed, label_map)
    labels = np.asarray(split.labels, dtype=np.int64)[indices]
    accumulation = cfg.train.grad_accum
    if cfg.data.sampler == "pk":
        batch_sampler = PKBatchSampler(labels, cfg.data.p_identities, cfg.data.k_images, rank, world_size,
                                       seed, batches_per_epoch, yield_keys=True, accumulation=accumulation)
    else:
        batch_sampler = ShuffleBatchSampler(len(indices), cfg.data.batch_size, rank, world_size, seed,
                                            drop_last=True, yield_keys=True, accumulation=accumulation)
    return _loader(dataset, cfg.data.num_workers, batch_sampler=batch_sampler)


def build_eval_loader(cfg: Config, split, indices: Sequence[int], mean: Sequence[float],
                      std: Sequence[float], batch_size: int | None = None) -> DataLoader:
    """Deterministic loader over `indices` in order: batches of (images, positions in the split)."""
    dataset = EvalDataset(split, indices, build_eval_transform(cfg, mean, std))
    size = cfg.data.batch_size if batch_size is None else batch_size
    return _loader(dataset, cfg.data.num_workers, batch_size=size, shuffle=False, drop_last=False)


def _loader(dataset: Dataset, num_workers: int, **kwargs) -> DataLoader:
    # Workers are not persistent so that set_epoch/set_position on the sampler takes effect;
    # pinned memory only helps when batches go to a GPU.
    # An own generator: creating an iterator would otherwise draw from the global torch RNG, so a
    # run resumed mid-epoch would see different dropout draws than an uninterrupted one.
    return DataLoader(dataset, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0), **kwargs)
