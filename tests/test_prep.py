"""`jaguar prep`: round trip through webdataset and wids, determinism, every bad-input case, folder layout, CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SYNTH_SHARD_SIZE, SYNTH_TEST_IMAGES, SYNTH_TRAIN_IMAGES, shared_data_file
from jaguar.data.prep import PrepError, prepare


def _train_rows(src: Path) -> list[list[str]]:
    """(filename, identity) of each train.csv row (its viewpoint column left out)."""
    with (src / "train.csv").open(newline="") as handle:
        return [row[:2] for row in list(csv.reader(handle))[1:]]


def _small_challenge(synth_dir: Path, root: Path, train: int = 8, test: int = 3) -> Path:
    """A copy of the first `train` train and `test` test images of the synthetic set."""
    rows = _train_rows(synth_dir)[:train]
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "train.csv").write_text("filename,ground_truth\n" + "".join(f"{f},{n}\n" for f, n in rows))
    for name, _ in rows:
        shutil.copy(synth_dir / "train" / name, root / "train" / name)
    tests = [f"test_{i:04d}.png" for i in range(1, test + 1)]
    for name in tests:
        shutil.copy(synth_dir / "test" / name, root / "test" / name)
    _write_pairs(root, tests)
    return root


def _write_pairs(root: Path, names: list[str]) -> None:
    lines = [f"{i},{q},{g}" for i, (q, g) in enumerate(itertools.permutations(names, 2))]
    (root / "test.csv").write_text("row_id,query_image,gallery_image\n" + "\n".join(lines) + "\n")


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def test_manifest_counts_labels_and_checksums(synth_dir: Path, shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    rows = _train_rows(synth_dir)
    names = sorted({n for _, n in rows})
    assert manifest["format"] == "jaguar-shards/1" and manifest["layout"] == "challenge"
    assert manifest["identities"] == {n: i for i, n in enumerate(names)}
    train = manifest["splits"]["train"]
    assert train["num_samples"] == SYNTH_TRAIN_IMAGES
    assert [s["nsamples"] for s in train["shards"]] == [25, 25, 10]
    assert [s["url"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    truth = {f: manifest["identities"][n] for f, n in rows}
    assert [(s["filename"], s["label"]) for s in train["samples"]] == sorted(truth.items())
    test = manifest["splits"]["test"]
    assert test["num_samples"] == SYNTH_TEST_IMAGES
    # test_labels.csv (synthetic truth) gives the test split labels too
    assert all(s["label"] >= 0 for s in test["samples"])
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert hashlib.sha256((shards_dir / shard["url"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["skipped"] == [] and manifest["warnings"] == []


def test_alpha_survives_webdataset_bit_exactly(synth_dir: Path, shards_dir: Path) -> None:
    import webdataset as wds

    urls = [str(p) for p in sorted(shards_dir.glob("train-*.tar"))]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pilrgba"):
        original = np.asarray(Image.open(synth_dir / "train" / sample["json"]["filename"]))
        assert sample["png"].mode == "RGBA"
        assert np.array_equal(np.asarray(sample["png"]), original)
        assert sample["__key__"] == Path(sample["json"]["filename"]).stem
        x0, y0, x1, y1 = sample["json"]["alpha_bbox"]
        alpha = original[..., 3]
        assert alpha[y0:y1, x0:x1].sum() == alpha.sum() and alpha[y0, x0:x1].any() and alpha[y1 - 1].any()
        seen.append(sample["json"]["filename"])
    assert seen == sorted(seen) and len(seen) == SYNTH_TRAIN_IMAGES


def test_wids_index_opens_from_another_working_directory(synth_dir: Path, shards_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import wids

    monkeypatch.chdir(shards_dir.parent)
    dataset = wids.ShardListDataset(f"{shards_dir.name}/test.wids.json", transformations=[],
                                    cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == SYNTH_TEST_IMAGES
    sample = dataset[SYNTH_TEST_IMAGES - 1]
    meta = json.loads(sample[".json"].read() if hasattr(sample[".json"], "read") else sample[".json"])
    png = sample[".png"].read() if hasattr(sample[".png"], "read") else sample[".png"]
    assert meta["filename"] == f"test_{SYNTH_TEST_IMAGES:04d}.png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))),
                          np.asarray(Image.open(synth_dir / "test" / meta["filename"])))


def test_output_does_not_depend_on_worker_count(synth_dir: Path, shards_dir: Path, tmp_path: Path) -> None:
    manifest = prepare(synth_dir, tmp_path / "w2", shard_size=SYNTH_SHARD_SIZE, workers=2).to_dict()
    reference = json.loads((shards_dir / "manifest.json").read_text())
    assert manifest["splits"] == reference["splits"]
    for tar in sorted(shards_dir.glob("*.tar")):
        assert (tmp_path / "w2" / tar.name).read_bytes() == tar.read_bytes()


def test_long_side_is_capped_with_alpha_resized_too(synth_dir: Path, tmp_path: Path) -> None:
    src = _small_challenge(synth_dir, tmp_path / "src", train=3, test=2)
    manifest = prepare(src, tmp_path / "out", max_side=20, workers=1).to_dict()
    from jaguar.data.shards import ShardSplit

    image, meta = ShardSplit(tmp_path / "out", "train")[0]
    assert image.size == (20, 20) and meta["size"] == [20, 20] and meta["orig_size"] == [64, 64]
    original = Image.open(src / "train" / meta["filename"]).getchannel("A").resize((20, 20), Image.LANCZOS)
    assert np.array_equal(np.asarray(image.getchannel("A")), np.asarray(original))
    assert manifest["options"]["max_side"] == 20


def test_jpeg_encoding_keeps_the_mask_exact_and_the_colours_close(synth_dir: Path, tmp_path: Path) -> None:
    src = _small_challenge(synth_dir, tmp_path / "src", train=3, test=2)
    manifest = prepare(src, tmp_path / "out", workers=1, encoding="jpeg").to_dict()
    assert manifest["options"]["encoding"] == "jpeg" and manifest["options"]["jpeg_quality"] == 95
    from jaguar.data.shards import ShardSplit

    split = ShardSplit(tmp_path / "out", "train")
    for i in range(len(split)):
        rgba, meta = split.read_rgba(i)
        original = np.asarray(Image.open(src / "train" / meta["filename"]).convert("RGBA"))
        assert rgba.shape == original.shape and rgba.dtype == np.uint8
        assert np.array_equal(rgba[..., 3], original[..., 3])  # the mask is stored losslessly
        assert np.abs(rgba[..., :3].astype(int) - original[..., :3]).mean() < 6  # JPEG q95
        image, _ = split[i]
        assert image.mode == "RGBA" and np.array_equal(np.asarray(image), rgba)
    names = sorted(tarfile.open(next((tmp_path / "out").glob("train-*.tar"))).getnames())
    assert names[:3] == ["train_0001.jpg", "train_0001.json", "train_0001.mask.png"]
    with pytest.raises(PrepError, match="unknown --encoding 'webp'"):
        prepare(src, tmp_path / "bad", workers=1, encoding="webp")


def _break_everything(src: Path) -> dict[str, str]:
    """Apply every per-file problem to a small challenge layout; returns file -> expected words."""
    rows = _train_rows(src)
    (src / "train" / rows[0][0]).write_bytes(b"this is not a png")
    data = (src / "train" / rows[1][0]).read_bytes()
    (src / "train" / rows[1][0]).write_bytes(data[: len(data) // 2])
    (src / "train" / rows[2][0]).unlink()
    Image.open(src / "train" / rows[3][0]).convert("RGB").save(src / "train" / rows[3][0])
    _write_pairs(src, ["test_0001.png", "test_0002.png", "test_0099.png"])
    return {rows[0][0]: "corrupt", rows[1][0]: "truncated", rows[2][0]: "missing", rows[3][0]: "no alpha",
            "test_0099.png": "unknown image"}


def test_every_bad_file_is_reported_and_nothing_is_written(synth_dir: Path, tmp_path: Path) -> None:
    src = _small_challenge(synth_dir, tmp_path / "src")
    expected = _break_everything(src)
    out = tmp_path / "out" / "shards"
    with pytest.raises(PrepError) as caught:
        prepare(src, out, workers=2)
    message = str(caught.value)
    for name, words in expected.items():
        line = next((ln for ln in message.splitlines() if name in ln), "")
        assert words in line, f"{name} not reported as {words!r} in:\n{message}"
    assert "--skip-bad" in message
    assert not out.exists() and _leftovers(out.parent) == []


def test_skip_bad_carries_on_and_lists_the_skipped(synth_dir: Path, tmp_path: Path) -> None:
    src = _small_challenge(synth_dir, tmp_path / "src")
    expected = _break_everything(src)
    manifest = prepare(src, tmp_path / "out", workers=1, skip_bad=True).to_dict()
    skipped = {Path(item["file"]).name: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == set(expected)
    assert manifest["splits"]["train"]["num_samples"] == 8 - 4
    assert manifest["splits"]["test"]["num_samples"] == 2
    kept = {s["filename"] for s in manifest["splits"]["train"]["samples"]}
    assert not kept & set(expected)


@pytest.mark.parametrize("content, words", [
    (b"name,identity\ntrain_0001.png,Abril\n", "expected 'filename,ground_truth'"),
    (b"\xff\xfe\x00garbage\xff", "cannot read CSV"),
])
def test_unusable_train_csv_is_fatal_even_with_skip_bad(synth_dir: Path, tmp_path: Path, content: bytes,
                                                        words: str) -> None:
    src = _small_challenge(synth_dir, tmp_path / "src")
    (src / "train.csv").write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(PrepError, match="train.csv") as caught:
            prepare(src, tmp_path / "out", workers=1, skip_bad=skip_bad)
        assert words in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_test_folder_without_csv_and_existing_output(synth_dir: Path, tmp_path: Path) -> None:
    src = _small_challenge(synth_dir, tmp_path / "src", train=2, test=4)
    (src / "test.csv").unlink()
    manifest = prepare(src, tmp_path / "out", workers=1).to_dict()
    assert [s["filename"] for s in manifest["splits"]["test"]["samples"]] == \
        [f"test_{i:04d}.png" for i in range(1, 5)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(src, tmp_path / "out", workers=1)
    assert prepare(src, tmp_path / "out", workers=1, overwrite=True, max_side=16).options["max_side"] == 16


def _folders(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for identity, count in (("Zorro", 2), ("Abril", 3)):
        (root / identity).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (12, 10, 4), dtype=np.uint8)
            Image.fromarray(pixels, "RGBA").save(root / identity / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "Zorro" / "photo.v2.jpg")
    return root


def test_folder_layout_with_rgb_warning(tmp_path: Path) -> None:
    src = _folders(tmp_path / "src")
    manifest = prepare(src, tmp_path / "out", workers=1).to_dict()
    assert manifest["layout"] == "folders" and manifest["identities"] == {"Abril": 0, "Zorro": 1}
    samples = manifest["splits"]["train"]["samples"]
    assert [s["key"] for s in samples] == ["Abril/000", "Abril/001", "Abril/002", "Zorro/000", "Zorro/001",
                                           "Zorro/photo_v2"]
    assert [s["label"] for s in samples] == [0, 0, 0, 1, 1, 1]
    assert "test" not in manifest["splits"]
    assert len(manifest["warnings"]) == 1 and manifest["warnings"][0].startswith("1 image(s)")
    assert "Zorro/photo.v2.jpg" in manifest["warnings"][0]
    from jaguar.data.shards import ShardSplit

    image, meta = ShardSplit(tmp_path / "out", "train")[5]
    assert meta["filename"] == "Zorro/photo.v2.jpg" and np.all(np.asarray(image)[..., 3] == 255)


def test_empty_identity_folder_is_reported(tmp_path: Path) -> None:
    src = _folders(tmp_path / "src")
    (src / "Nobody").mkdir()
    (src / "Nobody" / "notes.txt").write_text("no images here")
    with pytest.raises(PrepError, match="Nobody: empty identity folder"):
        prepare(src, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
    assert "Abril" in prepare(src, tmp_path / "out", workers=1, skip_bad=True).identities


def test_cli_prep_end_to_end(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jaguar.cli.main import main

    src = _small_challenge(synth_dir, tmp_path / "src", train=4, test=2)
    assert main(["prep", str(src), str(tmp_path / "out"), "--shard-size", "3", "--workers", "1"]) == 0
    assert "train: 4 samples in 2 shard(s)" in capsys.readouterr().out
    assert main(["prep", str(src), str(tmp_path / "out")]) == 2
    (src / "train" / _train_rows(src)[0][0]).write_bytes(b"junk")
    assert main(["prep", str(src), str(tmp_path / "bad"), "--workers", "1"]) == 2
    assert "corrupt" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["prep", str(src), str(tmp_path / "bad"), "--workers", "1", "--skip-bad"]) == 0
    assert "skipped 1 bad file(s)" in capsys.readouterr().out
    assert main(["prep", str(tmp_path / "absent"), str(tmp_path / "x")]) == 2


def test_missing_real_data_fails_under_ci_and_skips_elsewhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"absent\.csv is missing.*CI needs it"):
        shared_data_file("absent.csv", tmp_path)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"absent\.csv is missing"):
        shared_data_file("absent.csv", tmp_path)


def test_real_train_csv_parses(tmp_path: Path) -> None:
    from jaguar.data.synth import REAL_IDENTITY_COUNTS

    real_labels = shared_data_file("jaguar_train_labels.csv")
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    shutil.copy(real_labels, src / "train.csv")
    tiny = tmp_path / "tiny.png"
    Image.new("RGBA", (4, 3), (200, 150, 80, 255)).save(tiny)
    for name, _ in _train_rows(src):
        shutil.copy(tiny, src / "train" / name)
    manifest = prepare(src, tmp_path / "out", workers=2, shard_size=1000).to_dict()
    assert manifest["splits"]["train"]["num_samples"] == 1895
    assert [s["nsamples"] for s in manifest["splits"]["train"]["shards"]] == [1000, 895]
    labels = np.array([s["label"] for s in manifest["splits"]["train"]["samples"]])
    counts = {name: int((labels == label).sum()) for name, label in manifest["identities"].items()}
    assert counts == REAL_IDENTITY_COUNTS


def test_the_viewpoint_column_reaches_the_manifest_and_the_samples(synth_dir: Path, shards_dir: Path,
                                                                  tmp_path: Path) -> None:
    from jaguar.data.shards import ShardSplit
    from jaguar.formats import read_label_table, viewpoints

    for split, labels in (("train", "train.csv"), ("test", "test_labels.csv")):
        truth = viewpoints(read_label_table(synth_dir / labels))
        shards = ShardSplit(shards_dir, split)
        assert shards.viewpoints == [truth[name] for name in shards.filenames]
        assert shards.read_rgba(0)[1]["viewpoint"] == truth[shards.filenames[0]]
    # without the column (the challenge's own files): no viewpoint anywhere, as before
    src = _small_challenge(synth_dir, tmp_path / "src")
    prepare(src, tmp_path / "out", workers=1)
    samples = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert all("viewpoint" not in sample for sample in samples)
    assert ShardSplit(tmp_path / "out", "train").viewpoints is None
