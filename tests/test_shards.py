"""The shard reader: ShardSplit order and labels, pickling into DataLoader workers, errors, verify_shards."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SYNTH_TRAIN_IMAGES
from jaguar.data.shards import ShardSplit, ShardsError, load_manifest, verify_shards


def test_split_metadata_matches_the_manifest(synth_dir: Path, shards_dir: Path) -> None:
    split = ShardSplit(shards_dir, "train")
    truth = dict(line.split(",") for line in (synth_dir / "train.csv").read_text().splitlines()[1:])
    assert len(split) == SYNTH_TRAIN_IMAGES
    assert split.filenames == sorted(truth)
    assert split.labels.dtype == np.int64
    assert split.identities == [truth[f] for f in split.filenames]
    assert [split.label_names[int(label)] for label in split.labels] == split.identities
    assert sum(split.label_counts().values()) == SYNTH_TRAIN_IMAGES


def test_items_are_the_original_rgba_images_in_manifest_order(synth_dir: Path, shards_dir: Path) -> None:
    split = ShardSplit(shards_dir, "train")
    for index in (0, 24, 25, 59, -1):  # both sides of each shard boundary
        image, meta = split[index]
        assert meta["filename"] == split.filenames[index] and meta["label"] == split.labels[index]
        original = np.asarray(Image.open(synth_dir / "train" / meta["filename"]))
        assert image.mode == "RGBA" and np.array_equal(np.asarray(image), original)
    with pytest.raises(IndexError):
        split[SYNTH_TRAIN_IMAGES]


def test_test_split_and_missing_split(shards_dir: Path) -> None:
    test = ShardSplit(shards_dir, "test")
    assert test.filenames[0] == "test_0001.png"
    with pytest.raises(ShardsError, match="'val' is not in .*manifest.json; it has test, train"):
        ShardSplit(shards_dir, "val")


def _collate_names(batch: list) -> list[str]:
    return [meta["filename"] for _, meta in batch]


def test_pickled_into_dataloader_workers(shards_dir: Path) -> None:
    import torch.utils.data

    split = ShardSplit(shards_dir, "train")
    split[0]  # opened in this process first: workers must not reuse its handles
    clone = pickle.loads(pickle.dumps(split))
    assert clone._dataset is None and clone.filenames == split.filenames
    loader = torch.utils.data.DataLoader(split, batch_size=16, num_workers=2, collate_fn=_collate_names)
    assert [name for batch in loader for name in batch] == split.filenames


def test_missing_folder_and_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="jaguar prep"):
        ShardSplit(tmp_path / "nowhere", "train")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ShardsError, match="'other/9'"):
        load_manifest(tmp_path / "empty")


def test_verify_shards_finds_corrupt_and_missing_shards(shards_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    assert verify_shards(copy) == []
    data = bytearray((copy / "train-000001.tar").read_bytes())
    data[1000] ^= 0xFF
    (copy / "train-000001.tar").write_bytes(bytes(data))
    (copy / "test-000000.tar").unlink()
    problems = verify_shards(copy)
    assert len(problems) == 2
    assert "train-000001.tar: sha256" in problems[0] and "test-000000.tar: missing shard" in problems[1]


def test_rewritten_output_is_read_fresh(synth_dir: Path, tmp_path: Path) -> None:
    # wids caches shards by url by default; a re-prepared folder at the same path must not be served stale
    from jaguar.data.prep import prepare

    out = tmp_path / "out"
    prepare(synth_dir, out, workers=1, shard_size=100)
    assert ShardSplit(out, "train")[0][0].size == (64, 64)
    prepare(synth_dir, out, workers=1, shard_size=100, max_side=32, overwrite=True)
    assert ShardSplit(out, "train")[0][0].size == (32, 32)
