"""A labelled test split held out of a folder-per-identity data set (`jaguar prep SRC OUT
--test-fraction F --seed S`), written as the challenge layout's test split is: the images in the
shards' test split with their identities, and beside the shards the pair list `test.csv` (every
ordered pair of test images) and the truth `test_labels.csv`, so that `jaguar submit RUN --test-csv
OUT/test.csv` and `jaguar score RUN --test-csv OUT/test.csv --labels OUT/test_labels.csv` work on
such a data set as on the challenge's.

The hold-out is the group-aware, identity-stratified split of `jaguar.data.splits.split_train_val`:
a near-duplicate group (prep's pHash groups) is held out whole or not at all, an identity sends
either none or at least two of its groups to test (a test query always has a true match outside its
own burst), and keeps at least one group in train, so every test identity is known to the model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jaguar.data.dedup import NearDuplicates
from jaguar.data.layouts import SourceImage
from jaguar.data.splits import split_train_val
from jaguar.formats import all_pairs, write_labels, write_pairs

TEST_PAIRS_NAME = "test.csv"  # in the shards folder, beside manifest.json
TEST_LABELS_NAME = "test_labels.csv"
# An all-pairs list grows as N^2 and is written from memory (about 35 bytes a row): past this many rows
# (about 3,200 test images, 350 MB) the pair list is not written; top-k lists (`jaguar rank`) serve instead.
MAX_PAIR_ROWS = 10**7


def hold_out_test(images: Sequence[SourceImage], groups: NearDuplicates, fraction: float, seed: int
                  ) -> list[SourceImage]:
    """Move about `fraction` of each identity's labelled train images to the test split (their
    `split` set to "test"), in whole near-duplicate `groups` (members named ("train", filename)),
    seeded by `seed`; returns the held-out images in the order given. An identity with fewer than
    three groups keeps all its images in train (see `split_train_val`, mode stratified).
    Raises ValueError for a fraction outside (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {fraction}")
    names = sorted({image.identity for image in images if image.split == "train" and image.identity is not None})
    number_of = {name: number for number, name in enumerate(names)}
    labels = np.array([number_of[image.identity] if image.split == "train" and image.identity is not None else -1
                       for image in images], dtype=np.int64)
    position_of = {image.filename: position for position, image in enumerate(images) if image.split == "train"}
    group_numbers = np.arange(len(images), dtype=np.int64)
    for group in groups.groups:
        positions = [position_of[name] for split, name in group["members"] if split == "train"]
        group_numbers[positions] = min(positions, default=0)
    _, held = split_train_val(labels, fraction, "stratified", seed, group_numbers)
    for position in held:
        images[position].split = "test"
    return [images[position] for position in held]


def with_splits(groups: NearDuplicates, split_of: dict[str, str]) -> NearDuplicates:
    """`groups` with each member's split replaced by `split_of[filename]` (members not named keep
    theirs): the groups found before a hold-out, naming where each image went."""
    moved = [{**group, "members": [[split_of.get(name, split), name] for split, name in group["members"]]}
             for group in groups.groups]
    return NearDuplicates(groups.method, groups.threshold, moved)


def write_test_lists(out: Path, test_images: Sequence[SourceImage]) -> list[str]:
    """Write the labels of `test_images` and their pair list (every ordered pair, row_id from 0) into
    `out` with jaguar.formats' writers; returns warnings (the pair list is left out, and said so,
    past MAX_PAIR_ROWS rows)."""
    names = sorted(image.filename for image in test_images)
    identity_of = {image.filename: image.identity for image in test_images}
    write_labels(out / TEST_LABELS_NAME, [(name, identity_of[name]) for name in names])
    rows = len(names) * (len(names) - 1)
    if rows > MAX_PAIR_ROWS:
        return [f"{TEST_PAIRS_NAME} not written: the {len(names)} test images make {rows:,} ordered pairs, more "
                f"than an all-pairs file should hold ({MAX_PAIR_ROWS:,}); rank them instead (`jaguar extract RUN "
                f"--split test`, `jaguar rank RUN --split test`) or hold out a smaller --test-fraction"]
    write_pairs(out / TEST_PAIRS_NAME, all_pairs(names))
    return []
