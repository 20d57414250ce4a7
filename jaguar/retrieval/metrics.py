"""Retrieval metrics: the challenge's identity-balanced mAP (all-vs-all), and the standard
query/gallery mAP, CMC rank-k and mINP with the Market-1501 camera protocol.

Ties: candidates are ranked by score with a stable sort, so equal scores keep index order (the
lower-indexed candidate is ranked first). A tie therefore never helps or hurts by chance, but it
does depend on the order of the items; similarity_from_distance avoids adding ties."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _matrix(name: str, value: ArrayLike) -> torch.Tensor:
    matrix = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    matrix = matrix.detach().cpu().double()
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(matrix.shape)}")
    if bool(torch.isnan(matrix).any()):
        raise ValueError(f"{name} contains NaN; every pair needs a score")
    return matrix


def _labels(name: str, value: ArrayLike, length: int) -> torch.Tensor:
    labels = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    labels = labels.detach().cpu().long().reshape(-1)
    if labels.numel() != length:
        raise ValueError(f"{name} has {labels.numel()} entries, expected {length}")
    return labels


def _ranked_ap(order: torch.Tensor, match: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query: AP, first-hit rank and INP over the valid candidates in `order` (already sorted)."""
    match_sorted = match.gather(1, order)
    valid_sorted = valid.gather(1, order)
    hits = match_sorted & valid_sorted
    position = torch.cumsum(valid_sorted, dim=1).double()  # 1-based rank among valid candidates
    cum_hits = torch.cumsum(hits, dim=1).double()
    n_hits = hits.sum(dim=1)
    precision_at_hits = torch.where(hits, cum_hits / position.clamp(min=1), torch.zeros_like(position))
    ap = precision_at_hits.sum(dim=1) / n_hits.clamp(min=1)
    big = torch.full_like(position, float("inf"))
    first_hit = torch.where(hits, position, big).amin(dim=1)
    last_hit = torch.where(hits, position, -big).amax(dim=1)
    inp = n_hits.double() / last_hit.clamp(min=1)
    return {"ap": ap, "first_hit": first_hit, "inp": inp, "has_match": n_hits > 0}


def _all_vs_all(similarity: ArrayLike, labels: ArrayLike,
                candidates: Optional[torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    sim = _matrix("similarity", similarity)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be square (N x N) for all-vs-all evaluation, got {tuple(sim.shape)}")
    label = _labels("labels", labels, n)
    valid = ~torch.eye(n, dtype=torch.bool)
    if candidates is not None:
        valid &= torch.as_tensor(candidates, dtype=torch.bool)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    match = label[:, None] == label[None, :]
    return _ranked_ap(order, match, valid), label


def per_identity_ap(similarity: ArrayLike, labels: ArrayLike,
                    candidates: Optional[torch.Tensor] = None) -> dict[int, float]:
    """Mean AP of each identity's queries (all-vs-all, self excluded; `candidates[i, j]` False
    also excludes pair i, j). Identities whose queries have no true match are left out."""
    result, label = _all_vs_all(similarity, labels, candidates)
    per_identity = {}
    for identity in torch.unique(label).tolist():
        queries = (label == identity) & result["has_match"]
        if bool(queries.any()):
            per_identity[int(identity)] = float(result["ap"][queries].mean())
    return per_identity


def identity_balanced_map(similarity: ArrayLike, labels: ArrayLike,
                          candidates: Optional[torch.Tensor] = None) -> float:
    """The challenge metric: each image queries all others by similarity, descending (self
    excluded); AP = mean of precision@k over the ranks k of its true matches; APs are averaged
    within each identity, then over identities. Queries with no true match are skipped."""
    per_identity = per_identity_ap(similarity, labels, candidates)
    if not per_identity:
        raise ValueError("no query has a true match (every identity has a single image); mAP is undefined")
    return float(np.mean(list(per_identity.values())))


def all_vs_all_summary(similarity: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Identity-balanced mAP, plain (per-query) mAP and rank-1 of one set searched against itself."""
    result, label = _all_vs_all(similarity, labels, None)
    has = result["has_match"]
    if not bool(has.any()):
        raise ValueError("no query has a true match (every identity has a single image); mAP is undefined")
    balanced = [float(result["ap"][(label == i) & has].mean()) for i in torch.unique(label[has]).tolist()]
    return {"mAP_balanced": float(np.mean(balanced)), "mAP": float(result["ap"][has].mean()),
            "rank1": float((result["first_hit"][has] <= 1).double().mean())}


def evaluate_retrieval(scores: ArrayLike, q_labels: ArrayLike, g_labels: ArrayLike,
                       q_cams: Optional[ArrayLike] = None, g_cams: Optional[ArrayLike] = None,
                       kind: str = "distance") -> dict[str, float]:
    """Standard query/gallery evaluation: mAP, CMC rank-1/5/10 and mINP.

    `scores` is Q x G, a distance (kind="distance", ascending) or a similarity (kind="similarity").
    With cameras, gallery entries of the query's identity *and* camera are ignored (Market-1501).
    Queries left without a true match are skipped; `num_queries` says how many counted."""
    if kind not in ("distance", "similarity"):
        raise ValueError(f"kind must be 'distance' or 'similarity', got {kind!r}")
    matrix = _matrix("scores", scores)
    n_query, n_gallery = matrix.shape
    q_label = _labels("q_labels", q_labels, n_query)
    g_label = _labels("g_labels", g_labels, n_gallery)
    match = q_label[:, None] == g_label[None, :]
    valid = torch.ones_like(match)
    if (q_cams is None) != (g_cams is None):
        raise ValueError("give both q_cams and g_cams, or neither")
    if q_cams is not None:
        q_cam = _labels("q_cams", q_cams, n_query)
        g_cam = _labels("g_cams", g_cams, n_gallery)
        valid = ~(match & (q_cam[:, None] == g_cam[None, :]))
    order = torch.sort(matrix, dim=1, descending=(kind == "similarity"), stable=True).indices
    result = _ranked_ap(order, match, valid)
    has = result["has_match"]
    if not bool(has.any()):
        raise ValueError("no query has a true match in the gallery; mAP is undefined")
    first = result["first_hit"][has]
    return {"mAP": float(result["ap"][has].mean()),
            "rank1": float((first <= 1).double().mean()),
            "rank5": float((first <= 5).double().mean()),
            "rank10": float((first <= 10).double().mean()),
            "mINP": float(result["inp"][has].mean()),
            "num_queries": int(has.sum())}
