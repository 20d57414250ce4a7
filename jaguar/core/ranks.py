"""Ranks of the true matches in rows of scores, counted instead of sorted: the kernel both
evaluators (`jaguar.core.evaluator`, `jaguar.core.evaluator_ranked`) share.

Ties are counted pessimistically: among candidates of equal score, every non-match is ranked
before every true match. The k-th true match of a query (by score, best first) then has rank
(non-matches scoring at least as high) + k, a figure that depends on the scores alone, never on
the order of the rows, columns or files (see `jaguar.core.evaluator` for why this rule).

Two routes to the same counts: `ranked_matches` places each column among the row's sorted
true-match scores by binary search and histograms the places, O(G log T) a row (T = the row's
true matches); `match_ranks` sorts the row's non-match scores (numpy's vectorised sort) and
places the T match scores among them (numpy arrays in, B x G), O(G log G) but several times faster on CPU rows of up to
tens of thousands. Own code because no library call counts a row against many per-row
thresholds in one pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the tensor kernels only: `match_ranks` runs without it
    import torch


def count_at_or_above(scores: torch.Tensor, counted: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For each row b of B x G `scores` and each of its T `thresholds` (B x T, ascending in each
    row; +inf pads): how many columns with `counted[b, c]` (B x G bool) have scores[b, c] >=
    thresholds[b, t]. Returns B x T int64."""
    import torch

    n_thresholds = thresholds.shape[1]
    bucket = torch.searchsorted(thresholds.to(scores.dtype).contiguous(), scores.contiguous(), right=True)
    histogram = torch.zeros((scores.shape[0], n_thresholds + 1), dtype=torch.long)
    histogram.scatter_add_(1, bucket, counted.long())
    # Column c is counted for threshold j iff thresholds[j] <= score, i.e. bucket(c) >= j + 1.
    return histogram.flip(1).cumsum(1).flip(1)[:, 1:]


def ranked_matches(scores: torch.Tensor, match: torch.Tensor,
                   non_match: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-based ranks of the true matches of each row of B x G `scores` (higher ranks first) among
    the row's candidates: `match` (B x G bool) marks the true matches, `non_match` the other
    candidates; columns in neither are not candidates. Ties pessimistic (see the module); true
    matches of equal score take consecutive ranks in column order. Returns (row, column, rank,
    non-matches scoring at least as high) of every true match (row-major order), int64 vectors."""
    import torch

    rows, columns = match.nonzero(as_tuple=True)
    count = torch.bincount(rows, minlength=match.shape[0])
    slot = torch.arange(rows.numel()) - (torch.cumsum(count, 0) - count)[rows]
    width = max(int(count.max()) if count.numel() else 0, 1)
    table = torch.full((scores.shape[0], width), float("inf"), dtype=scores.dtype)
    table[rows, slot] = scores[rows, columns]
    ascending, order = table.sort(dim=1, stable=True)
    above = count_at_or_above(scores, non_match, ascending)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(width).expand_as(order).contiguous())
    sorted_slot = place[rows, slot]
    # The j-th lowest of a row's n matches is its (n - j)-th best.
    non_match_above = above[rows, sorted_slot]
    return rows, columns, non_match_above + count[rows] - sorted_slot, non_match_above


def match_ranks(scores: np.ndarray, match: np.ndarray, non_match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ranked_matches`' ranks by another route, faster on full rows: each row's non-match scores
    sorted (numpy's vectorised sort, several times torch's on CPU), the row's true-match scores
    placed among them by binary search. Returns (row, rank) of every true match, int64 vectors
    ordered by row, then best first."""
    values, match_np, non_match_np = scores, match, non_match
    non_match_sorted = np.where(non_match_np, values, -np.inf).astype(values.dtype, copy=False)
    non_match_sorted.sort(axis=1)  # ascending; the other columns (-inf) first
    rows, columns = np.nonzero(match_np)
    hit_scores = values[rows, columns]
    order = np.lexsort((-hit_scores, rows))  # by row, then best first
    rows, hit_scores = rows[order], hit_scores[order]
    count = np.bincount(rows, minlength=values.shape[0])
    place = np.arange(rows.size) - (np.cumsum(count) - count)[rows]  # 0 = the row's best match
    table = np.full((values.shape[0], max(int(count.max()) if count.size else 0, 1)), np.inf, dtype=values.dtype)
    table[rows, place] = hit_scores
    below = np.empty(table.shape, dtype=np.int64)
    for row in range(values.shape[0]):  # numpy's searchsorted takes one sorted row at a time
        below[row] = np.searchsorted(non_match_sorted[row], table[row])
    at_or_above = values.shape[1] - below[rows, place]
    # A true match scoring -inf ranks after every non-match, -inf ones included.
    at_or_above = np.where(hit_scores == -np.inf, non_match_np.sum(axis=1)[rows], at_or_above)
    return rows.astype(np.int64), (at_or_above + place + 1).astype(np.int64)
