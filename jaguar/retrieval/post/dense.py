"""Post-processing of an all-vs-all search in N x N form: QE/DBA-expanded cosine distance, optionally
blended with the k-reciprocal re-ranked distance (`final_distance`), and tune-post's search space
over it (`DenseSpace`). The top-M form for large galleries is jaguar.retrieval.post.topm; which form a
set takes is decided in jaguar.retrieval.post.search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from jaguar.config import PostConfig
from jaguar.core.evaluator import RetrievalMetrics, evaluate
from jaguar.core.features import FeatureSet
from jaguar.retrieval.post.qe import expand
from jaguar.retrieval.post.rerank import (Workers, euclidean_distance, k_reciprocal_rerank_single,
                                          k_reciprocal_terms_single)



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

    def run(self, search: Callable[..., Any], *args: Any) -> Any:
        # Many small tensor ops: one torch intra-op thread on a worker thread (see rerank.Workers).
        with Workers() as workers:
            return workers.run(self.embeddings.device, search, self, *args)


@dataclass(frozen=True)
class _DenseTerms:
    jaccard: torch.Tensor  # N x N
    original: torch.Tensor  # N x N, the normalised squared distance
    raw: torch.Tensor  # N x N cosine distance

    def final(self, lambda_value: float, blend: float = 1.0) -> torch.Tensor:
        reranked = self.jaccard * (1 - lambda_value) + self.original * lambda_value
        return reranked if blend == 1 else (1 - blend) * self.raw + blend * reranked
