"""Post-processing in top-M form, for galleries too large for N x N: QE, alpha-QE and DBA from
each item's exact neighbour lists (jaguar.core.knn), k-reciprocal re-ranking in its bounded
mode and the raw/re-ranked blend over every pair that can reach an item's top M, and the
tune-post search over them (tune.search_post in a `TopMSpace`) scored by the evaluator's
ranked-list mode (jaguar.core.evaluator_ranked). Memory is O(N * M).

The lists are the dense path's top M (jaguar.retrieval.post.dense), with its values: the
expanded embeddings are the same (each row's neighbours are found exactly, ties by index), and
re-ranking scores each item's M nearest plus every item sharing a k-reciprocal neighbour with it,
which is all that can reach its top M. What top-M mode gives up is only the order beyond M: there
items keep their base cosine order, and figures over re-ranked lists say so."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from jaguar.config import PostConfig
from jaguar.core.features import FeatureSet
from jaguar.core.knn import Neighbours, knn, normalise
from jaguar.core.evaluator import RetrievalMetrics, ranked_basis
from jaguar.core.evaluator_ranked import RankedEvaluator
from jaguar.retrieval.post.space import K1S, K2S, QE_ALPHAS
from jaguar.retrieval.post.rerank_bounded import (OriginalNeighbours, k_reciprocal_lists_topm, k_reciprocal_terms_topm,
                                             original_neighbours)

logger = logging.getLogger(__name__)

_ROWS_PER_GATHER = 8192  # rows whose gathered neighbour vectors (rows x M x D) are held at once


def _embeddings(features: Union[FeatureSet, torch.Tensor]) -> torch.Tensor:
    return normalise("features", features.embeddings if isinstance(features, FeatureSet) else features)


def _expand_once(embeddings: torch.Tensor, k: int, alpha: float, neighbours: Optional[Neighbours] = None
                 ) -> torch.Tensor:
    """Each row replaced by the weighted mean of itself (weight 1) and its k-1 nearest other rows
    (weight sim^alpha, negative similarities clamped to 0; alpha 0: plain mean), re-normalised:
    jaguar.retrieval.post.qe.query_expansion from neighbour lists (`neighbours`: the rows' own lists,
    self excluded, at least k-1 long; searched when None)."""
    if alpha < 0:
        raise ValueError(f"retrieval.post.qe_alpha must be >= 0, got {alpha}")
    if k <= 1 or embeddings.shape[0] < 2:
        return embeddings
    if neighbours is None or neighbours.index.shape[1] < min(k - 1, embeddings.shape[0] - 1):
        neighbours = knn(embeddings, k=k - 1, exclude_self=True)
    index, similarity = neighbours.index[:, :k - 1], neighbours.similarity[:, :k - 1]
    weights = torch.ones_like(similarity) if alpha == 0 else similarity.clamp(min=0).pow(alpha)
    mixed = embeddings.clone()
    for start in range(0, embeddings.shape[0], _ROWS_PER_GATHER):
        stop = start + _ROWS_PER_GATHER
        mixed[start:stop] += torch.einsum("nk,nkd->nd", weights[start:stop], embeddings[index[start:stop]])
    return torch.nn.functional.normalize(mixed, dim=1)


def expand_topm(features: Union[FeatureSet, torch.Tensor], qe_k: int = 0, qe_alpha: float = 0.0,
                dba_k: int = 0, neighbours: Optional[Neighbours] = None) -> torch.Tensor:
    """All-vs-all expansion of one set (DBA first, then QE against it), as qe.expand: N x D.
    `neighbours`: the set's own lists (self excluded) when already searched; used for the first step."""
    result = _embeddings(features)
    if dba_k > 1:
        result, neighbours = _expand_once(result, dba_k, qe_alpha, neighbours), None
    return _expand_once(result, qe_k, qe_alpha, neighbours)


