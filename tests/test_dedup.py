"""Near-duplicate groups: the masked-animal hash, prep's groups and summary, the embedding pass, and the
group-aware splits that keep every group on one side."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from jaguar.config import ConfigError, load_config
from jaguar.data.dedup import (NearDuplicates, animal_hash, carry_groups, dedup_run, embedding_groups,
                               hash_groups)
from jaguar.data.splits import groups_by_name, split_groups_of, split_train_val
from jaguar.data.synth import make_synthetic
from jaguar.data.synth_render import render_image


def _jpeg_again(rgba: np.ndarray, quality: int = 70) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgba[..., :3]).save(buffer, format="JPEG", quality=quality)
    return np.dstack([np.asarray(Image.open(buffer).convert("RGB")), rgba[..., 3]])


def _shifted(rgba: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(rgba)
    height, width = rgba.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        rgba[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def _brightened(rgba: np.ndarray, factor: float) -> np.ndarray:
    out = rgba.copy()
    out[..., :3] = np.clip(rgba[..., :3].astype(np.float32) * factor, 0, 255).astype(np.uint8)
    return out


def test_hash_finds_planted_copies_and_not_distinct_animals() -> None:
    original = np.asarray(render_image(3, "Lua", "train", 1, 160))  # the animal wholly inside the frame
    copies = {"identical": original.copy(), "jpeg": _jpeg_again(original), "shifted": _shifted(original, 6, -4),
              "brighter": _brightened(original, 1.12), "darker+jpeg": _jpeg_again(_brightened(original, 0.9))}
    # distinct animals, one of them in exactly the same pose and light (only the coat differs), and
    # other photos of the same animal
    others = {"Ti same pose": np.asarray(render_image(3, "Ti", "train", 1, 160)),
              "Jaju same pose": np.asarray(render_image(3, "Jaju", "train", 1, 160)),
              **{f"Lua photo {i}": np.asarray(render_image(3, "Lua", "train", i, 160)) for i in (2, 3, 4)},
              **{f"{n} photo": np.asarray(render_image(3, n, "train", i, 160))
                 for i, n in enumerate(["Bagua", "Kwang", "Oxum"], start=20)}}
    images = {"original": original, **copies, **others}
    keys = [("train" if name != "jpeg" else "test", name) for name in images]
    found = hash_groups(keys, [animal_hash(rgba) for rgba in images.values()])
    assert len(found.groups) == 1
    assert sorted(name for _, name in found.groups[0]["members"]) == sorted(["original", *copies])
    assert found.images == 1 + len(copies)
    # the re-encoded copy is in "test": every edge to it is a train/test near-duplicate pair
    cross = found.cross_split_pairs()
    assert cross and all(test_name == "jpeg" for _, test_name, _ in cross)
    assert all(len(d) == 2 and d[0] <= 10 and d[1] <= 48 for _, _, d in cross)


def test_hash_of_an_empty_mask_is_the_whole_image() -> None:
    rgba = np.asarray(render_image(1, "Ti", "train", 2, 64)).copy()
    rgba[..., 3] = 0
    assert animal_hash(rgba).shape == (8 * 8 + 16 * 16,)


def test_embedding_groups_join_by_cosine_and_chain() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 32))
    near = base[0] + 0.01 * rng.standard_normal(32)
    chained = near + 0.01 * rng.standard_normal(32)
    embeddings = np.vstack([base, near, 3.0 * chained])  # the scale does not matter
    keys = [("train", f"t{i}") for i in range(6)] + [("train", "near"), ("test", "chained")]
    found = embedding_groups(keys, embeddings, min_cosine=0.99)
    assert [sorted(n for _, n in g["members"]) for g in found.groups] == [["chained", "near", "t0"]]
    assert all(score >= 0.99 for _, _, score in found.groups[0]["pairs"])
    assert NearDuplicates.from_json(json.loads(json.dumps(found.to_json()))) == found
    with pytest.raises(ValueError, match=r"--min-cosine must be in \[-1, 1\], got 1.5"):
        embedding_groups(keys, embeddings, min_cosine=1.5)


# ---------------------------------------------------------------- splits


def _planted(sizes_by_identity: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    labels, groups = [], []
    for identity, sizes in sizes_by_identity.items():
        for size in sizes:
            number = len(labels)
            labels += [identity] * size
            groups += [number] * size
    return np.array(labels), np.array(groups)


def test_grouped_split_never_separates_a_group_and_stays_stratified() -> None:
    rng = np.random.default_rng(1)
    labels, groups = _planted({ident: list(rng.integers(1, 6, size=int(rng.integers(4, 15)))) for ident in range(12)})
    order = rng.permutation(len(labels))  # groups need not be contiguous
    labels, groups = labels[order], groups[order]
    labels[:3] = -1  # unlabelled images are in neither side
    for seed in range(5):
        train, val = split_train_val(labels, 0.2, "stratified", seed=seed, groups=groups)
        assert not set(train) & set(val)
        assert sorted([*train, *val]) == np.flatnonzero(labels >= 0).tolist()
        for group in np.unique(groups[labels >= 0]):
            members = set(np.flatnonzero((groups == group) & (labels >= 0)).tolist())
            assert members <= set(train) or members <= set(val), (seed, group)
        for ident in np.unique(labels[labels >= 0]):
            own = labels == ident
            n_groups = len(np.unique(groups[own]))
            in_val = int(np.isin(np.flatnonzero(own), val).sum())
            assert int(np.isin(np.flatnonzero(own), train).sum()) >= 1  # every identity trains
            val_groups = np.unique(groups[val][labels[val] == ident])
            if n_groups >= 3:
                # validated with two groups or more, so each validation query has a match outside its
                # own group: its quota, topped up with the smallest groups when fewer than two fit
                assert len(val_groups) >= 2
                assert in_val <= max(2, round(own.sum() * 0.2)) or len(val_groups) == 2
            else:  # one or two groups: a validation query of it would have no match, so it all trains
                assert in_val == 0
        assert 0.12 <= len(val) / (labels >= 0).sum() <= 0.28


def test_grouped_split_is_deterministic_and_equals_the_plain_split_without_groups() -> None:
    labels, groups = _planted({0: [3, 1, 1, 2, 4], 1: [2, 2, 1, 1], 2: [5, 1, 1, 1, 1, 1]})
    first = split_train_val(labels, 0.3, "stratified", seed=4, groups=groups)
    again = split_train_val(labels, 0.3, "stratified", seed=4, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    seeds = {tuple(split_train_val(labels, 0.3, "stratified", seed=s, groups=groups)[1]) for s in range(6)}
    assert len(seeds) > 1
    singletons = np.arange(len(labels))
    for mode in ("stratified", "identity"):
        plain = split_train_val(labels, 0.3, mode, seed=2)
        alone = split_train_val(labels, 0.3, mode, seed=2, groups=singletons)
        assert all(np.array_equal(a, b) for a, b in zip(plain, alone))


def test_identity_hold_out_keeps_a_group_shared_with_a_kept_identity_in_train() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    groups = np.arange(len(labels))
    groups[[2, 3]] = 2  # a near-duplicate of identities 0 and 1 (a labelling slip, or two animals in a frame)
    for seed in range(8):
        train, val = split_train_val(labels, 0.25, "identity", seed=seed, groups=groups)
        assert (2 in train) == (3 in train)
        held = set(labels[val].tolist())
        assert len(held) == 1 and not held & set(labels[train[~np.isin(train, [2, 3])]].tolist())
    with pytest.raises(ValueError, match=r"groups has shape \(4,\) but labels \(12,\)"):
        split_train_val(labels, 0.25, "identity", groups=groups[:4])


def test_config_chooses_the_groups() -> None:
    assert load_config(None).data.split_groups == "phash"
    assert load_config(None, ["data.split_groups=none"]).data.split_groups == "none"
    with pytest.raises(ConfigError, match="data.split_groups"):
        load_config(None, ["data.split_groups=hash"])


# ---------------------------------------------------------------- prep, manifest, run split


@pytest.fixture(scope="module")
def burst_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A small synthetic set with bursts and one training photo copied into the test set; its shards and summary."""
    from jaguar.data.prep import prepare, summary

    raw = make_synthetic(tmp_path_factory.mktemp("bursts") / "raw", identities=4, train_images=40, test_images=12,
                         size=160, seed=2, workers=1, bursts=0.3)
    shutil.copyfile(raw / "train" / "train_0003.png", raw / "test" / "test_0001.png")
    shards = tmp_path_factory.mktemp("bursts") / "shards"
    manifest = prepare(raw, shards, shard_size=16, workers=1)
    return raw, shards, summary(manifest, shards)


