"""The training run's data: the train split of the shards (plus any extra, e.g. pseudo-labelled,
shards), its train/validation partition, and the label space the classifier head sees."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaguar.config import Config, ConfigError
from jaguar.data.shards import ShardSplit
from jaguar.run import SplitRecord


class ConcatSplit:
    """Several ShardSplits read as one; labels must share the first split's label space."""

    def __init__(self, splits: list) -> None:
        self.splits = splits
        self.filenames = [name for split in splits for name in split.filenames]
        self.labels = np.concatenate([np.asarray(split.labels, dtype=np.int64) for split in splits])
        self.identities = [ident for split in splits for ident in split.identities]
        self.label_names = dict(splits[0].label_names)
        self._offsets = np.cumsum([0] + [len(split) for split in splits])
        if len(set(self.filenames)) != len(self.filenames):
            raise ConfigError("data.extra_shards repeat images already in data.shards (duplicate filenames)")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[object, int]:
        which = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.splits[which], index - int(self._offsets[which])

    def __getitem__(self, index: int):
        split, local = self._locate(index)
        return split[local]

    def read_rgba(self, index: int):
        split, local = self._locate(index)
        return split.read_rgba(local)


def open_train_split(cfg: Config):
    if not cfg.data.shards:
        raise ConfigError("data.shards is not set: point it at a `jaguar prep` output, e.g. data.shards=data/shards")
    base = ShardSplit(cfg.data.shards, "train")
    if not cfg.data.extra_shards:
        return base
    extras = [ShardSplit(path, "train") for path in cfg.data.extra_shards]
    for path, extra in zip(cfg.data.extra_shards, extras):
        for label, name in extra.label_names.items():
            if base.label_names.get(label, name) != name:
                raise ConfigError(f"data.extra_shards {path}: label {label} is '{name}' there but "
                                  f"'{base.label_names[label]}' in {cfg.data.shards}; extra shards must "
                                  f"use the same identity→label map")
    return ConcatSplit([base, *extras])


@dataclass
class RunSplit:
    """Positions (into the train split) used for training and for validation, by file name too."""
    train_indices: np.ndarray
    val_indices: np.ndarray
    class_of_label: dict[int, int]  # shard label -> contiguous head class

    def to_record(self, split) -> SplitRecord:
        """The run directory's split record: file names and the class map."""
        return SplitRecord(train=[split.filenames[i] for i in self.train_indices],
                           val=[split.filenames[i] for i in self.val_indices],
                           class_of_label=dict(self.class_of_label))
