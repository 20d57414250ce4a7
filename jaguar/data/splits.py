"""Every split jaguar makes of labelled images (train/validation, identity hold-outs), group-aware: the
images of one near-duplicate group (a camera-trap burst, a copy) always land on the same side, so
the validation score is not inflated by frames the model trained on.

Groups come from the manifest (`jaguar prep`'s pHash groups, or `jaguar dedup`'s embedding groups),
chosen by `data.split_groups` (none | phash | embedding)."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from jaguar.config import ConfigError

logger = logging.getLogger(__name__)

SPLIT_GROUPS = ("none", "phash", "embedding")


def _group_numbers(labels: np.ndarray, groups: Sequence[int] | None) -> np.ndarray:
    if groups is None:
        return np.arange(len(labels), dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != labels.shape:
        raise ValueError(f"groups has shape {groups.shape} but labels {labels.shape}; give one group "
                         f"number per image")
    return groups


def _owner_identity(labels: np.ndarray, members: np.ndarray) -> int:
    """The identity a group is stratified under: the most frequent label among its members (ties: the smallest)."""
    values, counts = np.unique(labels[members], return_counts=True)
    return int(values[np.argmax(counts)])


def split_train_val(labels: np.ndarray, val_fraction: float, mode: str = "stratified", seed: int = 0,
                    groups: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, val_idx), sorted positions into `labels`; unlabelled (< 0) are in neither.

    groups: a group number per image (equal numbers = one near-duplicate group; `None`: each image
    alone). A group is never split: it goes to train or to validation whole. A group counts under
    its owner, the most frequent identity among its members (ties: the smallest label).

    Validation is scored all-vs-all within the validation images, so a query whose identity has no
    other validation image has no true match and an undefined AP (the evaluator drops it, and its
    images would be lost to training for nothing). Hence an identity is validated with at least two
    of its groups, or not at all, and every validation query has a same-identity gallery image
    outside its own near-duplicate group (an image in a group owned by another identity excepted);
    an identity with too few groups stays wholly in train. The function may therefore return fewer
    validation images than asked, or none (logged as a warning), never a match-less query.

    stratified: each identity owning at least three groups sends about max(2, round(n * val_fraction))
    of its n images to val, in at least two whole groups, and keeps at least one group in train;
    identities with one or two groups (e.g. two photos) stay wholly in train. The groups are drawn in
    a seeded random order and one is taken while it fits the identity's quota; then, while fewer
    than two are taken, the smallest of the rest (the last group drawn always stays in train).
    identity: max(1, round(identities * val_fraction)) whole identities are held out (at least one
    stays in train), drawn among the identities owning at least two groups; a group shared with a
    kept identity stays in train whole.
    val_fraction = 0 gives an empty val set. Raises ConfigError for a bad fraction or mode (and for
    mode identity with fewer than two identities), ValueError when `groups` has another shape than
    `labels`."""
    labels = np.asarray(labels, dtype=np.int64)
    numbers = _group_numbers(labels, groups)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in [0, 1), got {val_fraction}")
    if mode not in ("stratified", "identity"):
        raise ConfigError(f"config key 'data.val_split' is {mode!r}; choose stratified or identity")
    labelled = np.flatnonzero(labels >= 0)
    empty = np.zeros(0, dtype=np.int64)
    if val_fraction == 0 or len(labelled) == 0:
        return labelled.astype(np.int64), empty
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1]))
    identities = np.unique(labels[labelled])
    group_ids, inverse = np.unique(numbers[labelled], return_inverse=True)
    members = [labelled[inverse == g] for g in range(len(group_ids))]
    owner = np.array([_owner_identity(labels, m) for m in members], dtype=np.int64)
    if mode == "stratified":
        val_parts = []
        for ident in identities:
            own = [members[g] for g in rng.permutation(np.flatnonzero(owner == ident))]
            if len(own) >= 3:
                val_parts += _stratified_pick(own, max(2, round(sum(len(m) for m in own) * val_fraction)))
        val = np.concatenate(val_parts) if val_parts else empty
    else:
        if len(identities) < 2:
            raise ConfigError(f"data.val_split=identity needs at least 2 labelled identities, found "
                              f"{len(identities)}; use data.val_split=stratified")
        owned = np.array([int((owner == ident).sum()) for ident in identities])
        candidates = identities[owned >= 2]
        n_val = min(len(identities) - 1, max(1, round(len(identities) * val_fraction)), len(candidates))
        held_out = rng.permutation(candidates)[:n_val]
        val_groups = [m for m in members if np.isin(labels[m], held_out).all()]
        val = np.concatenate(val_groups) if val_groups else empty
    if len(val) == 0:
        logger.warning("split held out no images: no identity has enough near-duplicate groups (stratified: 3, "
                       "identity: 2) for a held-out query to have a true match")
    val = np.sort(val).astype(np.int64)
    train = np.setdiff1d(labelled, val).astype(np.int64)
    return train, val


