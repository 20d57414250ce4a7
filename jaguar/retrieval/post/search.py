"""The one search decision: a set searched against itself under a post-processing setting, in N x N
form (jaguar.retrieval.post.dense) or, above `retrieval.topm_above` images (or with
`retrieval.mode=topm`), in top-M form (jaguar.retrieval.post.topm: O(N * M) memory, no N x N).
`search_mode` is the only place the choice is made; tune-post (`tuning_space`), score's test table,
`jaguar rank` and the report's figures (`final_ranking`) all ask it here.

A setting may fuse its global score (1 - the final distance) with local pattern evidence
(jaguar.retrieval.post.fusion, the split's shortlist matches in jaguar.retrieval.post.local_evidence):
dense, `FusionModel.fuse_dense` over the N x N scores; top-M, `FusionModel.fuse_lists` over each
image's top-M list joined with its shortlist (`fuse_ranked_lists`), then re-sorted. Both rank by
`FusionModel.rank_scores`, ties by lower index, so they give the same lists wherever the top-M
form knows the global score of every shortlisted pair: exactly without re-ranking (a pair's score
is the cosine of the expanded embeddings); with re-ranking a shortlisted pair beyond the top M is
given the list's last score (its true score is at most that)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.core.evaluator import RetrievalMetrics
from jaguar.core.features import FeatureSet
from jaguar.retrieval.post.dense import DenseSpace, final_distance
from jaguar.retrieval.post.fusion import (FusionError, FusionModel, FusionSearch, IsotonicCalibrator, fit_fusion,
                                          search_weights)
from jaguar.retrieval.post.local_evidence import LocalEvidence
from jaguar.retrieval.post.space import SearchSpace
from jaguar.retrieval.post.topm import RankedLists, TopMSpace, final_topm

Mode = Literal["dense", "topm"]


def search_mode(retrieval: RetrievalConfig, n_items: int) -> Mode:
    """"topm" when `retrieval.mode` is topm, or auto and the set holds more than
    `retrieval.topm_above` items; "dense" otherwise."""
    if retrieval.mode == "topm" or (retrieval.mode == "auto" and n_items > retrieval.topm_above):
        return "topm"
    return "dense"


def tuning_space(features: Union[FeatureSet, torch.Tensor], labels: torch.Tensor,
                 retrieval: RetrievalConfig) -> SearchSpace:
    """tune-post's search space over a labelled set (features N x D, labels N): `DenseSpace` or
    `TopMSpace` with M = retrieval.top_m, as `search_mode` says for N."""
    if search_mode(retrieval, len(features)) == "topm":
        return TopMSpace(features, labels, int(retrieval.top_m))
    return DenseSpace(features, labels)


@dataclass
class FinalRanking:
    """The final ranking of one set against itself under a setting: each item's other items, best
    first. Dense: the N x N final distance (`distance`), from which any list is cut; top-M: each
    item's top-M lists (`lists`), searched once. `post` None is raw cosine (no tune-post result).
    With `fusion` (and the set's `local` evidence) the ranking is the fused one: similarity() the fused
    rank scores, distances 1 - them."""

    features: FeatureSet
    post: Optional[PostConfig]
    mode: Mode
    top_m: int
    fusion: Optional[FusionModel] = None
    local: Optional[LocalEvidence] = None
    _distance: Optional[torch.Tensor] = field(default=None, repr=False)
    _lists: Optional[RankedLists] = field(default=None, repr=False)

    @property
    def setting(self) -> PostConfig:
        return self.post or PostConfig()

    def __post_init__(self) -> None:
        if self.fusion is not None and self.local is None:
            raise FusionError("a fused ranking needs the set's local matches (`jaguar match`)")

    def distance(self) -> torch.Tensor:
        """N x N final distance (dense mode only; ValueError in top-M mode, which never builds it):
        the global setting's, or 1 - the fused rank scores."""
        if self.mode != "dense":
            raise ValueError(f"a top-M ranking of {len(self.features)} items has no N x N distance")
        if self._distance is None:
            self._distance = final_distance(self.features, self.setting)
            if self.fusion is not None:
                global_scores = 1.0 - self._distance.double().numpy()
                fused = self.fusion.fuse_dense(global_scores, self.local.shortlist, self.local.scores)
                self._distance = torch.from_numpy(1.0 - fused)
        return self._distance

    def global_scores(self) -> np.ndarray:
        """N x N float64 global scores the fusion calibrates (dense mode only): 1 - the global
        setting's final distance (cosine similarity for raw)."""
        return 1.0 - final_distance(self.features, self.setting).double().numpy()

    def similarity(self) -> np.ndarray:
        """N x N float64 scores, higher = more alike (dense mode only): the fused rank scores, else
        the negated final distance, or for raw cosine (post None) the dot products of the embeddings
        as given (L2-normalised by the caller: their cosine similarity)."""
        if self.fusion is not None:
            return 1.0 - self.distance().double().numpy()
        if self.post is None:
            embeddings = self.features.embeddings
            return (embeddings @ embeddings.T).double().numpy()
        return -torch.as_tensor(self.distance()).double().numpy()

    def lists(self, top_k: Optional[int] = None) -> RankedLists:
        """Each item's top-k other items (k <= N - 1; default M in top-M mode, N - 1 dense), best first,
        ties by lower index; in top-M mode lists longer than M are searched at that length."""
        n = len(self.features)
        if self.mode == "topm":
            width = max(int(top_k or 0), self.top_m)
            if self._lists is None or self._lists.index.shape[1] < min(width, n - 1):
                self._lists = final_topm(self.features, self.setting, width)
                if self.fusion is not None:
                    self._lists = fuse_ranked_lists(self._lists, self.fusion, self.local)
            lists = self._lists
        else:
            distance = self.distance().clone()
            distance.fill_diagonal_(float("inf"))
            values, index = distance.sort(dim=1, stable=True)
            lists = RankedLists(index[:, :n - 1], values[:, :n - 1], self.features.embeddings, reordered=False)
        k = min(int(top_k or lists.index.shape[1]), lists.index.shape[1])
        return RankedLists(lists.index[:, :k], lists.distance[:, :k], lists.base, lists.reordered)


def final_ranking(features: FeatureSet, post: Optional[PostConfig],
                  retrieval: Optional[RetrievalConfig] = None, fusion: Optional[FusionModel] = None,
                  local: Optional[LocalEvidence] = None) -> FinalRanking:
    """The final ranking of `features` (N x D, one set against itself) under `post` (None: raw
    cosine) in the form `search_mode` gives for N under `retrieval` (defaults when None), fused with
    the set's `local` evidence when `fusion` is given (FusionError when it is and `local` is not).
    Nothing is computed until a distance, similarity or list is asked for."""
    retrieval = retrieval or RetrievalConfig()
    return FinalRanking(features, post, search_mode(retrieval, len(features)), int(retrieval.top_m), fusion, local)


def shortlist_global(lists: RankedLists, local: LocalEvidence) -> tuple[np.ndarray, np.ndarray]:
    """(global, listed): the global score (1 - final distance) of each shortlisted pair (N, B) float64
    (0 where the shortlist has no candidate) as the top-M form knows it: the list's value where the
    pair is in the query's top-M list (`listed`, (N, B) bool), else the cosine of `lists.base` when
    the lists are not re-ranked (exact), else the list's last score (an upper bound)."""
    index = lists.index.numpy().astype(np.int64)
    n, width = index.shape
    list_global = 1.0 - lists.distance.double().numpy()
    shortlist = local.shortlist
    rows = np.arange(n)[:, None]
    keys = (rows * n + index).reshape(-1)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], list_global.reshape(-1)[order]
    wanted = rows * n + np.maximum(shortlist, 0)
    position = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    listed = (shortlist >= 0) & (keys[position] == wanted) if len(keys) else np.zeros(shortlist.shape, bool)
    if lists.reordered:
        outside = np.broadcast_to(list_global[:, -1:] if width else np.zeros((n, 1)), shortlist.shape)
    else:
        base = lists.base.double()
        gathered = base[torch.from_numpy(np.maximum(shortlist, 0))]  # (N, B, D)
        outside = torch.einsum("nd,nbd->nb", base, gathered).numpy()
    scores = np.where(listed, values[position], outside)
    return np.where(shortlist >= 0, scores, 0.0), listed


