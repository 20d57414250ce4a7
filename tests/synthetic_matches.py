"""Synthetic `jaguar match` results for tests of the pipeline's fusion: a split's SplitMatches made from
its features and labels (shortlist by raw cosine, self excluded; inliers many for the same identity and
few for another when informative), saved where RunDir puts them."""

from __future__ import annotations

import numpy as np

from jaguar.core.features import FeatureSet
from jaguar.retrieval.local.matching import ShortlistMatches
from jaguar.retrieval.local.store import SplitMatches


def synthetic_matches(features: FeatureSet, width: int = 8, seed: int = 0, informative: bool = True,
                      keep: int = 3, image_side: int = 48) -> SplitMatches:
    rng = np.random.default_rng(seed)
    embeddings = features.normalized().numpy().astype(np.float64)
    labels = features.labels.numpy()
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    width = min(width, len(features) - 1)
    shortlist = np.argsort(-similarity, axis=1, kind="stable")[:, :width]
    same = labels[:, None] == labels[shortlist]
    if informative:
        scores = np.where(same, rng.poisson(25, shortlist.shape), rng.poisson(2, shortlist.shape))
    else:
        scores = rng.poisson(5, shortlist.shape)
    scores = scores.astype(np.float32)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    counts = scores[np.arange(len(scores))[:, None], best].astype(np.int64)
    offsets = np.concatenate([np.zeros((len(scores), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    offsets += np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])[:, None]
    total = int(counts.sum())
    query_xy = rng.uniform(0, image_side - 1, (total, 2)).astype(np.float32)
    gallery_xy = np.clip(query_xy + rng.normal(0, 1, (total, 2)), 0, image_side - 1).astype(np.float32)
    matches = ShortlistMatches(0, len(features), scores, best, query_xy, gallery_xy, offsets)
    return SplitMatches(list(features.names), shortlist, matches, {"B": width})
