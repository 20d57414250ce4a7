"""The synthetic generator: challenge layout, identity distribution, determinism, identity in the coat only."""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import SYNTH_IDENTITIES, SYNTH_SIZE, SYNTH_TEST_IMAGES, SYNTH_TRAIN_IMAGES
from jaguar.data.synth import REAL_IDENTITY_COUNTS, apportion, choose_identities, make_synthetic, plan_bursts
from jaguar.data.synth_render import render_image


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_layout_headers_names_and_query_major_pairs(synth_dir: Path) -> None:
    train = _rows(synth_dir / "train.csv")
    labels = _rows(synth_dir / "test_labels.csv")
    pairs = _rows(synth_dir / "test.csv")
    assert train[0] == ["filename", "ground_truth", "viewpoint"] == labels[0]
    assert {r[2] for r in train[1:] + labels[1:]} == {"left", "right"}  # no unknown share asked for
    assert pairs[0] == ["row_id", "query_image", "gallery_image"]
    assert [r[0] for r in train[1:]] == [f"train_{i:04d}.png" for i in range(1, SYNTH_TRAIN_IMAGES + 1)]
    test_files = [f"test_{i:04d}.png" for i in range(1, SYNTH_TEST_IMAGES + 1)]
    assert [r[0] for r in labels[1:]] == test_files
    assert sorted(p.name for p in (synth_dir / "train").iterdir()) == [r[0] for r in train[1:]]
    assert sorted(p.name for p in (synth_dir / "test").iterdir()) == test_files
    n = SYNTH_TEST_IMAGES
    assert len(pairs) - 1 == n * (n - 1)
    assert pairs[1] == ["0", "test_0001.png", "test_0002.png"]
    expected = [[str(i), q, g] for i, (q, g) in enumerate(itertools.permutations(test_files, 2))]
    assert pairs[1:] == expected  # permutations() is query-major


def test_identity_counts_follow_the_real_distribution(synth_dir: Path) -> None:
    weights = choose_identities(SYNTH_IDENTITIES)
    train = Counter(r[1] for r in _rows(synth_dir / "train.csv")[1:])
    test = Counter(r[1] for r in _rows(synth_dir / "test_labels.csv")[1:])
    assert set(train) == set(weights) == set(test)  # closed set
    assert [train[n] for n in weights] == apportion(SYNTH_TRAIN_IMAGES, list(weights.values()), 2)
    assert min(train.values()) >= 2 and min(test.values()) >= 1
    # ordering by real size is kept: the biggest real identity gets the most synthetic images
    biggest = max(weights, key=weights.get)
    assert train[biggest] == max(train.values())


def test_full_size_apportioning_reproduces_the_real_counts() -> None:
    names = sorted(REAL_IDENTITY_COUNTS)
    counts = apportion(1895, [REAL_IDENTITY_COUNTS[n] for n in names], 2)
    assert counts == [REAL_IDENTITY_COUNTS[n] for n in names]
    test = apportion(371, [REAL_IDENTITY_COUNTS[n] for n in names], 1)
    assert sum(test) == 371 and min(test) >= 1
    assert np.corrcoef(test, counts)[0, 1] > 0.99
    with pytest.raises(ValueError, match="at least 2"):
        apportion(5, [1.0, 1.0, 1.0], 2)


def test_identity_subset_is_deterministic_and_spans_sizes() -> None:
    subset = choose_identities(6)
    assert subset == choose_identities(6) and len(subset) == 6
    assert set(subset) <= set(REAL_IDENTITY_COUNTS)
    assert "Marcela" in subset  # the largest real identity (183 images)
    assert min(subset.values()) == min(REAL_IDENTITY_COUNTS.values())
    assert len(choose_identities(40)) == 40


def test_images_are_rgba_with_a_real_mask(synth_dir: Path) -> None:
    for path in sorted((synth_dir / "train").iterdir())[:5]:
        image = Image.open(path)
        assert image.mode == "RGBA" and image.size == (SYNTH_SIZE, SYNTH_SIZE)
        alpha = np.asarray(image)[..., 3]
        assert (alpha == 0).mean() > 0.3  # background
        assert (alpha == 255).mean() > 0.05  # animal


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    kwargs = dict(identities=3, train_images=6, test_images=3, size=40)
    first = make_synthetic(tmp_path / "a", seed=5, workers=1, **kwargs)
    second = make_synthetic(tmp_path / "b", seed=5, workers=2, **kwargs)
    other = make_synthetic(tmp_path / "c", seed=6, workers=1, **kwargs)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 3 + 6 + 3  # train.csv, test.csv, test_labels.csv + images
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    pngs = [n for n in files if n.suffix == ".png"]
    assert all((first / n).read_bytes() != (other / n).read_bytes() for n in pngs)