def _stratified_pick(own: list[np.ndarray], quota: int) -> list[np.ndarray]:
    """The groups (in drawn order, three or more) one identity sends to validation: each that fits
    the quota of images, then the smallest of the rest until two are taken; never the last one."""
    taken: list[int] = []
    count = 0
    for position, group in enumerate(own[:-1]):
        if count + len(group) <= quota:
            taken.append(position)
            count += len(group)
    rest = sorted((p for p in range(len(own) - 1) if p not in taken), key=lambda p: len(own[p]))
    taken += rest[:max(0, 2 - len(taken))]
    return [own[p] for p in sorted(taken)]


def split_groups_of(split, kind: str) -> np.ndarray | None:
    """The group number of each image of a training split (a ShardSplit, or several concatenated:
    anything with `.manifest` (a Manifest), `.split`, `.filenames`, `.shards_dir`, or `.splits` of
    those), from the manifests' `groups[kind]`; None for kind "none".

    Extra shards written by `jaguar pseudo` carry their source's group ids, so a pseudo-labelled
    test image joins the group of its near-duplicate training images. Raises ConfigError when a
    manifest has no groups of that kind (naming it and what to run)."""
    from jaguar.data.dedup import NearDuplicates

    if kind not in SPLIT_GROUPS:
        raise ConfigError(f"config key 'data.split_groups' is {kind!r}; choose one of {', '.join(SPLIT_GROUPS)}")
    if kind == "none":
        return None
    parts = list(getattr(split, "splits", [split]))
    ids: list[str | None] = []
    for part in parts:
        entry = part.manifest.groups.get(kind)
        where = part.shards_dir / "manifest.json"
        if entry is None:
            fix = ("re-run `jaguar prep` (it finds pHash groups)" if kind == "phash"
                   else f"run `jaguar dedup RUN_DIR` on a run trained on these shards")
            raise ConfigError(f"{where} has no {kind!r} near-duplicate groups (data.split_groups={kind}); {fix}, "
                              f"or set data.split_groups=none to split without them")
        # a pseudo-labelled folder's group ids are those of the shards it was made from
        source = part.manifest.source if part.manifest.layout == "pseudo-labels" else str(part.shards_dir)
        of_name: dict[str, str] = {}
        for group in NearDuplicates.from_json(entry).groups:
            for member_split, name in group["members"]:
                if member_split == part.split:
                    of_name[name] = f"{source}#{group['id']}"
        ids += [of_name.get(name) for name in part.filenames]
    numbers = np.arange(len(ids), dtype=np.int64)
    first: dict[str, int] = {}
    for position, group_id in enumerate(ids):
        if group_id is not None:
            numbers[position] = first.setdefault(group_id, position)
    return numbers


def groups_by_name(filenames: Sequence[str], groups: np.ndarray | None, positions: Sequence[int]) -> list[list[str]]:
    """The near-duplicate groups among `positions` (two or more images each), as lists of file names:
    what a run's split file records."""
    if groups is None:
        return []
    found: dict[int, list[str]] = {}
    for position in positions:
        found.setdefault(int(groups[position]), []).append(filenames[position])
    return [names for names in found.values() if len(names) > 1]
