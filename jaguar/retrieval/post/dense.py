"""Post-processing of an all-vs-all search: QE/DBA-expanded cosine distance, optionally blended
with the k-reciprocal re-ranked distance, and the small grid search that chooses it on the
validation split by identity-balanced mAP."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Protocol, Union

import numpy as np
import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.core.features import FeatureSet
from jaguar.core.evaluator import RetrievalMetrics, evaluate
from jaguar.retrieval.post.qe import expand
from jaguar.retrieval.post.rerank import (Workers, euclidean_distance, k_reciprocal_rerank_single,
                                     k_reciprocal_terms_single)

logger = logging.getLogger(__name__)

QE_KS = (0, 2, 3)  # qe_k = 1 is the item alone, i.e. the same as 0
QE_ALPHAS = (0.0, 3.0)
DBA_KS = (0, 2)
K1S = (3, 5, 8, 12, 20)
K2S = (1, 2, 3, 6)
LAMBDAS = (0.1, 0.3, 0.6)
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _embeddings(features: Union[FeatureSet, torch.Tensor]) -> torch.Tensor:
    tensor = features.embeddings if isinstance(features, FeatureSet) else torch.as_tensor(features)
    return torch.nn.functional.normalize(tensor.float(), dim=1)


def raw_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine distance 1 - cos, in [0, 2]."""
    return 1 - embeddings @ embeddings.T


def final_distance(features: Union[FeatureSet, torch.Tensor], post: PostConfig) -> torch.Tensor:
    """N x N final distance of one set against itself: cosine distance of the (DBA/QE-expanded)
    embeddings, blended with their re-ranked distance when post.rerank:
    final = (1 - blend) * raw + blend * reranked."""
    expanded = expand(_embeddings(features), post.qe_k, post.qe_alpha, post.dba_k)
    raw = raw_distance(expanded)
    if not post.rerank or post.blend == 0:
        return raw
    reranked = k_reciprocal_rerank_single(euclidean_distance(expanded), post.k1, post.k2, post.lambda_value)
    return (1 - post.blend) * raw + post.blend * reranked


@dataclass
class Gain:
    """A candidate's identity-balanced mAP gain over the incumbent and its standard error: the
    mean and the standard error of the paired per-identity AP differences."""
    gain: float
    se: float
    identities: int

    def clears(self, min_se: float) -> bool:
        """Adopt the candidate: it gains, by more than min_se standard errors."""
        return self.gain > 0 and self.gain > min_se * self.se

    def describe(self) -> str:
        return f"{_gain_text(self.gain, self.se)} (SE over {self.identities} identities)"


def _gain_text(gain: float, se: float) -> str:
    return f"{gain:+.4f} +- {se:.4f}"


def paired_gain(candidate: torch.Tensor, incumbent: torch.Tensor, labels: torch.Tensor) -> Gain:
    """Gain of distance `candidate` over `incumbent` on one labelled set. With one identity
    there is no spread to measure: the standard error is taken as 0."""
    return identity_gain(evaluate(candidate, labels, kind="distance").per_identity_ap,
                         evaluate(incumbent, labels, kind="distance").per_identity_ap)


def identity_gain(new: dict[int, float], old: dict[int, float]) -> Gain:
    """Gain of per-identity APs `new` over `old` (the same identities): mean and standard error
    of the paired differences; with one identity the standard error is taken as 0."""
    diff = np.array([new[k] - old[k] for k in sorted(old)])
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return Gain(float(diff.mean()), se, len(diff))


def _decide(stage: str, gain: Gain, min_se: float, row: dict[str, Any]) -> bool:
    adopted = gain.clears(min_se)
    row.update(gain=gain.gain, gain_se=gain.se, adopted=adopted)
    if not adopted:
        logger.info("%s: validation gain %s is not above %.1f standard error(s); not adopted",
                    stage, gain.describe(), min_se)
    return adopted