@dataclass(frozen=True)
class RankedLists:
    """Each item's top-M other items after post-processing, best first (equal distances: lower
    index first); items beyond M follow in the cosine order of `base`."""

    index: torch.Tensor  # (N, M) int64
    distance: torch.Tensor  # (N, M) float32 final distance, ascending
    base: torch.Tensor  # (N, D) the (expanded) embeddings the lists were searched with
    reordered: bool  # re-ranked within the top M


class RerankTerms:
    """The k-reciprocal terms of one (k1, k2) over each item's M nearest, itself excluded: Jaccard
    distance, normalised squared distance and cosine distance, lists sorted by index so any
    (lambda, blend) is one stable sort away. This is what tune-post's grid scores, re-ranking
    within the M nearest; the exact top M of a setting is `final_topm` (items from beyond the M
    nearest can enter it). `nearest` is the set's one kNN pass (rerank_bounded.original_neighbours,
    width >= max(k1 + 1, k2, M + 1)), shared by every (k1, k2)."""

    def __init__(self, nearest: OriginalNeighbours, k1: int, k2: int, top_m: int,
                 base: Optional[torch.Tensor] = None) -> None:
        n = nearest.rank.shape[0]
        index, jaccard = k_reciprocal_terms_topm(nearest, k1, k2, min(top_m + 1, n))
        square = nearest.square[:, :index.shape[1]]
        index, order = index.sort(dim=1)
        jaccard, square = jaccard.gather(1, order), square.gather(1, order)
        # The dense normalisation: squared distance over its row maximum; 1 - cos = s / 2.
        original = square / nearest.row_max[:, None]
        keep = index != torch.arange(n)[:, None]
        # A row whose list did not hold the item itself (more than M duplicates) drops its farthest entry.
        farthest = torch.where(square == square.amax(dim=1, keepdim=True), index, -1).argmax(dim=1)
        lost = keep.all(dim=1)
        keep[lost, farthest[lost]] = False
        width = index.shape[1] - 1
        self.index, self.jaccard = index[keep].view(n, width), jaccard[keep].view(n, width)
        self.original, self.raw = original[keep].view(n, width), (square / 2)[keep].view(n, width)
        self.base = nearest.features if base is None else base  # what the lists' evaluator counts beyond M on

    @staticmethod
    def neighbours(embeddings: torch.Tensor, top_m: int) -> OriginalNeighbours:
        """The one kNN pass that serves every (k1, k2) of the grid at this M."""
        return original_neighbours(embeddings, max(max(K1S) + 1, max(K2S), top_m + 1))

    def final(self, lambda_value: float, blend: float = 1.0) -> RankedLists:
        """Final = (1 - blend) * raw + blend * ((1 - lambda) * Jaccard + lambda * original)."""
        reranked = self.jaccard * (1 - lambda_value) + self.original * lambda_value
        final = reranked if blend == 1 else (1 - blend) * self.raw + blend * reranked
        final, order = final.sort(dim=1, stable=True)
        return RankedLists(self.index.gather(1, order), final, self.base, reordered=True)


def final_topm(features: Union[FeatureSet, torch.Tensor], post: PostConfig, top_m: int = 100) -> RankedLists:
    """Each item's top-M list under `post` (dense.final_distance in top-M form)."""
    expanded = expand_topm(features, post.qe_k, post.qe_alpha, post.dba_k)
    if not post.rerank or post.blend == 0:
        neighbours = knn(expanded, k=top_m, exclude_self=True)
        return RankedLists(neighbours.index, 1 - neighbours.similarity, expanded, reordered=False)
    return exact_lists(original_neighbours(expanded, max(post.k1 + 1, post.k2)), post, top_m, expanded)


def exact_lists(nearest: OriginalNeighbours, post: PostConfig, top_m: int, base: torch.Tensor) -> RankedLists:
    """The exact top M of re-ranking setting `post` over a set's kNN pass, the item itself left out
    (rerank_bounded.k_reciprocal_lists_topm): the dense path's lists and values."""
    index, final = k_reciprocal_lists_topm(nearest, post.k1, post.k2, post.lambda_value, top_m, post.blend,
                                           exclude_self=True)
    return RankedLists(index, final, base, reordered=True)