def test_same_identity_photos_differ_in_pose_and_background(synth_dir: Path) -> None:
    rows = _rows(synth_dir / "train.csv")[1:]
    first, second = [r[0] for r in rows if r[1] == rows[0][1]][:2]
    a = np.asarray(Image.open(synth_dir / "train" / first), dtype=np.float32)
    b = np.asarray(Image.open(synth_dir / "train" / second), dtype=np.float32)
    assert np.abs(a[..., :3] - b[..., :3]).mean() > 20
    assert (a[..., 3] != b[..., 3]).mean() > 0.1  # different pose, so a different mask


def test_identity_lives_only_inside_the_mask() -> None:
    # same photo randomness, different animals: the mask and the background far from it are identical,
    # the coat is not
    a = np.asarray(render_image(3, "Lua", "train", 7, 96)).astype(np.int16)
    b = np.asarray(render_image(3, "Ti", "train", 7, 96)).astype(np.int16)
    assert np.array_equal(a[..., 3], b[..., 3])
    near = np.asarray(Image.fromarray(a[..., 3].astype(np.uint8)).filter(ImageFilter.MaxFilter(13))) > 0
    assert (~near).mean() > 0.2
    assert np.array_equal(a[~near, :3], b[~near, :3])
    inside = a[..., 3] == 255
    assert np.abs(a[inside, :3] - b[inside, :3]).mean() > 5


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        make_synthetic(tmp_path / "x", identities=5, train_images=8, test_images=5, size=32)
    with pytest.raises(ValueError, match="test_images"):
        make_synthetic(tmp_path / "x", identities=2, train_images=8, test_images=1, size=32)
    assert not (tmp_path / "x").exists()


def test_cli_synth_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jaguar.cli.main import main

    out = tmp_path / "s"
    args = ["synth", str(out), "--identities", "2", "--train-images", "4", "--test-images", "3", "--size", "32",
            "--workers", "1"]
    assert main(args) == 0
    assert "4 train + 3 test images of 2 identities" in capsys.readouterr().out
    assert len(_rows(out / "test.csv")) == 1 + 3 * 2
    assert main(args) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--seed", "1"]) == 0
    assert main(args + ["--overwrite", "--bursts", "0.5"]) == 0
    assert "are frames of" in capsys.readouterr().out and (out / "bursts.csv").is_file()


def test_identity_sizes_are_package_data_matching_the_real_labels() -> None:
    from importlib import resources

    assert resources.files("jaguar.data").joinpath("real_identity_counts.csv").is_file()
    labels = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "jaguar_train_labels.csv"
    assert labels.is_file(), f"{labels} is missing: the shared challenge labels are expected beside the repository"
    assert REAL_IDENTITY_COUNTS == dict(Counter(row[1] for row in _rows(labels)[1:]))


def test_burst_plan_keeps_identities_and_hits_the_rate() -> None:
    names = [f"id{i % 7}" for i in range(3000)]
    scenes = plan_bursts(names, 0.12, np.random.default_rng(0))
    frames = Counter(scenes)
    in_bursts = [i for i, scene in enumerate(scenes) if frames[scene] > 1]
    assert 0.09 <= len(in_bursts) / len(names) <= 0.15
    assert {frames[s] for s in scenes if frames[s] > 1} <= {2, 3, 4, 5}
    assert all(names[i] == names[scene] for i, scene in enumerate(scenes))  # a burst shows one animal
    assert plan_bursts(names, 0.0, np.random.default_rng(0)) == list(range(len(names)))
    with pytest.raises(ValueError, match="burst rate"):
        plan_bursts(names, 1.0, np.random.default_rng(0))


