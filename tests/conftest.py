"""Shared fixtures: a tiny synthetic jaguar data set (challenge layout) and its prepared shards; the real
data set's files beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SYNTH_IDENTITIES = 6
SYNTH_TRAIN_IMAGES = 60
SYNTH_TEST_IMAGES = 12
SYNTH_SIZE = 64
SYNTH_SHARD_SIZE = 25  # several train shards, so shard boundaries are exercised
# The real data set lives beside the clone (`<repo>/../shared/data`), never at a machine's own path.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_file(name: str, root: Path = SHARED_DATA) -> Path:
    """The real data set's file `root/name`. When it is missing the calling test fails under CI
    (CI=true, where the data must be present) and is skipped elsewhere, saying where to put it."""
    path = root / name
    if not path.is_file():
        message = f"{path} is missing: put the real data set's {name} in {root} (beside the repository)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 identities, 60 train + 12 test RGBA images of 64 px, seed 0 (train.csv, test.csv, test_labels.csv)."""
    from jaguar.data.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", identities=SYNTH_IDENTITIES,
                          train_images=SYNTH_TRAIN_IMAGES, test_images=SYNTH_TEST_IMAGES, size=SYNTH_SIZE,
                          seed=0, workers=1)


@pytest.fixture(scope="session")
def shards_dir(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`jaguar prep` output of synth_dir: train (3 shards) and test splits with manifest.json and wids indexes."""
    from jaguar.data.prep import prepare

    out = tmp_path_factory.mktemp("shards") / "shards"
    prepare(synth_dir, out, shard_size=SYNTH_SHARD_SIZE, workers=1)
    return out