class _Scorer:
    """The evaluator of each base embedding set, made by the pass that searched its lists
    (RankedEvaluator.search): any list over that base, re-ordered or with items brought in from
    beyond M, is then scored without another N x N pass."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels, self.evaluators = labels, []

    def add(self, base: torch.Tensor, evaluator: RankedEvaluator) -> None:
        self.evaluators.append((base, evaluator))

    def __call__(self, lists: RankedLists) -> RetrievalMetrics:
        for base, evaluator in self.evaluators:
            if base is lists.base and evaluator.sorted_lists.shape[1] == lists.index.shape[1]:
                return evaluator.evaluate(lists.index, lists.reordered)
        _, evaluator = RankedEvaluator.search(lists.base, self.labels, lists.index.shape[1])
        self.add(lists.base, evaluator)
        return evaluator.evaluate(lists.index, lists.reordered)


class TopMSpace:
    """tune-post's search space at gallery scale (space.SearchSpace): candidates are each
    item's top-M lists, scored by the evaluator's ranked-list mode. The lists of each set searched
    before QE are kept, so QE of it reads its first neighbours from them; the re-ranking base is
    searched once for the whole (k1, k2) grid."""

    def __init__(self, features: Union[FeatureSet, torch.Tensor], labels: torch.Tensor, top_m: int) -> None:
        self.embeddings, self.top_m, self.metrics = _embeddings(features), int(top_m), _Scorer(labels)
        raw = self._search(self.embeddings)
        # The lists of each set before QE, by (dba_k, alpha): (its embeddings, its neighbours).
        self._before_qe = {(0, alpha): (self.embeddings, raw) for alpha in QE_ALPHAS}
        self._nearest: Optional[tuple[torch.Tensor, OriginalNeighbours]] = None  # (base, its kNN pass)

    def expanded(self, qe_k: int, qe_alpha: float, dba_k: int) -> tuple[torch.Tensor, RankedLists]:
        before = self._before_qe.get((dba_k, qe_alpha))
        if before is None:  # the DBA-expanded set, searched once for every QE on top of it
            augmented = _expand_once(self.embeddings, dba_k, qe_alpha, self._before_qe[(0, 0.0)][1])
            before = self._before_qe[(dba_k, qe_alpha)] = (augmented, self._search(augmented))
        expanded, neighbours = before
        if qe_k > 1:
            expanded = _expand_once(expanded, qe_k, qe_alpha, neighbours)
            neighbours = self._search(expanded)
        return expanded, RankedLists(neighbours.index, 1 - neighbours.similarity, expanded, reordered=False)

    def _search(self, embeddings: torch.Tensor) -> Neighbours:
        """The set's top-M lists, its evaluator kept for scoring them (one pass for both)."""
        neighbours, evaluator = RankedEvaluator.search(embeddings, self.metrics.labels, self.top_m)
        self.metrics.add(embeddings, evaluator)
        return neighbours

    def _nearest_of(self, embeddings: torch.Tensor) -> OriginalNeighbours:
        """The re-ranking base's one kNN pass, for every (k1, k2) and the exact lists."""
        if self._nearest is None or self._nearest[0] is not embeddings:
            self._nearest = (embeddings, RerankTerms.neighbours(embeddings, self.top_m))
        return self._nearest[1]

    def terms(self, embeddings: torch.Tensor, k1: int, k2: int) -> RerankTerms:
        return RerankTerms(self._nearest_of(embeddings), k1, k2, self.top_m, base=embeddings)

    def exact(self, embeddings: torch.Tensor, post: PostConfig, terms: RerankTerms) -> RankedLists:
        return exact_lists(self._nearest_of(embeddings), post, self.top_m, embeddings)

    def final(self, post: PostConfig) -> RankedLists:
        return final_topm(self.embeddings, post, self.top_m)

    def run(self, search: Callable[..., Any], *args: Any) -> Any:
        logger.info("tune-post in top-M mode (M = %d, %d images): re-ranked rows are figures %s", self.top_m,
                    len(self.embeddings), ranked_basis(self.top_m))
        return search(self, *args)