def fuse_ranked_lists(lists: RankedLists, fusion: FusionModel, local: LocalEvidence) -> RankedLists:
    """Top-M lists (N x M, global scores 1 - distance) fused with the set's local evidence: each
    list joined with the query's shortlisted candidates it lacks (their global score as
    `shortlist_global` gives it), scored by `FusionModel.fuse_lists` (rank scores) and cut back to
    M, best first, ties by lower index. distance = 1 - fused score; `reordered` (the evaluator ranks
    them in this order)."""
    index = lists.index.numpy().astype(np.int64)
    n, width = index.shape
    shortlist = local.shortlist
    pair_global, listed = shortlist_global(lists, local)
    missing = (shortlist >= 0) & (shortlist != np.arange(n)[:, None]) & ~listed
    candidates = np.concatenate([index, np.where(missing, shortlist, -1)], axis=1)
    scores = np.concatenate([1.0 - lists.distance.double().numpy(), np.where(missing, pair_global, 0.0)], axis=1)
    fused = fusion.fuse_lists(scores, candidates, shortlist, local.scores)
    by_index = np.argsort(np.where(candidates >= 0, candidates, n), axis=1, kind="stable")
    candidates, fused = np.take_along_axis(candidates, by_index, 1), np.take_along_axis(fused, by_index, 1)
    order = np.argsort(-fused, axis=1, kind="stable")[:, :width]
    index_out = torch.from_numpy(np.take_along_axis(candidates, order, 1))
    distance = torch.from_numpy(1.0 - np.take_along_axis(fused, order, 1)).float()
    return RankedLists(index_out, distance, lists.base, reordered=True)


