"""Post-processing of an all-vs-all search: QE/DBA-expanded cosine distance, optionally blended
with the k-reciprocal re-ranked distance, and the small grid search that chooses it on the
validation split by identity-balanced mAP."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from jaguar.config import PostConfig, RetrievalConfig
from jaguar.retrieval.features import FeatureSet
from jaguar.retrieval.metrics import evaluate
from jaguar.retrieval.qe import expand
from jaguar.retrieval.rerank import (Workers, euclidean_distance, k_reciprocal_rerank_single,
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


def _score(distance: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A table row's figures: identity-balanced mAP, mAP, rank-1/5/10 and mINP, all-vs-all."""
    return evaluate(distance, labels, kind="distance").summary()


def _row(name: str, distance: torch.Tensor, labels: torch.Tensor, post: PostConfig) -> dict[str, Any]:
    return {"name": name, **_score(distance, labels), "config": post.to_dict()}


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


def tune_post(val_features: FeatureSet, base: RetrievalConfig,
              search: bool = True) -> tuple[PostConfig, list[dict[str, Any]]]:
    """Choose QE, re-ranking and blend on the validation split by identity-balanced mAP.

    Stages, each built on what the previous one adopted: QE/DBA grid -> re-ranking (k1, k2,
    lambda at blend 1, then the blend weight w). Within a stage a candidate must beat the best
    so far strictly, so on equal scores the simpler setting (earlier in the grid) wins. A stage's best
    is then adopted only when its gain over the setting before it exceeds
    `base.tune_min_gain_se` standard errors of the paired per-identity AP differences: a search
    over dozens of settings on a few hundred images finds gains that are noise, and a validation
    set of a dozen identities cannot tell a 0.05 gain from chance (0 adopts any gain). With
    search=False the settings of `base` are evaluated and returned as they are. The table holds
    raw, +QE, +re-ranking (each stage's best) and the chosen setting side by side, with each
    stage's gain, its standard error and whether it was adopted. The search runs on a thread with
    one torch intra-op thread (many small tensor ops; see rerank.Workers)."""
    with Workers() as workers:
        return workers.run(val_features.embeddings.device, _tune_post, val_features, base, search)


def _tune_post(val_features: FeatureSet, base: RetrievalConfig,
               search: bool) -> tuple[PostConfig, list[dict[str, Any]]]:
    """The search behind tune_post."""
    labels = val_features.labels
    if bool((labels < 0).any()):
        raise ValueError("validation features have unknown labels (-1); tuning needs labelled images")
    embeddings = _embeddings(val_features)
    n = embeddings.shape[0]
    raw_post = PostConfig(rerank=False)
    raw = raw_distance(embeddings)
    table = [_row("raw", raw, labels, raw_post)]

    if not search:
        chosen = dataclasses.replace(base.post)
        qe_post = dataclasses.replace(raw_post, qe_k=chosen.qe_k, qe_alpha=chosen.qe_alpha, dba_k=chosen.dba_k)
        rr_post = dataclasses.replace(chosen, rerank=True, blend=1.0)
        table.append(_row("+QE", final_distance(embeddings, qe_post), labels, qe_post))
        table.append(_row("+re-ranking", final_distance(embeddings, rr_post), labels, rr_post))
        table.append(_row("blend (chosen)", final_distance(embeddings, chosen), labels, chosen))
        return chosen, table

    min_se = float(base.tune_min_gain_se)
    best_qe, best_qe_score, best_expanded = raw_post, table[0]["mAP_balanced"], embeddings
    for qe_k, alpha, dba_k in itertools.product(QE_KS, QE_ALPHAS, DBA_KS):
        if (qe_k == 0 and dba_k == 0) or (alpha and max(qe_k, dba_k) == 0):
            continue
        post = PostConfig(qe_k=qe_k, qe_alpha=alpha, dba_k=dba_k)
        expanded = expand(embeddings, qe_k, alpha, dba_k)
        score = _score(raw_distance(expanded), labels)["mAP_balanced"]
        if score > best_qe_score:
            best_qe, best_qe_score, best_expanded = post, score, expanded
    qe_distance = raw_distance(best_expanded)
    table.append(_row("+QE", qe_distance, labels, best_qe))
    # The incumbent: what the stages so far adopted.
    chosen, chosen_distance, chosen_row, base_embeddings = raw_post, raw, table[0], embeddings
    if _decide("+QE", paired_gain(qe_distance, raw, labels), min_se, table[-1]):
        chosen, chosen_distance, chosen_row, base_embeddings = best_qe, qe_distance, table[-1], best_expanded

    euclid = euclidean_distance(base_embeddings)
    best_rr, best_rr_score, best_reranked = None, float("-inf"), None
    for k1, k2 in itertools.product(K1S, K2S):
        if k1 >= n or k2 >= n:
            continue
        jaccard, original = k_reciprocal_terms_single(euclid, k1, k2)
        for lam in LAMBDAS:
            reranked = jaccard * (1 - lam) + original * lam
            score = _score(reranked, labels)["mAP_balanced"]
            if score > best_rr_score:
                best_rr = dataclasses.replace(chosen, rerank=True, k1=k1, k2=k2, lambda_value=lam, blend=1.0)
                best_rr_score, best_reranked = score, reranked
    if best_rr is None:
        logger.info("validation set of %d images is too small to re-rank; keeping %s", n, chosen)
        table.append({**_as_chosen(chosen_row), "name": "+re-ranking", "adopted": False})
        table.append(_as_chosen(chosen_row))
        return chosen, table
    best_blend, best_blend_score, best_blend_distance = best_rr, float("-inf"), best_reranked
    for weight in BLENDS[1:]:
        distance = best_reranked if weight == 1 else (1 - weight) * chosen_distance + weight * best_reranked
        score = _score(distance, labels)["mAP_balanced"]
        if score > best_blend_score:
            best_blend = dataclasses.replace(best_rr, blend=weight)
            best_blend_score, best_blend_distance = score, distance
    table.append(_row("+re-ranking", best_blend_distance, labels, best_blend))
    if _decide("+re-ranking", paired_gain(best_blend_distance, chosen_distance, labels), min_se, table[-1]):
        chosen, chosen_row = best_blend, table[-1]
    table.append(_as_chosen(chosen_row))
    return chosen, table


def _as_chosen(row: dict[str, Any]) -> dict[str, Any]:
    """The table's last row: the scores and config of the stage row that was adopted last."""
    return {**{k: v for k, v in row.items() if k not in ("adopted", "gain", "gain_se")}, "name": "blend (chosen)"}
