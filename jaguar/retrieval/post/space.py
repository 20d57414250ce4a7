"""What tune-post searches and where: the grids of its settings, and the space its candidates are
built and scored in (`SearchSpace`: N x N distances in jaguar.retrieval.post.dense, top-M ranked lists
in jaguar.retrieval.post.topm; jaguar.retrieval.post.search picks one)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from jaguar.config import PostConfig
from jaguar.core.evaluator import RetrievalMetrics

QE_KS = (0, 2, 3)  # qe_k = 1 is the item alone, i.e. the same as 0
QE_ALPHAS = (0.0, 3.0)
DBA_KS = (0, 2)
K1S = (3, 5, 8, 12, 20)
K2S = (1, 2, 3, 6)
LAMBDAS = (0.1, 0.3, 0.6)
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)


class SearchSpace(Protocol):
    """Where tune-post's candidates are built and scored, one set searched against itself: N x N
    distances here (`DenseSpace`), top-M ranked lists at gallery scale (jaguar.retrieval.post.topm.TopMSpace). A
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

    def run(self, search: Callable[..., Any], *args: Any) -> Any:
        """`search(self, *args)` run the way this space runs fastest (the dense kernel on worker
        threads of one torch intra-op thread each; top-M lists on the calling thread)."""


class RerankTerms(Protocol):
    def final(self, lambda_value: float, blend: float = 1.0) -> Any:
        """final = (1 - blend) * raw + blend * ((1 - lambda) * Jaccard + lambda * original)."""