class SearchSpace(Protocol):
    """Where tune-post's candidates are built and scored, one set searched against itself: N x N
    distances here (`DenseSpace`), top-M ranked lists at gallery scale (topm.TopMSpace). A
    candidate is whatever the space scores: a distance matrix or ranked lists."""

    embeddings: torch.Tensor  # (N, D) L2-normalised

    def expanded(self, qe_k: int, qe_alpha: float, dba_k: int) -> tuple[torch.Tensor, Any]:
        """The DBA/QE-expanded embeddings and their cosine-distance candidate."""

    def terms(self, embeddings: torch.Tensor, k1: int, k2: int) -> RerankTerms:
        """The k-reciprocal terms of (k1, k2) over these embeddings."""

    def exact(self, embeddings: torch.Tensor, post: PostConfig, terms: RerankTerms) -> Any:
        """The candidate of re-ranking setting `post` over these embeddings, exactly: the grid may
        score a cheaper form (top-M lists re-ranked within each item's M nearest)."""

    def final(self, post: PostConfig) -> Any:
        """The candidate of one whole setting."""

    def metrics(self, candidate: Any) -> RetrievalMetrics:
        """The evaluator's figures of a candidate against the set's labels."""


class RerankTerms(Protocol):
    def final(self, lambda_value: float, blend: float = 1.0) -> Any:
        """final = (1 - blend) * raw + blend * ((1 - lambda) * Jaccard + lambda * original)."""


