"""Matching the keypoints of two images: tentative correspondences by descriptor (nearest neighbours,
mutual, Lowe's ratio test), then geometric verification by a robust fit of a transformation that
cannot mirror; the local score of a pair is its number of verified inliers. `match_shortlist`
scores each query against its global shortlist only (N x B pairs, never N^2), on any contiguous
slice of the queries, so the work can be split over processes and resumed slice by slice.

Sources: Lowe, IJCV 2004 (ratio test); Fischler & Bolles 1981 (RANSAC); Barath et al., "MAGSAC++"
(CVPR 2020), OpenCV's `USAC_MAGSAC`; HotSpotter (Crall et al., WACV 2013) scores a verified match by
its inliers the same way. A reflection is never admitted: a left flank and a right flank carry
different coats, so a mirrored correspondence is never evidence of the same flank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import cv2
import numpy as np

from jaguar.retrieval.local.keypoints import LocalFeatureError, LocalFeatures

if TYPE_CHECKING:
    from jaguar.config import LocalConfig

GEOMETRIES = ("similarity", "affine", "homography")
# the fewest correspondences each model can be fitted to
_MINIMAL_SAMPLE = {"similarity": 2, "affine": 3, "homography": 4}
_MAX_ITERS = 2000
_CONFIDENCE = 0.999


@dataclass(frozen=True)
class MatchSettings:
    """How two images' keypoints are matched. ratio: the largest nearest / second-nearest descriptor
    distance a correspondence may have (1 disables the test); mutual: keep only mutual nearest
    neighbours; geometry: similarity (rotation, uniform scale, translation; RANSAC), affine or
    homography (MAGSAC++ where OpenCV has it), none admitting a reflection; ransac_threshold: the
    inlier reprojection error, a fraction of the gallery image's longest side."""

    ratio: float = 0.9
    mutual: bool = True
    geometry: str = "affine"
    ransac_threshold: float = 0.02

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise LocalFeatureError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise LocalFeatureError(f"ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 < self.ransac_threshold <= 1.0:
            raise LocalFeatureError(f"ransac_threshold must be in (0, 1], got {self.ransac_threshold}")

    @classmethod
    def from_config(cls, local: "LocalConfig") -> "MatchSettings":
        """The settings of the config group `retrieval.local`."""
        return cls(ratio=local.ratio, mutual=local.mutual, geometry=local.geometry,
                   ransac_threshold=local.ransac_threshold)


@dataclass
class PairMatch:
    """The verified match of a query image to a gallery image. inliers: the local score (0 when no
    transformation was found, or it mirrors); tentative: correspondences before verification;
    query_xy, gallery_xy: (inliers, 2) float32, the verified correspondences in each image's pixels."""

    inliers: int
    tentative: int
    query_xy: np.ndarray
    gallery_xy: np.ndarray


def tentative_matches(query_descriptors: np.ndarray, gallery_descriptors: np.ndarray, ratio: float = 0.9,
                      mutual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, gallery rows), int64 arrays of equal length: each query descriptor's nearest
    gallery descriptor (Euclidean; rows L2-normalised, (Kq, D) and (Kg, D) float32), kept when
    nearest / second-nearest distance < `ratio` (Lowe 2004; with one gallery descriptor there is no
    second and the test is passed) and, with `mutual`, the query descriptor is also the gallery
    descriptor's nearest. O(Kq x Kg x D) time, O(Kq x Kg) memory."""
    if len(query_descriptors) == 0 or len(gallery_descriptors) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    similarity = query_descriptors @ gallery_descriptors.T  # cosine: distance^2 = 2 - 2 * similarity
    rows = np.arange(similarity.shape[0])
    nearest = np.argmax(similarity, axis=1)
    best = similarity[rows, nearest]
    keep = np.ones(len(rows), dtype=bool)
    if ratio < 1.0 and similarity.shape[1] > 1:
        similarity[rows, nearest] = -np.inf
        second = similarity.max(axis=1)
        similarity[rows, nearest] = best
        best_distance = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
        second_distance = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
        keep &= best_distance < ratio * second_distance
    if mutual:
        keep &= np.argmax(similarity, axis=0)[nearest] == rows
    return rows[keep].astype(np.int64), nearest[keep].astype(np.int64)


def _orientation_preserving(homography: np.ndarray, points: np.ndarray) -> bool:
    """Whether `homography` keeps the orientation at every one of `points` (N, 2): its Jacobian's
    determinant, det(H) / w^3 with w = h31 x + h32 y + h33, is positive there."""
    w = points @ homography[2, :2] + homography[2, 2]
    return bool(np.all(np.linalg.det(homography) * w ** 3 > 0))


def verify(query_xy: np.ndarray, gallery_xy: np.ndarray, geometry: str, threshold: float) -> np.ndarray:
    """The inlier mask (N,) bool of tentative correspondences query_xy -> gallery_xy ((N, 2) float32
    pixels) under the best transformation of kind `geometry` (see MatchSettings), `threshold` pixels
    of reprojection error in the gallery image. All False when fewer correspondences than the
    model's minimal sample plus one are given, no model is found, or the model mirrors (a reflection
    is rejected, never counted). OpenCV's random generator is seeded, so a pair always gets the same
    inliers."""
    count = len(query_xy)
    none = np.zeros(count, dtype=bool)
    if count < _MINIMAL_SAMPLE[geometry] + 1:
        return none
    query_xy = np.ascontiguousarray(query_xy, dtype=np.float32)
    gallery_xy = np.ascontiguousarray(gallery_xy, dtype=np.float32)
    cv2.setRNGSeed(count)
    if geometry == "similarity":  # rotation, uniform scale and translation: a reflection is not expressible
        model, inliers = cv2.estimateAffinePartial2D(query_xy, gallery_xy, method=cv2.RANSAC,
                                                     ransacReprojThreshold=threshold, maxIters=_MAX_ITERS,
                                                     confidence=_CONFIDENCE)
        mirrors = False
    elif geometry == "affine":
        model, inliers = cv2.estimateAffine2D(query_xy, gallery_xy, method=_robust_method(),
                                              ransacReprojThreshold=threshold, maxIters=_MAX_ITERS,
                                              confidence=_CONFIDENCE)
        mirrors = model is not None and np.linalg.det(model[:, :2]) <= 0
    else:
        model, inliers = cv2.findHomography(query_xy, gallery_xy, _robust_method(), threshold,
                                            maxIters=_MAX_ITERS, confidence=_CONFIDENCE)
        mirrors = model is not None and not _orientation_preserving(model, query_xy[inliers.reshape(-1) > 0])
    if model is None or inliers is None or mirrors:
        return none
    return inliers.reshape(-1).astype(bool)


def _robust_method() -> int:
    """MAGSAC++ where this OpenCV has it (4.5+), else RANSAC."""
    return getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)


