"""Post-processing in top-M form, for galleries too large for N x N: QE, alpha-QE and DBA from
each item's exact neighbour lists (jaguar.retrieval.knn), k-reciprocal re-ranking in its bounded
mode and the raw/re-ranked blend over each item's top-M original neighbours, and the tune-post
search over them scored by the evaluator's ranked-list mode. Memory is O(N * M).

The numbers are the dense path's (jaguar.retrieval.postprocess): the expanded embeddings are the
same (each row's neighbours are found exactly, ties by index), and the re-ranked distances at a
(row, column) pair equal the dense ones. What top-M mode gives up is only the order of columns
outside each item's top-M original neighbours, which keep their base cosine order: an item
outside them shares no k-reciprocal neighbour with the query in practice (Jaccard distance 1),
so the dense path ranks it after them too; the figures then say they are over re-ranked lists."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.retrieval.features import FeatureSet
from jaguar.retrieval.knn import Neighbours, knn, normalise
from jaguar.retrieval.metrics import RankedEvaluator, RetrievalMetrics, ranked_basis
from jaguar.retrieval.postprocess import BLENDS, DBA_KS, K1S, K2S, LAMBDAS, QE_ALPHAS, QE_KS, identity_gain
from jaguar.retrieval.rerank_bounded import k_reciprocal_rerank_topm

logger = logging.getLogger(__name__)

_ROWS_PER_GATHER = 8192  # rows whose gathered neighbour vectors (rows x M x D) are held at once


def use_topm(retrieval: RetrievalConfig, n_items: int) -> bool:
    """Whether a set of n_items is searched in top-M form under `retrieval.mode`."""
    return retrieval.mode == "topm" or (retrieval.mode == "auto" and n_items > retrieval.topm_above)


def _embeddings(features: Union[FeatureSet, torch.Tensor]) -> torch.Tensor:
    return normalise("features", features.embeddings if isinstance(features, FeatureSet) else features)


def _pair_cosine(embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cos(row i, row index[i, j]) for every listed pair: N x M."""
    out = torch.empty(index.shape, dtype=torch.float32)
    for start in range(0, index.shape[0], _ROWS_PER_GATHER):
        stop = start + _ROWS_PER_GATHER
        out[start:stop] = torch.einsum("nd,nmd->nm", embeddings[start:stop], embeddings[index[start:stop]])
    return out


def _expand_once(embeddings: torch.Tensor, k: int, alpha: float, neighbours: Optional[Neighbours] = None
                 ) -> torch.Tensor:
    """Each row replaced by the weighted mean of itself (weight 1) and its k-1 nearest other rows
    (weight sim^alpha, negative similarities clamped to 0; alpha 0: plain mean), re-normalised:
    jaguar.retrieval.qe.query_expansion from neighbour lists (`neighbours`: the rows' own lists,
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
    """The k-reciprocal terms of one (k1, k2) over each item's top-M original neighbours, itself
    excluded: Jaccard distance, normalised squared distance and cosine distance, lists sorted by
    index so any (lambda, blend) is one stable sort away."""

    def __init__(self, embeddings: torch.Tensor, k1: int, k2: int, top_m: int,
                 least_cosine: Optional[torch.Tensor] = None) -> None:
        n = embeddings.shape[0]
        index, jaccard = k_reciprocal_rerank_topm(embeddings, k1, k2, 0.0, top_m=min(top_m + 1, n))
        index, order = index.sort(dim=1)
        jaccard = jaccard.gather(1, order)
        cosine = _pair_cosine(embeddings, index)
        # The dense normalisation: squared distance over its row maximum, 2 - 2 * (the row's least cosine).
        if least_cosine is None:
            least_cosine = RerankTerms.least_cosine(embeddings)
        original = (2 - 2 * cosine).clamp(min=0) / (2 - 2 * least_cosine).clamp(min=1e-12)[:, None]
        keep = index != torch.arange(n)[:, None]
        # A row whose list did not hold the item itself (more than M duplicates) drops its farthest entry.
        farthest = torch.where(original == original.amax(dim=1, keepdim=True), index, -1).argmax(dim=1)
        lost = keep.all(dim=1)
        keep[lost, farthest[lost]] = False
        width = index.shape[1] - 1
        self.index, self.jaccard = index[keep].view(n, width), jaccard[keep].view(n, width)
        self.original, self.raw = original[keep].view(n, width), (1 - cosine)[keep].view(n, width)
        self.base = embeddings

    @staticmethod
    def least_cosine(embeddings: torch.Tensor) -> torch.Tensor:
        """Each row's least cosine to any row (N,): the farthest item, the top-1 of -row."""
        return -knn(-embeddings, embeddings, k=1).similarity[:, 0]

    def lists(self, lambda_value: float, blend: float = 1.0) -> RankedLists:
        """Final = (1 - blend) * raw + blend * ((1 - lambda) * Jaccard + lambda * original)."""
        reranked = self.jaccard * (1 - lambda_value) + self.original * lambda_value
        final = reranked if blend == 1 else (1 - blend) * self.raw + blend * reranked
        final, order = final.sort(dim=1, stable=True)
        return RankedLists(self.index.gather(1, order), final, self.base, reordered=True)