class DenseSpace:
    """The N x N space: candidates are final distance matrices, scored by `evaluate`. The
    Euclidean and cosine distances of the re-ranking base are made once for the (k1, k2) grid."""

    def __init__(self, features: Union[FeatureSet, torch.Tensor], labels: torch.Tensor) -> None:
        self.embeddings, self.labels = _embeddings(features), labels
        self._base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # embeddings, euclid, raw

    def expanded(self, qe_k: int, qe_alpha: float, dba_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        expanded = self.embeddings if max(qe_k, dba_k) <= 1 else expand(self.embeddings, qe_k, qe_alpha, dba_k)
        return expanded, raw_distance(expanded)

    def terms(self, embeddings: torch.Tensor, k1: int, k2: int) -> "_DenseTerms":
        if self._base is None or self._base[0] is not embeddings:
            self._base = (embeddings, euclidean_distance(embeddings), raw_distance(embeddings))
        return _DenseTerms(*k_reciprocal_terms_single(self._base[1], k1, k2), self._base[2])

    def exact(self, embeddings: torch.Tensor, post: PostConfig, terms: "_DenseTerms") -> torch.Tensor:
        return terms.final(post.lambda_value, post.blend)

    def final(self, post: PostConfig) -> torch.Tensor:
        return final_distance(self.embeddings, post)

    def metrics(self, candidate: torch.Tensor) -> RetrievalMetrics:
        return evaluate(candidate, self.labels, kind="distance")


@dataclass(frozen=True)
class _DenseTerms:
    jaccard: torch.Tensor  # N x N
    original: torch.Tensor  # N x N, the normalised squared distance
    raw: torch.Tensor  # N x N cosine distance

    def final(self, lambda_value: float, blend: float = 1.0) -> torch.Tensor:
        reranked = self.jaccard * (1 - lambda_value) + self.original * lambda_value
        return reranked if blend == 1 else (1 - blend) * self.raw + blend * reranked


def tune_post(val_features: FeatureSet, base: RetrievalConfig,
              search: bool = True) -> tuple[PostConfig, list[dict[str, Any]]]:
    """Choose QE, re-ranking and blend on the validation split by identity-balanced mAP, over
    N x N distances (`search_post` in a `DenseSpace`). The search runs on a thread with one torch
    intra-op thread (many small tensor ops; see rerank.Workers)."""
    labels = _labelled(val_features)
    with Workers() as workers:
        return workers.run(val_features.embeddings.device, search_post, DenseSpace(val_features, labels), base,
                           search)


def _labelled(val_features: FeatureSet) -> torch.Tensor:
    if bool((val_features.labels < 0).any()):
        raise ValueError("validation features have unknown labels (-1); tuning needs labelled images")
    return val_features.labels


def _row(name: str, metrics: RetrievalMetrics, post: PostConfig) -> dict[str, Any]:
    return {"name": name, **metrics.summary(), "config": post.to_dict()}


def search_post(space: SearchSpace, base: RetrievalConfig,
                search: bool = True) -> tuple[PostConfig, list[dict[str, Any]]]:
    """The tune-post search, whatever the space. Stages, each built on what the previous one
    adopted: QE/DBA grid -> re-ranking (k1, k2, lambda at blend 1, then the blend weight w).
    Within a stage a candidate must beat the best so far strictly, so on equal scores the simpler
    setting (earlier in the grid) wins. A stage's best is then adopted only when its gain over the
    setting before it exceeds `base.tune_min_gain_se` standard errors of the paired per-identity
    AP differences: a search over dozens of settings on a few hundred images finds gains that are
    noise, and a validation set of a dozen identities cannot tell a 0.05 gain from chance (0
    adopts any gain). With search=False the settings of `base` are evaluated and returned as they
    are. The table holds raw, +QE, +re-ranking (each stage's best) and the chosen setting side by
    side, with each stage's gain, its standard error and whether it was adopted."""
    n = space.embeddings.shape[0]
    raw_post = PostConfig(rerank=False)
    raw_metrics = space.metrics(space.expanded(0, 0.0, 0)[1])
    table = [_row("raw", raw_metrics, raw_post)]
    if not search:
        chosen = dataclasses.replace(base.post)
        qe_post = dataclasses.replace(raw_post, qe_k=chosen.qe_k, qe_alpha=chosen.qe_alpha, dba_k=chosen.dba_k)
        for name, post in (("+QE", qe_post), ("+re-ranking", dataclasses.replace(chosen, rerank=True, blend=1.0)),
                           ("blend (chosen)", chosen)):
            table.append(_row(name, space.metrics(space.final(post)), post))
        return chosen, table

    min_se = float(base.tune_min_gain_se)
    best_qe, best_qe_metrics, best_expanded = raw_post, raw_metrics, space.embeddings
    for qe_k, alpha, dba_k in itertools.product(QE_KS, QE_ALPHAS, DBA_KS):
        if (qe_k == 0 and dba_k == 0) or (alpha and max(qe_k, dba_k) == 0):
            continue
        if dba_k == 0 and qe_k in DBA_KS:
            continue  # all-vs-all, QE of k is DBA of k: the same expansion, scored earlier in the grid
        expanded, candidate = space.expanded(qe_k, alpha, dba_k)
        metrics = space.metrics(candidate)
        if metrics.mAP_balanced > best_qe_metrics.mAP_balanced:
            best_qe, best_qe_metrics, best_expanded = PostConfig(qe_k=qe_k, qe_alpha=alpha, dba_k=dba_k), metrics, expanded
    table.append(_row("+QE", best_qe_metrics, best_qe))
    # The incumbent: what the stages so far adopted.
    chosen, chosen_metrics, chosen_row, base_embeddings = raw_post, raw_metrics, table[0], space.embeddings
    if _decide("+QE", identity_gain(best_qe_metrics.per_identity_ap, raw_metrics.per_identity_ap), min_se,
               table[-1]):
        chosen, chosen_metrics, chosen_row, base_embeddings = best_qe, best_qe_metrics, table[-1], best_expanded

    best_rr, best_rr_metrics, best_terms = None, None, None
    for k1, k2 in itertools.product(K1S, K2S):
        if k1 >= n or k2 >= n:
            continue
        terms = space.terms(base_embeddings, k1, k2)
        for lam in LAMBDAS:
            metrics = space.metrics(terms.final(lam))
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
        metrics = space.metrics(best_terms.final(best_rr.lambda_value, weight))
        if best_blend_metrics is None or metrics.mAP_balanced > best_blend_metrics.mAP_balanced:
            best_blend, best_blend_metrics = dataclasses.replace(best_rr, blend=weight), metrics
    # The stage's figures and decision on its exact candidate (the grid may have scored a cheaper form).
    best_blend_metrics = space.metrics(space.exact(base_embeddings, best_blend, best_terms))
    table.append(_row("+re-ranking", best_blend_metrics, best_blend))
    if _decide("+re-ranking", identity_gain(best_blend_metrics.per_identity_ap, chosen_metrics.per_identity_ap),
               min_se, table[-1]):
        chosen, chosen_row = best_blend, table[-1]
    table.append(_as_chosen(chosen_row))
    return chosen, table


def _as_chosen(row: dict[str, Any]) -> dict[str, Any]:
    """The table's last row: the scores and config of the stage row that was adopted last."""
    return {**{k: v for k, v in row.items() if k not in ("adopted", "gain", "gain_se")}, "name": "blend (chosen)"}
