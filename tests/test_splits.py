"""Validation splits in which every validation query has a true match: validation is scored all-vs-all
within the validation images, so an identity is validated with two of its near-duplicate groups or
not at all (an identity with two photos keeps both in train)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaguar.data.splits import split_train_val


def _planted(rng: np.random.Generator, identities: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and group numbers: each identity 1-6 groups of 1-4 images, in a shuffled order."""
    labels, groups = [], []
    for identity in range(identities):
        for _ in range(int(rng.integers(1, 7))):
            size = int(rng.integers(1, 5))
            groups += [len(labels)] * size
            labels += [identity] * size
    order = rng.permutation(len(labels))
    return np.array(labels)[order], np.array(groups)[order]


@pytest.mark.parametrize("mode", ["stratified", "identity"])
def test_every_validation_query_has_a_match_outside_its_own_group(mode):
    rng = np.random.default_rng(7)
    for trial in range(30):
        labels, groups = _planted(rng, identities=int(rng.integers(3, 12)))
        for fraction in (0.1, 0.3):
            train, val = split_train_val(labels, fraction, mode, seed=trial, groups=groups)
            assert sorted([*train, *val]) == list(range(len(labels)))
            for query in val:
                matches = [g for g in val if labels[g] == labels[query] and groups[g] != groups[query]]
                assert matches, (mode, trial, fraction, query)
            if mode == "stratified":
                assert set(labels[train]) == set(labels)  # closed set: every identity trains


def test_an_identity_with_two_photos_or_two_groups_is_never_cut_in_two():
    # identity 0: two photos; 1: two near-duplicate groups of three; 2: eight photos; 3: one photo
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, *[2] * 8, 3])
    groups = np.arange(len(labels))
    groups[2:5], groups[5:8] = 2, 5
    for seed in range(10):
        train, val = split_train_val(labels, 0.5, "stratified", seed=seed, groups=groups)
        assert {0, 1, 3}.isdisjoint(labels[val].tolist())  # a validation photo of theirs would match nothing
        assert (labels[val] == 2).sum() == 4 and (labels[train] == 2).sum() == 4
        # held out as a whole identity, two photos validate each other; one photo is never held out
        train, val = split_train_val(labels, 0.5, "identity", seed=seed, groups=groups)
        held = set(labels[val].tolist())
        assert 3 not in held and len(held) == 2
        for identity in held:
            assert (labels[train] == identity).sum() == 0


def test_no_validation_possible_is_an_empty_split_with_a_warning(caplog):
    labels = np.array([0, 0, 1, 1, 2])  # no identity has three photos
    with caplog.at_level(logging.WARNING, logger="jaguar.data.splits"):
        train, val = split_train_val(labels, 0.3, "stratified", seed=0)
    assert len(val) == 0 and list(train) == [0, 1, 2, 3, 4]
    assert "held out no images" in caplog.text
