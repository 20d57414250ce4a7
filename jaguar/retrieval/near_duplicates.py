"""The embedding pass of near-duplicate detection (`jaguar dedup RUN`): groups of images whose
extracted features are nearly identical (cosine >= a threshold, jaguar.data.dedup.embedding_groups),
written into the manifest of the run's shards so a later split (`data.split_groups=embedding`) keeps
each group on one side. It reads a run, so it sits above the data layer that owns the groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaguar.data.dedup import EMBEDDING_MIN_COSINE, NearDuplicates, embedding_groups
from jaguar.data.manifest import Manifest
from jaguar.errors import MissingInputError
from jaguar.run import RunDir


def dedup_run(run_dir: str | Path, min_cosine: float = EMBEDDING_MIN_COSINE) -> NearDuplicates:
    """The embedding pass: near-duplicate groups from a run's extracted features (features/train,
    val and test .safetensors, whichever exist), written as `groups["embedding"]` into the manifest of
    the run's data.shards (atomically; the shards are untouched), so that `data.split_groups=embedding`
    can use them. Raises MissingInputError naming the missing features or config."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    manifest = Manifest.load(cfg.data.shards)
    split_of = {sample.filename: split for split in reversed(list(manifest.splits))
                for sample in manifest.splits[split].samples}
    splits = [split for split in ("train", "val", "test") if run.has_features(split)]
    if not splits:
        raise MissingInputError(f"run {run.path} has no features; run `jaguar extract {run.path} --split train` "
                                f"(and val, test) first")
    keys, rows, seen = [], [], set()
    for split in splits:
        features = run.load_features(split).normalized()
        for row, name in enumerate(features.names):
            if name in split_of and name not in seen:  # pseudo-labelled extras are test images, met in test
                seen.add(name)
                keys.append((split_of[name], name))
                rows.append(features.embeddings[row].numpy())
    found = embedding_groups(keys, np.stack(rows), min_cosine)
    entry = found.to_json()
    entry["source_run"] = str(run.path.resolve())
    manifest.groups["embedding"] = entry
    manifest.save(cfg.data.shards)
    return found