def test_burst_frames_are_near_identical_but_not_copies(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path / "b", identities=3, train_images=30, test_images=6, size=96, seed=1, workers=1,
                         bursts=0.5)
    rows = _rows(out / "bursts.csv")
    assert rows[0] == ["filename", "burst"] and len(rows) > 3
    first, second = [r[0] for r in rows[1:] if r[1] == rows[1][1]][:2]
    split = "train" if first.startswith("train") else "test"
    a = np.asarray(Image.open(out / split / first), dtype=np.float32)
    b = np.asarray(Image.open(out / split / second), dtype=np.float32)
    assert a.tobytes() != b.tobytes()
    assert np.abs(a[..., :3] - b[..., :3]).mean() < 15  # different photos of a split differ by > 20
    assert (a[..., 3] != b[..., 3]).mean() < 0.1
    # without bursts, the same seed renders exactly the images it rendered before bursts existed
    plain = make_synthetic(tmp_path / "p", identities=3, train_images=30, test_images=6, size=96, seed=1, workers=1)
    assert not (plain / "bursts.csv").exists()
    lone = [r[0] for r in _rows(out / "train.csv")[1:] if r[0] not in {row[0] for row in rows[1:]}]
    assert (plain / "train" / lone[0]).read_bytes() == (out / "train" / lone[0]).read_bytes()
    with pytest.raises(ValueError, match="bursts"):
        make_synthetic(tmp_path / "x", identities=3, train_images=30, test_images=6, size=96, bursts=1.2)


def test_the_two_flanks_of_an_identity_are_not_mirror_images() -> None:
    from jaguar.data.synth_render import body_canvas, make_pattern

    def coat(name: str, flank: str) -> np.ndarray:
        return body_canvas(4, name, 256, flank)[..., 1].astype(np.float64)  # the rendered coat's darkness

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        body = body_canvas(4, "Lua", 256)[..., 0] > 0
        return float(np.corrcoef(a[body], b[body])[0, 1])

    left, right = coat("Lua", "left"), coat("Lua", "right")
    # A right-flank photo shows the right coat mirrored into place: were it the left coat (the old
    # generator's "other side"), every right-flank photo would be the mirror image of a left one.
    assert correlation(left, right) < 0.3
    # ... and no nearer to it than another animal's coat is (the flanks are unrelated layouts)
    assert abs(correlation(left, right)) < abs(correlation(left, coat("Ti", "left"))) + 0.2
    # same body style on both sides (shades and spot sizes come from the animal, not the flank)
    assert make_pattern(4, "Lua", "left").centre_shade == make_pattern(4, "Lua", "right").centre_shade
    photo_left = np.asarray(render_image(4, "Lua", "train", 3, 96, flank="left"))
    photo_right = np.asarray(render_image(4, "Lua", "train", 3, 96, flank="right"))
    assert not np.array_equal(photo_left[..., 3], photo_right[..., 3])  # facing the other way
    with pytest.raises(ValueError, match="flank"):
        render_image(4, "Lua", "train", 3, 96, flank="front")


def test_viewpoints_and_sites_are_planned_per_scene(tmp_path: Path) -> None:
    from jaguar.data.synth import plan_sites, plan_views

    names = [f"id{i % 4}" for i in range(400)]
    scenes = plan_bursts(names, 0.3, np.random.default_rng(1))
    flanks, views = plan_views(scenes, 0.1, np.random.default_rng(2))
    assert set(flanks) == {"left", "right"} and 0.4 < flanks.count("left") / len(flanks) < 0.6
    assert 0.05 < views.count("unknown") / len(views) < 0.15
    assert all(v in ("unknown", f) for v, f in zip(views, flanks))
    assert all(flanks[i] == flanks[s] and views[i] == views[s] for i, s in enumerate(scenes))  # a burst: one side
    sites = plan_sites(names, scenes, 3, 0.8, np.random.default_rng(3))
    home = {name: i % 3 for i, name in enumerate(sorted(set(names)))}
    assert 0.7 < np.mean([site == home[name] for name, site in zip(names, sites)]) < 0.9
    assert all(sites[i] == sites[s] for i, s in enumerate(scenes))
    assert plan_sites(names, scenes, 0, 0.8, np.random.default_rng(3)) == [None] * len(names)
    out = make_synthetic(tmp_path / "s", identities=3, train_images=12, test_images=4, size=48, seed=2,
                         workers=1, sites=2, unknown_views=0.5)
    site_rows = _rows(out / "sites.csv")
    assert site_rows[0] == ["filename", "site"] and len(site_rows) == 1 + 12 + 4
    assert {r[2] for r in _rows(out / "train.csv")[1:]} <= {"left", "right", "unknown"}
    with pytest.raises(ValueError, match="unknown-viewpoint share"):
        make_synthetic(tmp_path / "x", identities=3, train_images=12, test_images=4, size=48, unknown_views=2.0)
