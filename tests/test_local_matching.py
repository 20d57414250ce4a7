"""Local pattern evidence: RootSIFT keypoints on the animal only, verified matching that finds a coat
again under rotation, scale and cropping but not a different coat or a mirrored one, and shortlist
matching that gives the same scores on any slicing of the queries."""

import math

import cv2
import numpy as np
import pytest

from jaguar.config import Config, ConfigError
from jaguar.data.synth_render import render_image
from jaguar.retrieval.local.configured import make_extractor, make_matcher
from jaguar.retrieval.local.keypoints import FOREGROUND_ALPHA, LocalFeatureError, RootSIFTExtractor
from jaguar.retrieval.local.matching import MatchSettings, match_pair, match_shortlist, verify

SIZE = 192  # the demo's synthetic image size


def photo(name: str, index: int, flank: str = "left", size: int = SIZE) -> np.ndarray:
    return np.asarray(render_image(0, name, "train", index, size, flank=flank))


@pytest.fixture(scope="module")
def extractor():
    return RootSIFTExtractor(max_keypoints=1024, max_side=512)


def transformed_copy(rgba: np.ndarray, angle: float, scale: float, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """`rgba` rotated by `angle` degrees and scaled about its centre, then `crop` pixels cut from the
    left and top; returns the copy and the 2 x 3 map from original to copy pixels."""
    height, width = rgba.shape[:2]
    to_copy = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    to_copy[:, 2] -= crop
    copy = cv2.warpAffine(rgba, to_copy, (width - crop, height - crop), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return copy, to_copy


def test_a_rotated_scaled_cropped_copy_matches_where_it_should_and_another_coat_does_not(extractor):
    original = photo("Ariely", 0)
    copy, to_copy = transformed_copy(original, angle=25.0, scale=0.8, crop=12)
    query = extractor.extract(original)
    same = match_pair(query, extractor.extract(copy))
    other = match_pair(query, extractor.extract(photo("Bagua", 1)))
    assert len(query) >= 60
    assert same.inliers >= 25 and same.inliers >= 0.25 * len(query)
    assert other.inliers <= 8
    # the verified correspondences are where the transformation puts them, in each image's own pixels
    predicted = same.query_xy @ to_copy[:, :2].T + to_copy[:, 2]
    error = np.linalg.norm(predicted - same.gallery_xy, axis=1)
    assert np.median(error) < 1.5 and np.all(error < 0.02 * max(copy.shape[:2]) + 1e-3)


def test_coordinates_are_in_the_given_image_when_the_extractor_works_smaller():
    big = photo("Ariely", 0, size=384)
    small_worker = RootSIFTExtractor(max_side=192).extract(big)
    full_worker = RootSIFTExtractor(max_side=0).extract(big)
    assert small_worker.image_size == full_worker.image_size == (384, 384)
    # a keypoint found at half size lies within a couple of pixels of one found at full size
    distance = np.linalg.norm(small_worker.keypoints[:, None] - full_worker.keypoints[None], axis=2).min(axis=1)
    assert np.median(distance) < 2.0
    assert np.median(small_worker.scales) > 1.5 * np.median(full_worker.scales) / 2


def test_keypoints_lie_on_the_animal_and_the_background_never_reaches_a_descriptor(extractor):
    rgba = photo("Kwang", 3)
    features = extractor.extract(rgba)
    columns, rows = np.rint(features.keypoints).astype(int).T
    assert len(features) > 30
    assert np.all(rgba[rows, columns, 3] >= FOREGROUND_ALPHA)
    # the same animal on another background: identical features
    other = rgba.copy()
    background = other[..., 3] < FOREGROUND_ALPHA
    other[background, :3] = np.random.default_rng(0).integers(0, 256, (int(background.sum()), 3), dtype=np.uint8)
    again = extractor.extract(other)
    np.testing.assert_array_equal(again.keypoints, features.keypoints)
    np.testing.assert_array_equal(again.descriptors, features.descriptors)
    # RootSIFT rows have unit length; no mask, no keypoints
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    empty = rgba.copy()
    empty[..., 3] = 0
    assert len(extractor.extract(empty)) == 0


def test_the_keypoint_cap_keeps_the_strongest(extractor):
    rgba = photo("Kwang", 3)
    assert len(RootSIFTExtractor(max_keypoints=20).extract(rgba)) == 20
    with pytest.raises(LocalFeatureError, match="RGBA"):
        extractor.extract(rgba[..., :3])


@pytest.mark.parametrize("geometry", ["similarity", "affine", "homography"])
def test_a_mirror_transformation_is_never_verified(geometry):
    rng = np.random.default_rng(1)
    query_xy = rng.uniform(0, 192, (60, 2)).astype(np.float32)
    mirrored = np.column_stack([192 - query_xy[:, 0], query_xy[:, 1]]).astype(np.float32)
    # the mirror itself is rejected; at most a few points near the axis fit some proper transformation
    assert verify(query_xy, mirrored, geometry, 3.0).sum() <= 6
    rotation = np.array([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]], dtype=np.float32)
    rotated = query_xy @ rotation.T
    assert verify(query_xy, rotated + 5, geometry, 3.0).sum() == 60


def test_a_mirrored_coat_is_not_matched(extractor):
    original = photo("Oxum", 2)
    query = extractor.extract(original)
    mirrored = extractor.extract(np.ascontiguousarray(original[:, ::-1]))
    itself = match_pair(query, extractor.extract(original.copy()))
    assert itself.inliers >= 0.9 * len(query) >= 80
    for geometry in ("similarity", "affine", "homography"):  # chance level: a homography fits a few more
        assert match_pair(query, mirrored, MatchSettings(geometry=geometry)).inliers <= 0.1 * itself.inliers


def test_same_flank_photos_of_one_jaguar_outscore_other_jaguars_and_its_other_flank(extractor):
    left = [extractor.extract(photo("Saseka", i)) for i in range(3)]
    right = extractor.extract(photo("Saseka", 3, flank="right"))
    strangers = [extractor.extract(photo(name, 4 + i)) for i, name in enumerate(("Bororo", "Ipepo", "Marcela"))]
    same = [match_pair(left[0], other).inliers for other in left[1:]]
    different = [match_pair(left[0], other).inliers for other in strangers + [right]]
    assert min(same) > 3 * max(different) and min(same) >= 15


def test_shortlist_matching_is_the_same_on_any_slicing(extractor):
    names = ["Ariely", "Bagua", "Kwang"]
    features = [extractor.extract(photo(name, 10 * k + i)) for k, name in enumerate(names) for i in range(2)]
    shortlist = np.array([[j for j in range(6) if j != i] for i in range(6)])
    shortlist[2, 4] = -1  # a query with fewer candidates
    progress = []
    whole = match_shortlist(features, features, shortlist, keep_best=2, progress=progress.append)
    assert sum(progress) == 6 and whole.scores.shape == (6, 5) and whole.scores[2, 4] == 0
    for i in range(6):
        expected = [match_pair(features[i], features[j]).inliers if j >= 0 else 0 for j in shortlist[i]]
        np.testing.assert_array_equal(whole.scores[i], expected)
        best = whole.best[i, 0]
        assert whole.scores[i, best] == whole.scores[i].max()
        query_xy, gallery_xy = whole.correspondences(i, 0)
        assert len(query_xy) == len(gallery_xy) == whole.scores[i, best]
    # each image's partner (the other photo of its jaguar) is its best candidate
    assert [int(shortlist[i, whole.best[i, 0]]) for i in range(6)] == [1, 0, 3, 2, 5, 4]
    parts = [match_shortlist(features, features, shortlist, keep_best=2, start=a, stop=b) for a, b in ((0, 2), (2, 6))]
    np.testing.assert_array_equal(np.concatenate([p.scores for p in parts]), whole.scores)
    np.testing.assert_array_equal(parts[1].correspondences(4, 1)[1], whole.correspondences(4, 1)[1])
    with pytest.raises(LocalFeatureError, match="shortlist"):
        match_shortlist(features, features, shortlist[:3])
    with pytest.raises(LocalFeatureError, match="outside"):
        match_shortlist(features, features, shortlist + 6)


def test_the_config_picks_the_extractor_and_a_learned_one_needs_its_local_weights(tmp_path):
    cfg = Config()
    cfg.retrieval.local.max_keypoints = 50
    chosen = make_extractor(cfg.retrieval.local)
    assert isinstance(chosen, RootSIFTExtractor) and chosen.settings()["max_keypoints"] == 50
    assert MatchSettings.from_config(cfg.retrieval.local).geometry == cfg.retrieval.local.geometry
    cfg.retrieval.local.extractor = "disk"
    with pytest.raises(ConfigError, match="retrieval.local.weights_file"):
        make_extractor(cfg.retrieval.local)
    cfg.retrieval.local.weights_file = str(tmp_path / "disk.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        make_extractor(cfg.retrieval.local)
    with pytest.raises(ConfigError, match="choose one of"):
        cfg.retrieval.local.geometry = "reflection"


def test_disk_runs_from_a_local_weights_file_on_the_animal_only(tmp_path):
    torch = pytest.importorskip("torch")
    kornia_feature = pytest.importorskip("kornia.feature")
    torch.manual_seed(0)
    # randomly initialised weights stand in for a trained checkpoint: the code path, not the quality
    torch.save({"extractor": kornia_feature.DISK().state_dict()}, tmp_path / "disk.pth")
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    cfg = Config()
    cfg.retrieval.local.extractor = "disk"
    cfg.retrieval.local.max_keypoints = 64
    cfg.retrieval.local.weights_file = str(tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not hold DISK's weights"):
        make_extractor(cfg.retrieval.local, device="cpu")
    cfg.retrieval.local.weights_file = str(tmp_path / "disk.pth")
    disk = make_extractor(cfg.retrieval.local, device="cpu")
    images = [photo("Ariely", 0, size=96), photo("Bagua", 1, size=80)]
    features = disk.extract_batch(images)
    for rgba, found in zip(images, features):
        columns, rows = np.rint(found.keypoints).astype(int).T
        assert 0 < len(found) <= 64 and found.image_size == rgba.shape[:2]
        assert np.all(rgba[rows, columns, 3] >= FOREGROUND_ALPHA)
        np.testing.assert_allclose(np.linalg.norm(found.descriptors, axis=1), 1.0, atol=1e-5)
    assert match_pair(features[0], disk.extract(images[0])).tentative > 0


def test_lightglue_matches_from_a_local_weights_file_then_verification_follows(tmp_path, extractor):
    torch = pytest.importorskip("torch")
    kornia_feature = pytest.importorskip("kornia.feature")
    from jaguar.retrieval.local.learned import LightGlueMatcher

    cfg = Config()
    assert make_matcher(cfg.retrieval.local) is None  # nearest neighbours, the default
    cfg.retrieval.local.matcher = "lightglue"
    with pytest.raises(ConfigError, match="retrieval.local.matcher_weights_file"):
        make_matcher(cfg.retrieval.local, device="cpu")
    torch.manual_seed(0)
    # random weights stand in for trained ones; a zero filter threshold lets them match at all
    model = kornia_feature.LightGlue(features=None, input_dim=128, filter_threshold=0.0)
    torch.save(model.state_dict(), tmp_path / "lightglue.pth")
    cfg.retrieval.local.matcher_weights_file = str(tmp_path / "lightglue.pth")
    assert isinstance(make_matcher(cfg.retrieval.local, device="cpu"), LightGlueMatcher)
    features = extractor.extract(photo("Ipepo", 5, size=128))
    matched = match_pair(features, features, matcher=LightGlueMatcher(model, device="cpu"))
    assert matched.tentative >= 0.8 * len(features) and matched.inliers >= 0.8 * len(features)
    np.testing.assert_allclose(matched.query_xy, matched.gallery_xy)


def test_the_review_picture_joins_each_pair_of_matched_points_across_the_two_photos():
    from jaguar.retrieval.local.draw import draw_match

    query = np.zeros((100, 80, 4), np.uint8)
    query[..., 3] = 255
    gallery = np.zeros((50, 60, 4), np.uint8)
    gallery[..., 3] = 255
    picture = draw_match(query, gallery, [[40.0, 20.0]], [[10.0, 40.0]], height=200)
    assert picture.shape[:2] == (200 + 22, 160 + 8 + 240) and picture.dtype == np.uint8
    # the query point (scale 2) and the gallery point (scale 4, right of the query photo and the gap)
    # are both drawn, and so is the line's midpoint; the dark photos elsewhere stay dark
    for x, y in ((81, 41), (168 + 42, 162), ((81 + 210) // 2, (41 + 162) // 2)):
        assert picture[y - 3:y + 4, x - 3:x + 4].max() > 100
    assert picture[150:190, 20:60].max() == 0
    empty = draw_match(query, gallery, np.zeros((0, 2)), np.zeros((0, 2)), height=100)
    assert empty[:100].max() <= 24 and empty[100:].max() > 200  # no line (24: the gap); the caption
    with pytest.raises(ValueError, match="1 query points but 2"):
        draw_match(query, gallery, [[1, 1]], [[1, 1], [2, 2]])