# A learned tentative matcher (e.g. LightGlue): (query, gallery) -> (query rows, gallery rows), int64
Matcher = Callable[[LocalFeatures, LocalFeatures], tuple[np.ndarray, np.ndarray]]


def match_pair(query: LocalFeatures, gallery: LocalFeatures, settings: MatchSettings = MatchSettings(),
               matcher: Optional[Matcher] = None) -> PairMatch:
    """The verified match of `query` to `gallery`: tentative matches (`tentative_matches` with the
    settings' ratio and mutual check, or `matcher` when given), then `verify`. Raises
    LocalFeatureError when their descriptors differ in width (features of two extractors)."""
    if len(query) and len(gallery) and query.descriptor_dim != gallery.descriptor_dim:
        raise LocalFeatureError(f"cannot match descriptors of width {query.descriptor_dim} against width "
                                f"{gallery.descriptor_dim}: the two images' features come from different extractors")
    if matcher is not None:
        query_rows, gallery_rows = matcher(query, gallery)
    else:
        query_rows, gallery_rows = tentative_matches(query.descriptors, gallery.descriptors, settings.ratio,
                                                     settings.mutual)
    query_xy, gallery_xy = query.keypoints[query_rows], gallery.keypoints[gallery_rows]
    threshold = settings.ransac_threshold * max(gallery.image_size)
    inliers = verify(query_xy, gallery_xy, settings.geometry, threshold)
    return PairMatch(int(inliers.sum()), len(query_rows), query_xy[inliers], gallery_xy[inliers])


