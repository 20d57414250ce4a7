"""Query expansion on L2-normalised embeddings: top-k average QE, alpha-weighted QE (αQE) and
database-side augmentation (DBA). Every result is re-normalised to unit length."""

from __future__ import annotations

from typing import Optional

import torch


def _normalise(name: str, embeddings: torch.Tensor) -> torch.Tensor:
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be N x D, got shape {tuple(embeddings.shape)}")
    return torch.nn.functional.normalize(embeddings, dim=1)


def _weights(similarity: torch.Tensor, alpha: float) -> torch.Tensor:
    # sim^alpha with negative similarities clamped to 0 (αQE, Radenović et al.); alpha = 0 gives
    # every neighbour weight 1, i.e. the plain average.
    if alpha == 0:
        return torch.ones_like(similarity)
    return similarity.clamp(min=0).pow(alpha)


def query_expansion(embeddings: torch.Tensor, k: int, alpha: float = 0.0,
                    database: Optional[torch.Tensor] = None, chunk: int = 4096) -> torch.Tensor:
    """Replace each row by the weighted mean of k vectors: itself and its k-1 nearest neighbours.

    Without `database` the neighbours come from `embeddings` itself (all-vs-all: each row is its
    own nearest neighbour, so the k nearest include it). With `database`, the row itself plus its
    k-1 nearest database rows. Weights are sim^alpha (alpha = 0: plain average). k <= 1 returns
    the normalised input unchanged."""
    if alpha < 0:
        raise ValueError(f"retrieval.qe_alpha must be >= 0, got {alpha}")
    queries = _normalise("embeddings", embeddings)
    if k <= 1:
        return queries
    pool = queries if database is None else _normalise("database", database)
    n_from_pool = k if database is None else k - 1
    n_from_pool = min(n_from_pool, pool.shape[0])
    expanded = torch.empty_like(queries)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start:start + chunk]
        similarity = block @ pool.T
        if database is None:
            # A row's own similarity can round below a duplicate's; it must be its first neighbour.
            rows = torch.arange(block.shape[0], device=block.device)
            similarity[rows, rows + start] = float("inf")
        top_sim, top_index = torch.topk(similarity, n_from_pool, dim=1)
        if database is None:
            top_sim[:, 0] = 1.0
        weights = _weights(top_sim, alpha)
        mixed = torch.einsum("bk,bkd->bd", weights, pool[top_index])
        if database is not None:
            mixed = mixed + block  # the query itself, weight 1^alpha = 1
        expanded[start:start + chunk] = mixed
    return torch.nn.functional.normalize(expanded, dim=1)


def database_augmentation(database: torch.Tensor, k: int, alpha: float = 0.0) -> torch.Tensor:
    """DBA: each database row becomes the weighted mean of itself and its k-1 nearest database
    rows (the same operation as all-vs-all QE, applied to the side that is searched)."""
    return query_expansion(database, k, alpha)


def expand(embeddings: torch.Tensor, qe_k: int = 0, qe_alpha: float = 0.0, dba_k: int = 0) -> torch.Tensor:
    """All-vs-all expansion of one set: DBA first (the database), then QE of each row against it."""
    result = _normalise("embeddings", embeddings)
    if dba_k > 1:
        result = database_augmentation(result, dba_k, qe_alpha)
    if qe_k > 1:
        result = query_expansion(result, qe_k, qe_alpha)
    return result