def score_setting(space: SearchSpace, post: PostConfig, fusion: Optional[FusionModel] = None,
                  local: Optional[LocalEvidence] = None) -> RetrievalMetrics:
    """The evaluator's figures of one whole setting in a tuning space (its labelled set), fused with
    the set's `local` evidence when `fusion` is given."""
    candidate = space.final(post)
    if fusion is not None:
        if isinstance(candidate, RankedLists):
            candidate = fuse_ranked_lists(candidate, fusion, local)
        else:
            global_scores = 1.0 - torch.as_tensor(candidate).double().numpy()
            candidate = torch.from_numpy(1.0 - fusion.fuse_dense(global_scores, local.shortlist, local.scores))
    return space.metrics(candidate)


def fit_setting_fusion(space: SearchSpace, post: PostConfig, labels: np.ndarray, local: LocalEvidence
                       ) -> tuple[FusionSearch, RetrievalMetrics]:
    """(the fusion search, the global setting's figures) of setting `post` with the labelled set's
    `local` evidence in its tuning space: dense, `fit_fusion` over the N x N global scores (1 - final
    distance); top-M, the same search (`search_weights`: cross-fitted calibrators, weights by
    identity-balanced mAP) over each image's top-M list joined with its shortlist
    (`shortlist_global`, `fuse_ranked_lists`), scored by the evaluator's ranked-list mode. Raises
    FusionError when the shortlisted pairs are all of one kind."""
    candidate = space.final(post)
    if not isinstance(candidate, RankedLists):
        global_scores = 1.0 - torch.as_tensor(candidate).double().numpy()
        return fit_fusion(global_scores, labels, local.shortlist, local.scores), space.metrics(candidate)
    pair_global, _ = shortlist_global(candidate, local)
    query_rows, columns = np.nonzero(local.shortlist >= 0)
    gallery = local.shortlist[query_rows, columns]
    usable = (gallery != query_rows) & (labels[gallery] >= 0)

    def calibrate(rows: np.ndarray) -> tuple[IsotonicCalibrator, IsotonicCalibrator]:
        keep = usable & rows[query_rows] & (labels[query_rows] >= 0)
        same = labels[query_rows[keep]] == labels[gallery[keep]]
        return (IsotonicCalibrator.fit(pair_global[query_rows[keep], columns[keep]], same),
                IsotonicCalibrator.fit(local.scores[query_rows[keep], columns[keep]], same))

    def fused_metrics(weight: float, fitted: list) -> RetrievalMetrics:
        index, distance = candidate.index.clone(), candidate.distance.clone().float()
        for rows, (global_calibrator, local_calibrator) in fitted:
            fused = fuse_ranked_lists(candidate, FusionModel(global_calibrator, local_calibrator, weight), local)
            take = torch.from_numpy(np.asarray(rows, dtype=bool))
            index[take], distance[take] = fused.index[take].to(index.dtype), fused.distance[take]
        return space.metrics(RankedLists(index, distance, candidate.base, reordered=True))

    return search_weights(labels, calibrate, fused_metrics), space.metrics(candidate)