def _bursts(raw: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    with (raw / "bursts.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            found.setdefault(row["burst"], []).append(row["filename"])
    return found


def test_prep_groups_the_planted_bursts_and_reports_them(burst_set) -> None:
    raw, shards, text = burst_set
    manifest = json.loads((shards / "manifest.json").read_text())
    found = NearDuplicates.from_json(manifest["groups"]["phash"])
    group_of = {name: group["id"] for group in found.groups for _, name in group["members"]}
    bursts = _bursts(raw)
    assert len(bursts) >= 3
    for frames in bursts.values():
        assert len({group_of.get(name) for name in frames}) == 1 and frames[0] in group_of, frames
    line = re.search(r"near-duplicates \(pHash distances <= 10/48 bits at 64/256-bit\): (\d+) group\(s\) "
                     r"holding (\d+) images", text)
    assert line and int(line.group(1)) == len(found.groups) and int(line.group(2)) == found.images
    cross = found.cross_split_pairs()
    assert ("train_0003.png", "test_0001.png", [0, 0]) in cross  # the planted copy
    identity = {row[0]: row[1] for name in ("train.csv", "test_labels.csv")
                for row in csv.reader((raw / name).open(newline=""))}
    identity["test_0001.png"] = identity["train_0003.png"]
    # besides the copy, the generator can pose one animal alike in two photos; never two animals
    assert all(identity[a] == identity[b] for a, b, _ in cross)
    for group in found.groups:
        assert len({identity[name] for _, name in group["members"]}) == 1
    assert f"warning: {len(cross)} train/test pair(s) look like near-duplicates: " in text
    assert "train_0003.png~test_0001.png" in text and "two photos of one animal in a similar pose" in text


def test_manifest_groups_reach_the_split_and_the_run_split_file(burst_set, tmp_path: Path) -> None:
    from jaguar.data.shards import ShardSplit
    from jaguar.run import RunDir
    from jaguar.train.data import RunSplit, build_run_split

    raw, shards, _ = burst_set
    split = ShardSplit(shards, "train")
    numbers = split_groups_of(split, "phash")
    assert split_groups_of(split, "none") is None
    manifest = json.loads((shards / "manifest.json").read_text())
    expected = sorted(sorted(name for member_split, name in group["members"] if member_split == "train")
                      for group in manifest["groups"]["phash"]["groups"])
    expected = [names for names in expected if len(names) > 1]
    everything = np.arange(len(split))
    assert sorted(sorted(g) for g in groups_by_name(split.filenames, numbers, everything)) == expected
    cfg = load_config(None, [f"data.shards={shards}", "data.val_fraction=0.25"])
    run_split = build_run_split(cfg, split)
    assert sorted(sorted(g) for g in run_split.groups) == expected
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.save_split(run_split.to_record(split))
    record = run.load_split()
    assert sorted(sorted(g) for g in record.groups) == expected
    again = RunSplit.from_record(record, split, "split.json")
    assert again.groups == run_split.groups and np.array_equal(again.val_indices, run_split.val_indices)
    val_names = set(record.val)
    for names in record.groups:  # no group crosses the train/validation split
        assert len({name in val_names for name in names}) == 1
    naive = build_run_split(load_config(None, [f"data.shards={shards}", "data.val_fraction=0.25",
                                               "data.split_groups=none"]), split)
    assert naive.groups == []
    with pytest.raises(ConfigError, match="no 'embedding' near-duplicate groups.*jaguar dedup"):
        split_groups_of(split, "embedding")


def test_pseudo_labelled_images_join_their_source_groups(burst_set) -> None:
    from jaguar.data.manifest import Manifest

    _, shards, _ = burst_set
    manifest = Manifest.load(shards)
    carried = carry_groups(manifest.groups, {"test_0001.png"}, "train")
    assert carried["phash"]["groups"][0]["members"] == [["train", "test_0001.png"]]
    base = SimpleNamespace(manifest=manifest, split="train", shards_dir=shards.resolve(),
                           filenames=["train_0003.png", "train_0004.png"])
    pseudo = SimpleNamespace(layout="pseudo-labels", source=str(shards.resolve()), groups=carried)
    extra = SimpleNamespace(manifest=pseudo, split="train", shards_dir=Path("/elsewhere"),
                            filenames=["test_0001.png"])
    numbers = split_groups_of(SimpleNamespace(splits=[base, extra]), "phash")
    assert numbers[2] == numbers[0]  # the pseudo-labelled copy joins train_0003's group


def test_dedup_run_writes_embedding_groups_into_the_manifest(burst_set, tmp_path: Path) -> None:
    from jaguar.cli.main import main
    from jaguar.config import save_config
    from jaguar.data.shards import ShardSplit
    from jaguar.retrieval.features import FeatureSet

    _, source, _ = burst_set
    shards = tmp_path / "shards"
    shutil.copytree(source, shards)
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, [f"data.shards={shards}"]), run / "config.yaml")
    train = ShardSplit(shards, "train")
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((len(train), 16)).astype(np.float32)
    embeddings[5] = embeddings[1] + 1e-3  # planted near-duplicates of the model
    (run / "features").mkdir()
    FeatureSet(train.filenames[:30], torch.from_numpy(embeddings[:30]), torch.as_tensor(train.labels[:30])).save(
        run / "features" / "train.safetensors")
    FeatureSet(train.filenames[30:], torch.from_numpy(embeddings[30:]), torch.as_tensor(train.labels[30:])).save(
        run / "features" / "val.safetensors")
    found = dedup_run(run, 0.99)
    assert [sorted(n for _, n in g["members"]) for g in found.groups] == [[train.filenames[1], train.filenames[5]]]
    split = ShardSplit(shards, "train")
    assert set(split.manifest.groups) == {"phash", "embedding"}  # kept beside the new groups
    numbers = split_groups_of(split, "embedding")
    assert numbers[5] == numbers[1] and len(set(numbers.tolist())) == len(split) - 1
    assert main(["dedup", str(run)]) == 0
    assert main(["dedup", str(tmp_path / "missing")]) == 2
