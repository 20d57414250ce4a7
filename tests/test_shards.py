"""The shard reader: ShardSplit order and labels, pickling into DataLoader workers, errors, the manifest's verify (what `jaguar verify SHARDS` runs)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SYNTH_TRAIN_IMAGES
from jaguar.data.manifest import MANIFEST_FORMAT, Manifest
from jaguar.data.shards import ShardSplit, ShardsError, load_manifest


def test_split_metadata_matches_the_manifest(synth_dir: Path, shards_dir: Path) -> None:
    split = ShardSplit(shards_dir, "train")
    truth = dict(line.split(",")[:2] for line in (synth_dir / "train.csv").read_text().splitlines()[1:])
    assert len(split) == SYNTH_TRAIN_IMAGES
    assert split.filenames == sorted(truth)
    assert split.labels.dtype == np.int64
    assert split.identities == [truth[f] for f in split.filenames]
    assert [split.label_names[int(label)] for label in split.labels] == split.identities
    assert len(split.labels) == SYNTH_TRAIN_IMAGES and (np.asarray(split.labels) >= 0).all()


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
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ShardsError, match="file is a file, not a shards folder"):
        load_manifest(tmp_path / "file")
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ShardsError, match="'other/9'"):
        load_manifest(tmp_path / "empty")


def test_verify_shards_finds_corrupt_and_missing_shards(shards_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    assert load_manifest(copy).verify(copy) == []
    data = bytearray((copy / "train-000001.tar").read_bytes())
    data[1000] ^= 0xFF
    (copy / "train-000001.tar").write_bytes(bytes(data))
    (copy / "test-000000.tar").unlink()
    problems = sorted(load_manifest(copy).verify(copy))
    assert len(problems) == 2
    assert "test-000000.tar: missing shard of split 'test'" in problems[0]
    assert "train-000001.tar: sha256" in problems[1] and "corrupt or replaced" in problems[1]


def test_manifest_type_reads_what_prep_writes(shards_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(shards_dir)
    assert isinstance(manifest, Manifest) and manifest.format == MANIFEST_FORMAT
    on_disk = json.loads((shards_dir / "manifest.json").read_text())
    assert manifest.to_dict() == on_disk and set(on_disk["groups"]) == {"phash"}  # prep's near-duplicate groups
    train = manifest.splits["train"]
    assert [s.url for s in train.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert train.num_samples == sum(s.nsamples for s in train.shards) == len(train.samples)
    assert manifest.label_names == {label: name for name, label in on_disk["identities"].items()}
    # groups (near-duplicates, written by jaguar.data.dedup) survive a save/load round trip
    manifest.groups = {"phash": {"method": "phash", "groups": [{"id": "phash-00000", "members": [["train", "a.png"]]}]}}
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("splits"), "not a complete manifest (KeyError: 'splits')"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "not a complete manifest"),
    (lambda m: m.update(extra=1), "unknown key(s) ['extra']"),
    (lambda m: m.update(format="jaguar-shards/0"), "format 'jaguar-shards/0', expected 'jaguar-shards/1'"),
])
def test_broken_manifest_is_named(shards_dir: Path, tmp_path: Path, edit, words: str) -> None:
    data = json.loads((shards_dir / "manifest.json").read_text())
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardsError) as caught:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(caught.value) and words in str(caught.value)


def test_reader_names_a_truncated_shard(shards_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    shard = copy / "train-000001.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    with pytest.raises(ShardsError) as caught:
        ShardSplit(copy, "train")
    assert f"{shard}: {size // 2} bytes, the manifest records {size} (truncated or replaced)" in str(caught.value)
    ShardSplit(copy, "test")  # a split whose shards are intact still opens
    (copy / "test-000000.tar").unlink()
    with pytest.raises(ShardsError, match="test-000000.tar: missing shard of split 'test'"):
        ShardSplit(copy, "test")


def test_verify_command(shards_dir: Path, tmp_path: Path, capsys) -> None:
    from jaguar.cli.main import main

    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    assert main(["verify", str(copy)]) == 0
    assert "ok (4 shard(s), 72 samples" in capsys.readouterr().out
    data = bytearray((copy / "train-000002.tar").read_bytes())
    data[700] ^= 0x01  # same size: only the checksum finds it
    (copy / "train-000002.tar").write_bytes(bytes(data))
    ShardSplit(copy, "train")  # the cheap size check on open lets it through
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and f"{copy / 'train-000002.tar'}: sha256" in err and "Traceback" not in err


def test_rewritten_output_is_read_fresh(synth_dir: Path, tmp_path: Path) -> None:
    # wids caches shards by url by default; a re-prepared folder at the same path must not be served stale
    from jaguar.data.prep import prepare

    out = tmp_path / "out"
    prepare(synth_dir, out, workers=1, shard_size=100)
    assert ShardSplit(out, "train")[0][0].size == (64, 64)
    prepare(synth_dir, out, workers=1, shard_size=100, max_side=32, overwrite=True)
    assert ShardSplit(out, "train")[0][0].size == (32, 32)


def _jpeg_sample(colour_size: tuple[int, int], mask_size: tuple[int, int]) -> dict:
    import io

    colour, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", colour_size, (10, 20, 30)).save(colour, format="JPEG")
    Image.new("L", mask_size, 255).save(mask, format="PNG")
    return {".jpg": colour.getvalue(), ".mask.png": mask.getvalue()}


def test_decode_errors_name_the_member_at_fault() -> None:
    from jaguar.data.shards import decode_rgba

    assert decode_rgba(_jpeg_sample((8, 6), (8, 6)), "s").shape == (6, 8, 4)
    with pytest.raises(ShardsError, match=r"s: its .jpg is 8x6 but its .mask.png is 4x6"):
        decode_rgba(_jpeg_sample((8, 6), (4, 6)), "s")
    broken = dict(_jpeg_sample((8, 6), (8, 6)), **{".mask.png": b"not a png"})
    with pytest.raises(ShardsError, match=r"s: its .mask.png member cannot be decoded"):
        decode_rgba(broken, "s")
    broken = dict(_jpeg_sample((8, 6), (8, 6)), **{".jpg": b"not a jpeg"})
    with pytest.raises(ShardsError, match=r"s: its .jpg member cannot be decoded"):
        decode_rgba(broken, "s")