def final_topm(features: Union[FeatureSet, torch.Tensor], post: PostConfig, top_m: int = 100) -> RankedLists:
    """Each item's top-M list under `post` (postprocess.final_distance in top-M form)."""
    expanded = expand_topm(features, post.qe_k, post.qe_alpha, post.dba_k)
    if not post.rerank or post.blend == 0:
        neighbours = knn(expanded, k=top_m, exclude_self=True)
        return RankedLists(neighbours.index, 1 - neighbours.similarity, expanded, reordered=False)
    return RerankTerms(expanded, post.k1, post.k2, top_m).lists(post.lambda_value, post.blend)


class _Scorer:
    """Evaluators by list set: the ranks beyond M are counted once per base embedding and set."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels, self.evaluators = labels, []

    def __call__(self, lists: RankedLists) -> RetrievalMetrics:
        for base, evaluator in self.evaluators:
            if base is lists.base:
                try:
                    return evaluator.evaluate(lists.index, lists.reordered)
                except ValueError:
                    pass  # another item set (rounding-level ties at the M-th place): build one below
        evaluator = RankedEvaluator(lists.index, lists.base, self.labels)
        self.evaluators = [*self.evaluators[-3:], (lists.base, evaluator)]
        return evaluator.evaluate(lists.index, lists.reordered)


def _row(name: str, metrics: RetrievalMetrics, post: PostConfig) -> dict[str, Any]:
    return {"name": name, **metrics.summary(), "config": post.to_dict()}


def tune_post_topm(val_features: FeatureSet, base: RetrievalConfig,
                   search: bool = True) -> tuple[PostConfig, list[dict[str, Any]]]:
    """postprocess.tune_post in top-M form (M = base.top_m): the same stages, grids, strict-gain
    rule and table, each setting scored by the evaluator on its ranked lists."""
    from jaguar.retrieval.postprocess import _as_chosen, _decide

    labels = val_features.labels
    if bool((labels < 0).any()):
        raise ValueError("validation features have unknown labels (-1); tuning needs labelled images")
    top_m, score = int(base.top_m), _Scorer(labels)
    embeddings = _embeddings(val_features)
    n = embeddings.shape[0]
    raw_post = PostConfig(rerank=False)
    raw_lists = final_topm(embeddings, raw_post, top_m)
    raw_metrics = score(raw_lists)
    table = [_row("raw", raw_metrics, raw_post)]
    logger.info("tune-post in top-M mode (M = %d, %d images): re-ranked rows are figures %s", top_m, n,
                ranked_basis(top_m))
    if not search:
        chosen = dataclasses.replace(base.post)
        qe_post = dataclasses.replace(raw_post, qe_k=chosen.qe_k, qe_alpha=chosen.qe_alpha, dba_k=chosen.dba_k)
        for name, post in (("+QE", qe_post), ("+re-ranking", dataclasses.replace(chosen, rerank=True, blend=1.0)),
                           ("blend (chosen)", chosen)):
            table.append(_row(name, score(final_topm(embeddings, post, top_m)), post))
        return chosen, table

    min_se = float(base.tune_min_gain_se)
    best_qe, best_qe_metrics, best_expanded = raw_post, raw_metrics, embeddings
    # Each searched set's lists, by (dba_k, alpha): QE of it reads its first neighbours from them.
    searched = {(0, alpha): raw_lists for alpha in QE_ALPHAS}
    for qe_k, alpha, dba_k in itertools.product(QE_KS, QE_ALPHAS, DBA_KS):
        if (qe_k == 0 and dba_k == 0) or (alpha and max(qe_k, dba_k) == 0):
            continue
        post = PostConfig(qe_k=qe_k, qe_alpha=alpha, dba_k=dba_k)
        before_qe = searched.get((dba_k, alpha))
        if qe_k > 1 and before_qe is not None:
            expanded = _expand_once(before_qe.base, qe_k, alpha, Neighbours(before_qe.index, 1 - before_qe.distance))
        else:
            expanded = expand_topm(embeddings, qe_k, alpha, dba_k, Neighbours(raw_lists.index, 1 - raw_lists.distance))
        lists = final_topm(expanded, raw_post, top_m)
        if qe_k <= 1:
            searched[(dba_k, alpha)] = lists
        metrics = score(lists)
        if metrics.mAP_balanced > best_qe_metrics.mAP_balanced:
            best_qe, best_qe_metrics, best_expanded = post, metrics, expanded
    table.append(_row("+QE", best_qe_metrics, best_qe))
    chosen, chosen_metrics, chosen_row, base_embeddings = raw_post, raw_metrics, table[0], embeddings
    if _decide("+QE", identity_gain(best_qe_metrics.per_identity_ap, raw_metrics.per_identity_ap), min_se,
               table[-1]):
        chosen, chosen_metrics, chosen_row, base_embeddings = best_qe, best_qe_metrics, table[-1], best_expanded

    best_rr: Optional[PostConfig] = None
    best_rr_metrics, best_terms = None, None
    least_cosine = RerankTerms.least_cosine(base_embeddings)  # the same for every (k1, k2)
    for k1, k2 in itertools.product(K1S, K2S):
        if k1 >= n or k2 >= n:
            continue
        terms = RerankTerms(base_embeddings, k1, k2, top_m, least_cosine)
        for lam in LAMBDAS:
            metrics = score(terms.lists(lam))
            if best_rr_metrics is None or metrics.mAP_balanced > best_rr_metrics.mAP_balanced:
                best_rr = dataclasses.replace(chosen, rerank=True, k1=k1, k2=k2, lambda_value=lam, blend=1.0)
                best_rr_metrics, best_terms = metrics, terms
    if best_rr is None:
        logger.info("validation set of %d images is too small to re-rank; keeping %s", n, chosen)
        table.append({**_as_chosen(chosen_row), "name": "+re-ranking", "adopted": False})
        table.append(_as_chosen(chosen_row))
        return chosen, table
    best_blend, best_blend_metrics = best_rr, None
    for weight in BLENDS[1:]:
        metrics = score(best_terms.lists(best_rr.lambda_value, weight))
        if best_blend_metrics is None or metrics.mAP_balanced > best_blend_metrics.mAP_balanced:
            best_blend, best_blend_metrics = dataclasses.replace(best_rr, blend=weight), metrics
    table.append(_row("+re-ranking", best_blend_metrics, best_blend))
    if _decide("+re-ranking", identity_gain(best_blend_metrics.per_identity_ap, chosen_metrics.per_identity_ap),
               min_se, table[-1]):
        chosen, chosen_row = best_blend, table[-1]
    table.append(_as_chosen(chosen_row))
    return chosen, table
