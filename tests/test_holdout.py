"""`jaguar prep --test-fraction`: a labelled test split held out of a folder-per-identity data set,
group-aware and stratified by identity, written as the challenge's test split (pair list + labels)
so that `jaguar submit` and `jaguar score` work on it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaguar.data.prep import PrepError, prepare
from jaguar.formats import read_labels, read_pairs, write_submission

# identity -> photos; Abril's 000 and 001 are one photo saved twice (one near-duplicate group)
SIZES = {"Abril": 7, "Bororo": 3, "Duo": 2, "Solo": 1, "Tupa": 5}


def _folders(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for identity, count in SIZES.items():
        (root / identity).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (24, 20, 4), dtype=np.uint8)
            pixels[..., 3] = 255
            Image.fromarray(pixels, "RGBA").save(root / identity / f"{i:03d}.png")
    (root / "Abril" / "001.png").write_bytes((root / "Abril" / "000.png").read_bytes())
    return root


def _sides(out: Path) -> dict[str, list[str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {split: [s["filename"] for s in entry["samples"]] for split, entry in manifest["splits"].items()}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return _folders(tmp_path_factory.mktemp("holdout") / "ids")


def test_held_out_split_is_grouped_stratified_and_every_test_photo_has_a_match(src, tmp_path):
    held_sets = set()
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        manifest = prepare(src, out, workers=1, test_fraction=0.3, seed=seed)
        sides = _sides(out)
        test, train = sides["test"], sides["train"]
        assert sorted(test + train) == sorted(f"{i}/{n:03d}.png" for i, c in SIZES.items() for n in range(c))
        held_sets.add(tuple(test))
        identity = {name: name.split("/")[0] for name in test + train}
        for name in SIZES:
            in_test = [n for n in test if identity[n] == name]
            in_train = [n for n in train if identity[n] == name]
            if SIZES[name] < 3:  # one or two photos: nothing to test with and still train on, so all train
                assert in_test == []
            else:  # two or more test photos (each has a true match), at least one left to train on
                assert len(in_test) >= 2 and len(in_train) >= 1, (seed, name)
        assert ("Abril/000.png" in test) == ("Abril/001.png" in test)  # the copy never straddles
        # every identity is known to the model: test labels are the train label space's
        samples = json.loads((out / "manifest.json").read_text())["splits"]["test"]["samples"]
        assert all(s["label"] == manifest.identities[identity[s["filename"]]] for s in samples)
        groups = manifest.groups["phash"]["groups"]
        abril = next(g for g in groups if any(name == "Abril/000.png" for _, name in g["members"]))
        assert {split for split, _ in abril["members"]} == {"test" if "Abril/000.png" in test else "train"}
        assert manifest.options["test_fraction"] == 0.3 and manifest.options["seed"] == seed
    assert len(held_sets) > 1  # the seed draws
    again = tmp_path / "again"
    prepare(src, again, workers=1, test_fraction=0.3, seed=0)
    assert _sides(again) == _sides(tmp_path / "out0")
    assert (again / "test.csv").read_bytes() == (tmp_path / "out0" / "test.csv").read_bytes()


def test_test_lists_are_the_challenge_files_that_submit_and_score_read(src, tmp_path):
    from jaguar.retrieval.stages import score_submission

    out = tmp_path / "out"
    prepare(src, out, workers=1, test_fraction=0.3, seed=1)
    test = _sides(out)["test"]
    pairs = read_pairs(out / "test.csv")
    assert sorted(zip(pairs.query_images, pairs.gallery_images)) == sorted(itertools.permutations(test, 2))
    assert pairs.row_ids == [str(row) for row in range(len(test) * (len(test) - 1))]
    labels = read_labels(out / "test_labels.csv")
    assert labels == {name: name.split("/")[0] for name in test}
    # a submission that knows the truth scores 1, one that has it backwards scores below 1
    same = [float(labels[q] == labels[g]) for q, g in zip(pairs.query_images, pairs.gallery_images)]
    write_submission(tmp_path / "perfect.csv", pairs.row_ids, same)
    assert score_submission(tmp_path / "perfect.csv", out / "test.csv", out / "test_labels.csv").mAP_balanced == 1.0
    write_submission(tmp_path / "wrong.csv", pairs.row_ids, [1.0 - s for s in same])
    assert score_submission(tmp_path / "wrong.csv", out / "test.csv", out / "test_labels.csv").mAP_balanced < 0.9


def test_cli_holds_out_and_refuses_what_cannot_work(src, tmp_path, capsys):
    from jaguar.cli.main import main

    assert main(["prep", str(src), str(tmp_path / "out"), "--workers", "1", "--test-fraction", "0.3",
                 "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "test: held out with --test-fraction 0.3 --seed 2" in printed
    assert f"--labels {tmp_path / 'out' / 'test_labels.csv'}" in printed
    assert main(["prep", str(src), str(tmp_path / "bad"), "--test-fraction", "1.5"]) == 2
    assert "--test-fraction must be in [0, 1), got 1.5" in capsys.readouterr().err
    few = tmp_path / "few"
    for identity in ("Duo", "Solo"):  # no identity with three photos: nothing can be held out
        (few / identity).mkdir(parents=True)
        for photo in (src / identity).iterdir():
            (few / identity / photo.name).write_bytes(photo.read_bytes())
    with pytest.raises(PrepError, match="no identity in .* has images in three near-duplicate groups"):
        prepare(few, tmp_path / "none", workers=1, test_fraction=0.5)
    assert not (tmp_path / "none").exists()
    challenge = tmp_path / "challenge"
    (challenge / "train").mkdir(parents=True)
    (challenge / "train.csv").write_text("filename,ground_truth\n")
    with pytest.raises(PrepError, match="challenge layout, whose test split is its own"):
        prepare(challenge, tmp_path / "c", workers=1, test_fraction=0.2)


def test_a_pair_list_too_large_for_one_file_is_left_out_and_said_so(src, tmp_path, monkeypatch):
    from jaguar.data import holdout

    monkeypatch.setattr(holdout, "MAX_PAIR_ROWS", 5)
    manifest = prepare(src, tmp_path / "out", workers=1, test_fraction=0.3, seed=0)
    assert not (tmp_path / "out" / "test.csv").exists()
    assert set(read_labels(tmp_path / "out" / "test_labels.csv")) == set(_sides(tmp_path / "out")["test"])
    assert any(w.startswith("test.csv not written") and "jaguar rank RUN --split test" in w
               for w in manifest.warnings)