@dataclass
class ShortlistMatches:
    """Local scores of queries [start, stop) against their shortlists, and the verified
    correspondences of each query's best candidates (what a review page draws).

    scores: (stop - start, B) float32, inliers of query start + i with gallery shortlist[start + i, j];
    0 where the shortlist holds no candidate (-1). best: (stop - start, keep) int64, column positions j
    in the shortlist of each query's best candidates by score (ties: by shortlist order), -1 where fewer.
    query_xy, gallery_xy: (T, 2) float32 correspondences of all kept candidates, concatenated;
    offsets: (stop - start, keep + 1) int64, candidate best[i, k]'s rows are offsets[i, k]:offsets[i, k + 1]."""

    start: int
    stop: int
    scores: np.ndarray
    best: np.ndarray
    query_xy: np.ndarray
    gallery_xy: np.ndarray
    offsets: np.ndarray

    def correspondences(self, query: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(query_xy, gallery_xy) of the `rank`-th best candidate of query number `query` (counted in
        the whole query set, start <= query < stop); empty arrays where there is none."""
        if not self.start <= query < self.stop:
            raise IndexError(f"query {query} is outside this slice [{self.start}, {self.stop})")
        row = query - self.start
        begin, end = self.offsets[row, rank], self.offsets[row, rank + 1]
        return self.query_xy[begin:end], self.gallery_xy[begin:end]


def match_shortlist(query_features: Sequence[LocalFeatures], gallery_features: Sequence[LocalFeatures],
                    shortlist: np.ndarray, settings: MatchSettings = MatchSettings(), start: int = 0,
                    stop: Optional[int] = None, keep_best: int = 5,
                    progress: Optional[Callable[[int], None]] = None,
                    matcher: Optional[Matcher] = None) -> ShortlistMatches:
    """Match queries [start, stop) against their shortlisted gallery images.

    query_features, gallery_features: indexable by image position (a list of LocalFeatures or a
    LocalFeatureSet); shortlist: (Nq, B) int, gallery positions of each query's top-B global
    candidates, -1 for none; keep_best: candidates per query whose correspondences are kept;
    progress: called with the number of queries just finished; matcher: a learned tentative matcher
    (see `match_pair`). Cost: (stop - start) x B pair
    matches. Deterministic: a slice gives the same result whichever process computes it.
    Raises LocalFeatureError on a shortlist of the wrong shape or naming a missing gallery image."""
    shortlist = np.asarray(shortlist)
    if shortlist.ndim != 2 or shortlist.shape[0] != len(query_features):
        raise LocalFeatureError(f"the shortlist must be (queries, B) = ({len(query_features)}, B), "
                                f"got shape {shortlist.shape}")
    if shortlist.size and (shortlist.max() >= len(gallery_features) or shortlist.min() < -1):
        raise LocalFeatureError(f"the shortlist names gallery positions outside [0, {len(gallery_features)}) "
                                f"(-1 is the only filler allowed): check it was made for this gallery")
    stop = len(query_features) if stop is None else min(stop, len(query_features))
    if not 0 <= start <= stop:
        raise LocalFeatureError(f"query slice [{start}, {stop}) is empty or outside [0, {len(query_features)}]")
    width = shortlist.shape[1]
    keep = min(keep_best, width)
    scores = np.zeros((stop - start, width), dtype=np.float32)
    best = np.full((stop - start, keep), -1, dtype=np.int64)
    offsets = np.zeros((stop - start, keep + 1), dtype=np.int64)
    kept_query, kept_gallery, total = [], [], 0
    for row, query_index in enumerate(range(start, stop)):
        query = query_features[query_index]
        matches: dict[int, PairMatch] = {}
        for column, gallery_index in enumerate(shortlist[query_index].tolist()):
            if gallery_index < 0:
                continue
            match = match_pair(query, gallery_features[gallery_index], settings, matcher)
            scores[row, column] = match.inliers
            matches[column] = match
        order = np.argsort(-scores[row], kind="stable")[:keep]
        for rank, column in enumerate(order.tolist()):
            offsets[row, rank] = total
            if column in matches:
                best[row, rank] = column
                kept_query.append(matches[column].query_xy)
                kept_gallery.append(matches[column].gallery_xy)
                total += matches[column].inliers
        offsets[row, keep] = total
        if progress is not None:
            progress(1)
    stack = (lambda parts: np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 2), np.float32))
    return ShortlistMatches(start, stop, scores, best, stack(kept_query), stack(kept_gallery), offsets)
