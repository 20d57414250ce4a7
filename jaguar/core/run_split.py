"""The training run's data: the train split of the shards (plus any extra, e.g. pseudo-labelled,
shards), its train/validation partition and the label space the classifier head sees (RunSplit,
built once and saved in the run directory)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaguar.config import Config, ConfigError
from jaguar.data.loader import make_label_map
from jaguar.data.splits import groups_by_name, split_groups_of, split_train_val
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

    def read_rgba(self, index: int, reduction=None):
        split, local = self._locate(index)
        return split.read_rgba(local, reduction)


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
    """The training data of a run, built once (`build_run_split`) and kept in the run's split record
    (RunDir.save_split): the labelled positions (into the train split) trained on, the positions
    validated on, and the classifier head's class of each shard label."""
    train_indices: np.ndarray
    val_indices: np.ndarray
    class_of_label: dict[int, int]  # shard label -> contiguous head class
    groups: list[list[str]] = field(default_factory=list)  # near-duplicate groups the split kept whole

    @property
    def num_classes(self) -> int:
        return len(self.class_of_label)

    def to_record(self, split) -> SplitRecord:
        """The run directory's split record: file names, the class map and the groups kept whole."""
        return SplitRecord(train=[split.filenames[i] for i in self.train_indices],
                           val=[split.filenames[i] for i in self.val_indices],
                           class_of_label=dict(self.class_of_label), groups=[list(g) for g in self.groups])

    @classmethod
    def from_record(cls, record: SplitRecord, split, where: str) -> "RunSplit":
        """The positions of a saved record's file names in `split`; ConfigError naming `where` when the
        shards no longer hold one of them or a training image lost its label."""
        position_of = {name: position for position, name in enumerate(split.filenames)}
        missing = [name for name in (*record.train, *record.val) if name not in position_of]
        if missing:
            raise ConfigError(f"{where} lists {len(missing)} images the training shards do not hold "
                              f"(e.g. {missing[0]}): data.shards changed since this run started; point "
                              f"data.shards back at its shards or start a new run.dir")
        train = np.asarray([position_of[name] for name in record.train], dtype=np.int64)
        val = np.asarray([position_of[name] for name in record.val], dtype=np.int64)
        labels = np.asarray(split.labels, dtype=np.int64)
        unknown = sorted({int(v) for v in labels[train]} - set(record.class_of_label))
        if unknown:
            raise ConfigError(f"{where}: training images carry labels {unknown[:5]} that its class map "
                              f"does not hold; the shards changed since this run started")
        return cls(train, val, dict(record.class_of_label), [list(g) for g in record.groups])


def build_run_split(cfg: Config, split) -> RunSplit:
    """Split the training shards into training and validation (data.val_fraction, data.val_split,
    run.seed), keeping each near-duplicate group of data.split_groups on one side, and number the
    training identities 0..C-1. Unlabelled images are left out here, the one place that drops them
    (split_train_val returns labelled positions only)."""
    groups = split_groups_of(split, cfg.data.split_groups)
    train, val = split_train_val(split.labels, cfg.data.val_fraction, cfg.data.val_split, cfg.run.seed, groups)
    if len(train) == 0:
        raise ConfigError(f"no labelled training images in {cfg.data.shards}; check data.shards and "
                          f"data.val_fraction")
    return RunSplit(train, val, make_label_map(np.asarray(split.labels, dtype=np.int64)[train]),
                    groups_by_name(split.filenames, groups, np.concatenate([train, val])))

