"""Local pattern evidence for open-set identification: each photo's keypoints matched, with geometric
verification, against its top-B gallery images by the global (raw cosine) similarity, as `jaguar
match` does within a split (jaguar.retrieval.local), and the fused per-image probability
P(same individual) of WildFusion's route (jaguar.retrieval.post.fusion.FusionModel).

A gallery pair outside a photo's shortlist was never matched: it counts 0 inliers, so its fused
probability takes the local calibrator's value at 0 (the model's local floor), as `jaguar submit`
treats unshortlisted pairs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from jaguar.config import Config
from jaguar.retrieval.local.keypoints import LocalFeatures
from jaguar.retrieval.local.matching import MatchSettings, Matcher, PairMatch, match_pair
from jaguar.retrieval.openset.gallery import aggregate_by_individual
from jaguar.retrieval.post.fusion import FusionModel

log = logging.getLogger(__name__)


@dataclass
class LocalEvidence:
    """What local matching against a gallery needs: the gallery rows' local features (one entry a
    gallery row, in its order; None for a row without them, which then always counts 0 inliers), the
    match settings and tentative matcher of `retrieval.local`, and the shortlist width B."""
    gallery: Sequence[Optional[LocalFeatures]]
    settings: MatchSettings
    matcher: Optional[Matcher]
    shortlist: int

    @classmethod
    def from_config(cls, cfg: Config, gallery: Sequence[Optional[LocalFeatures]]) -> "LocalEvidence":
        from jaguar.retrieval.local.configured import make_matcher

        local = cfg.retrieval.local
        return cls(gallery, MatchSettings.from_config(local), make_matcher(local), int(local.shortlist))


def shortlist(similarity: np.ndarray, width: int, allowed: Optional[np.ndarray] = None) -> np.ndarray:
    """(Q, min(width, allowed count)) int64 gallery columns of each row's highest `similarity` (Q, N)
    among the `allowed` columns ((N,) bool, default all), best first; ties by column order (a stable
    sort, as jaguar.core.knn orders them)."""
    columns = np.arange(similarity.shape[1]) if allowed is None else np.nonzero(allowed)[0]
    width = min(int(width), columns.size)
    if width == 0:
        return np.zeros((similarity.shape[0], 0), dtype=np.int64)
    order = np.argsort(-similarity[:, columns], axis=1, kind="stable")[:, :width]
    return columns[order].astype(np.int64)


def match_shortlists(similarity: np.ndarray, queries: Sequence[LocalFeatures], evidence: LocalEvidence,
                     allowed: Optional[np.ndarray] = None, cache: Optional[dict] = None,
                     keep: bool = False) -> tuple[np.ndarray, dict[tuple[int, int], PairMatch]]:
    """Inlier counts (Q, N) float32 of the queries (their local features `queries`, global
    similarities `similarity` (Q, N) to the gallery) against their top-B allowed gallery images, 0
    for every other pair; and, when `keep`, the PairMatch of every matched pair keyed (query, gallery
    column). `cache` ((query, column) -> inliers, or -> PairMatch when keep) spares pairs already
    matched (calibration's folds shortlist overlapping sets). Cost: Q x B pair matches."""
    inliers = np.zeros(similarity.shape, dtype=np.float32)
    kept: dict[tuple[int, int], PairMatch] = {}
    cache = {} if cache is None else cache
    for query, row in enumerate(shortlist(similarity, evidence.shortlist, allowed).tolist()):
        for column in row:
            key = (query, column)
            if key not in cache:
                gallery = evidence.gallery[column]
                match = (match_pair(queries[query], gallery, evidence.settings, evidence.matcher)
                         if gallery is not None else PairMatch(0, 0, np.zeros((0, 2), np.float32),
                                                               np.zeros((0, 2), np.float32)))
                cache[key] = match if keep else match.inliers
            found = cache[key]
            inliers[query, column] = found.inliers if keep else found
            if keep:
                kept[key] = found
    return inliers, kept


def best_individual(probability: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """(Q,) the column of each row's highest `probability` (Q, I), ties (isotonic maps are flat in
    places) broken by the higher `cosine`, then by column order."""
    top = probability == probability.max(axis=1, keepdims=True)
    return np.argmax(np.where(top, cosine, -np.inf), axis=1)


def candidate_order(probability: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """(I,) the columns of one row by `probability` descending, ties by `cosine` descending, then by
    column order (the gallery's individual order)."""
    return np.lexsort((np.arange(probability.size), -cosine, -probability))


@dataclass
class Correspondence:
    """The verified match drawn on the review page for one candidate individual: its gallery image
    (`ref`, as Gallery.refs) with the most inliers among the photo's shortlist (ties and no match: the
    highest cosine), the inlier count, that image's cosine and fused probability, and the
    correspondences in each image's pixels ((K, 2) float32 x, y) with both images' (height, width)."""
    ref: str
    inliers: int
    cosine: float
    probability: float
    query_xy: np.ndarray
    gallery_xy: np.ndarray
    query_size: tuple[int, int]
    gallery_size: tuple[int, int]


def best_correspondence(rows: np.ndarray, similarity: np.ndarray, inliers: np.ndarray, probability: np.ndarray,
                        query: int, query_features: LocalFeatures, matches: dict[tuple[int, int], PairMatch],
                        evidence: LocalEvidence, refs: Sequence[str]) -> Correspondence:
    """The Correspondence of query `query` with the gallery rows `rows` of one individual (similarity,
    inliers and probability: that query's (N,) rows)."""
    best = int(rows[np.lexsort((-similarity[rows], -inliers[rows]))[0]])
    match = matches.get((query, best))
    gallery = evidence.gallery[best]
    empty = np.zeros((0, 2), np.float32)
    return Correspondence(refs[best], int(inliers[best]), float(similarity[best]), float(probability[best]),
                          match.query_xy if match is not None else empty,
                          match.gallery_xy if match is not None else empty, query_features.image_size,
                          gallery.image_size if gallery is not None else (0, 0))


@dataclass
class RankedPhoto:
    """One photo's candidate individuals (indices into the gallery's individuals), best first, with
    their aggregated cosine, fused probability, inliers of their best image and its Correspondence;
    known: the best probability reaches the threshold."""
    candidates: list[int]
    cosine: list[float]
    probability: list[float]
    inliers: list[int]
    correspondences: list[Correspondence]
    known: bool


def rank_with_evidence(similarity: np.ndarray, queries: Sequence[LocalFeatures], evidence: LocalEvidence,
                       model: FusionModel, individual: np.ndarray, count: int, refs: Sequence[str], top_n: int,
                       threshold: float, top_k: int) -> list[RankedPhoto]:
    """Each photo (similarity (Q, N) raw cosines to the gallery rows, local features `queries`)
    matched against its top-B gallery images, its image probabilities fused by `model`, aggregated
    per individual (`individual` (N,) the rows' individuals among `count`; top_n: 1 for "max", n for
    "mean_top<n>"), its top_k individuals ranked by that probability (ties: the aggregated cosine),
    and decided known when the best reaches `threshold`."""
    inliers, matches = match_shortlists(similarity, queries, evidence, keep=True)
    image_probability = model.fuse(similarity, inliers)
    probability = aggregate_by_individual(image_probability, individual, count, top_n)
    cosine = aggregate_by_individual(similarity.astype(np.float64), individual, count, top_n)
    ranked = []
    for query in range(similarity.shape[0]):
        order = candidate_order(probability[query], cosine[query])[:min(top_k, count)].tolist()
        shown = [best_correspondence(np.nonzero(individual == i)[0], similarity[query], inliers[query],
                                     image_probability[query], query, queries[query], matches, evidence, refs)
                 for i in order]
        ranked.append(RankedPhoto(order, [float(cosine[query, i]) for i in order],
                                  [float(probability[query, i]) for i in order], [c.inliers for c in shown], shown,
                                  bool(probability[query, order[0]] >= threshold)))
    return ranked
