"""Local features of a split and shortlist matching results stored packed in safetensors: a round trip
keeps every value, shards concatenate to the whole, and a damaged or missing file is named."""

import numpy as np
import pytest

from jaguar.errors import MissingInputError
from jaguar.retrieval.local.keypoints import LocalFeatures
from jaguar.retrieval.local.matching import match_shortlist
from jaguar.retrieval.local.store import (LocalFeatureFileError, LocalFeatureSet, concatenate_matches, load_matches,
                                          save_matches)


def random_features(rng, count, size=(120, 160)):
    descriptors = rng.random((count, 128), dtype=np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(rng.uniform(0, 100, (count, 2)), descriptors, rng.uniform(2, 9, count),
                         rng.uniform(0, 360, count), size)


def records_equal(a: LocalFeatures, b: LocalFeatures) -> bool:
    return (a.image_size == b.image_size and all(np.array_equal(getattr(a, f), getattr(b, f))
                                                 for f in ("keypoints", "descriptors", "scales", "orientations")))


def test_a_packed_set_round_trips_and_its_shards_concatenate(tmp_path):
    rng = np.random.default_rng(0)
    records = [random_features(rng, n) for n in (5, 0, 7, 3)]
    names = ["a.png", "b.png", "c.png", "d.png"]
    whole = LocalFeatureSet.pack(names, records, meta={"extractor": "rootsift", "split": "val"})
    assert np.array_equal(whole.offsets, [0, 5, 5, 12, 15]) and len(whole[1]) == 0
    whole.save(tmp_path / "local.safetensors")
    loaded = LocalFeatureSet.load(tmp_path / "local.safetensors")
    assert loaded.names == names and loaded.meta == {"extractor": "rootsift", "split": "val"}
    assert all(records_equal(x, y) for x, y in zip(loaded, records))
    shards = [LocalFeatureSet.pack(names[:2], records[:2]), LocalFeatureSet.pack(names[2:], records[2:])]
    joined = LocalFeatureSet.concatenate(shards)
    assert joined.names == names and all(records_equal(x, y) for x, y in zip(joined, records))
    picked = whole.select(["d.png", "a.png"])
    assert records_equal(picked[0], records[3]) and records_equal(picked[1], records[0])
    with pytest.raises(KeyError, match="z.png"):
        whole.select(["z.png"])
    with pytest.raises(ValueError, match="duplicate"):
        LocalFeatureSet.concatenate([shards[0], shards[0]])


def test_a_damaged_or_missing_file_is_named(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "local.safetensors"
    LocalFeatureSet.pack(["a.png"], [random_features(rng, 4)]).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a bit flip in the last descriptor
    path.write_bytes(bytes(data))
    with pytest.raises(LocalFeatureFileError, match="checksum"):
        LocalFeatureSet.load(path)
    path.write_bytes(bytes(data[:40]))
    with pytest.raises(LocalFeatureFileError, match=str(path)):
        LocalFeatureSet.load(path, how_to_make="run jaguar extract")
    with pytest.raises(MissingInputError, match="nothing.safetensors"):
        LocalFeatureSet.load(tmp_path / "nothing.safetensors")


def test_matching_results_of_query_slices_store_and_join_to_the_whole(tmp_path):
    rng = np.random.default_rng(2)
    base = random_features(rng, 40, size=(100, 100))
    # each image: the base keypoints moved, so each pair has exact correspondences
    images = [LocalFeatures(base.keypoints + shift, base.descriptors, base.scales, base.orientations, (100, 100))
              for shift in (0.0, 3.0, 6.0, 9.0)]
    shortlist = np.array([[1, 2, 3], [0, 2, -1], [3, 0, 1], [2, 1, 0]])
    whole = match_shortlist(images, images, shortlist, keep_best=2)
    parts = [match_shortlist(images, images, shortlist, keep_best=2, start=a, stop=b) for a, b in ((0, 1), (1, 4))]
    for i, part in enumerate(parts):
        save_matches(tmp_path / f"part{i}.safetensors", part, meta={"slice": i})
    loaded = [load_matches(tmp_path / f"part{i}.safetensors") for i in range(2)]
    assert [meta for _, meta in loaded] == [{"slice": 0}, {"slice": 1}]
    joined = concatenate_matches([matches for matches, _ in loaded])
    for name in ("scores", "best", "query_xy", "gallery_xy", "offsets"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))
    assert whole.scores[0, 0] == 40 and whole.scores[1, 2] == 0
    query_xy, gallery_xy = joined.correspondences(2, 0)
    gallery = shortlist[2, joined.best[2, 0]]
    np.testing.assert_allclose(gallery_xy - query_xy, np.broadcast_to(3.0 * (gallery - 2), (40, 2)), atol=1e-4)
    with pytest.raises(ValueError, match="follow"):
        concatenate_matches([loaded[1][0], loaded[0][0]])


def test_split_matches_round_trip_through_the_run_folder(tmp_path):
    """`jaguar match`'s record of a split: names, shortlist and matches come back as written, from the
    path RunDir names for it; a changed byte is refused."""
    import numpy as np

    from jaguar.retrieval.local.matching import ShortlistMatches
    from jaguar.retrieval.local.store import LocalFeatureFileError, SplitMatches
    from jaguar.run import RunDir

    names = ["a.png", "b.png", "c.png"]
    shortlist = np.array([[1, 2], [0, 2], [0, -1]])
    scores = np.array([[12, 0], [12, 3], [0, 0]], dtype=np.float32)
    matches = ShortlistMatches(0, 3, scores, np.array([[0], [0], [-1]]), np.ones((4, 2), np.float32),
                               np.zeros((4, 2), np.float32), np.array([[0, 2], [2, 4], [4, 4]]))
    run = RunDir(tmp_path / "run")
    path = run.local_matches_path("val")
    path.parent.mkdir(parents=True)
    SplitMatches(names, shortlist, matches, {"B": 2}).save(path)
    loaded = SplitMatches.load(path)
    assert loaded.names == names and loaded.meta == {"B": 2}
    np.testing.assert_array_equal(loaded.shortlist, shortlist)
    np.testing.assert_array_equal(loaded.matches.scores, scores)
    np.testing.assert_array_equal(loaded.matches.correspondences(1)[0], np.ones((2, 2), np.float32))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LocalFeatureFileError, match="checksum"):
        SplitMatches.load(path)
