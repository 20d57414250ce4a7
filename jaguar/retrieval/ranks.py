"""Ranks of the true matches in rows of scores, counted instead of sorted: the kernel both
evaluators (`jaguar.retrieval.metrics`, `jaguar.retrieval.metrics_ranked`) share.

Ties are counted pessimistically: among candidates of equal score, every non-match is ranked
before every true match. The k-th true match of a query (by score, best first) then has rank
(non-matches scoring at least as high) + k, a figure that depends on the scores alone, never on
the order of the rows, columns or files (see `jaguar.retrieval.metrics` for why this rule).

One row costs O(G log T) (T = the row's true matches): each column is placed among the row's
sorted match scores by binary search, the placements are histogrammed and suffix-summed; no row
is sorted whole. Own code because no library call counts a row against many per-row thresholds
in one pass."""

from __future__ import annotations

import torch


def count_at_or_above(scores: torch.Tensor, counted: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For each row b of B x G `scores` and each of its T `thresholds` (B x T, ascending in each
    row; +inf pads): how many columns with `counted[b, c]` (B x G bool) have scores[b, c] >=
    thresholds[b, t]. Returns B x T int64."""
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
    rows, columns = match.nonzero(as_tuple=True)
    count = match.sum(dim=1)
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


def match_ranks(scores: torch.Tensor, match: torch.Tensor, non_match: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ranked_matches` without the columns: (row, rank) of every true match."""
    rows, _, ranks, _ = ranked_matches(scores, match, non_match)
    return rows, ranks
