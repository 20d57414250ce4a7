"""The initial ranking: the k nearest of every item, ties broken by index (a stable sort's
first k), without sorting whole rows.

Dense mode (`dense_rank`): row i of the normalised matrix orig[i, j] = D[j, i]^2 / s[i] is column
i of D over a constant, so its k smallest are found from the minima of D's columns over blocks of
8 rows (a reduction along D's contiguous axis, one pass): the k blocks with the smallest minima,
then the k smallest of their entries, both by introselect (`threads.k_smallest_set`). Rows where a
tie makes either choice ambiguous are sorted in full. `stable_smallest` is the same contract for
rows held in memory (the bounded mode's chunks)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from jaguar.retrieval.post.rerank_kernel.threads import Workers, k_smallest_set, split
from jaguar.retrieval.post.rerank_kernel.inputs import check_finite, chunk_rows

PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows B, cols B x W) -> B x W

_BLOCK = 8  # columns per block (rows of D) whose minimum prefilters the k smallest of a row
_MAX_ROWS_PER_STEP = 512  # rows per chunk of the O(N * k) passes: scratch rows stay in cache
_TIE_MARGIN = 8  # entries past the k-th that stable_smallest takes, so a small tie group is seen whole


def _order_by_value_then_column(values: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value, column) in one sort: the bits of a non-negative float32 order
    like its value, so (bits << 32) + column is an int64 key with the same order."""
    key = (values.contiguous().view(torch.int32).long() << 32) + cols
    order = key.sort(dim=1).indices
    return values.gather(1, order), cols.gather(1, order)


def _smallest(block_min: torch.Tensor, fetch: PairDistance, rows: torch.Tensor, n: int, width: int,
              k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, index, unresolved) of the k smallest entries of each row, ordered by (value, column).

    block_min[b, s] is the minimum of row b over columns [s * width, (s + 1) * width), a
    non-negative float32. The k blocks with the smallest minima hold every entry below the k-th
    block minimum t, and the k-th smallest entry v_k is <= t; an entry equal to t can lie in a
    block left out only when another block's minimum ties with t. The k smallest of the fetched
    entries are then ordered by (value, column). Rows where either choice is not unique (a tie
    at its boundary) come back in `unresolved` for the caller to sort in full."""
    blocks, unresolved = k_smallest_set(block_min, k)
    cols = (blocks[:, :, None] * width + torch.arange(width, device=block_min.device)).flatten(1)
    valid = cols < n
    values = fetch(rows, cols.clamp(max=n - 1)).masked_fill_(~valid, float("inf"))
    pick, tied = k_smallest_set(values, k)
    unresolved |= tied
    return *_order_by_value_then_column(values.gather(1, pick), cols.gather(1, pick)), unresolved


def _block_width(n: int, k: int) -> int:
    return _BLOCK if n >= 16 * k else 1


def stable_smallest(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, ordered by (value, column): a stable argsort's first k.

    topk is O(N) a row but unordered among ties (on contiguous rows it beats a block prefilter,
    whose inner-axis minimum costs as much). It is asked for _TIE_MARGIN more entries than k: an
    entry left out ties with the k-th only when the last one taken does too, so only those rows
    (a tie group wider than the margin at the k-th place) fall back to a full stable sort, and the
    result always equals `argsort(kind="stable")[:, :k]`. The margin matters for duplicate items
    (DBA makes mutual nearest neighbours identical), whose pairs would otherwise send many rows
    to the full sort."""
    k = min(k, rows.shape[1])
    extra = min(k + _TIE_MARGIN, rows.shape[1])
    values, index = torch.topk(rows, extra, dim=1, largest=False, sorted=True)
    tied_boundary = (values[:, -1] == values[:, k - 1] if extra > k
                     else torch.zeros(len(rows), dtype=torch.bool, device=rows.device))
    index, perm = index.sort(dim=1)
    values = values.gather(1, perm)
    values, order = torch.sort(values, dim=1, stable=True)
    values, index = values[:, :k], index.gather(1, order)[:, :k]
    if bool(tied_boundary.any()):
        full_values, full_index = torch.sort(rows[tied_boundary], dim=1, stable=True)
        values[tied_boundary] = full_values[:, :k]
        index[tied_boundary] = full_index[:, :k]
    return values, index


def normalised_gather(joined: torch.Tensor, scale: torch.Tensor) -> PairDistance:
    """(rows, cols) -> orig[rows[:, None], cols] = D[cols, rows]^2 / scale[rows], from D itself."""
    flat = joined.view(-1)

    def gather(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        cells = cols * joined.shape[1] + rows[:, None]
        return flat.index_select(0, cells.view(-1)).view(cells.shape).pow(2).float().div_(scale[rows, None])
    return gather


def dense_rank(joined: torch.Tensor, k: int, budget_mb: float, name: str,
               workers: Workers) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each item (rank, N x k) and the scale s with orig[i, j] = D[j, i]^2 / s[i].

    Row i of the normalised matrix is column i of D over a constant, so its ranking comes from
    D's column-wise minima over blocks of rows: a reduction along D's contiguous axis, one pass.
    joined: N x N, contiguous, any float dtype; raises ValueError naming `name` for a non-finite
    entry or an all-zero column."""
    n = joined.shape[0]
    k = min(k, n)
    width = _block_width(n, k)
    full = n // width

    def reduce_columns(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        columns = joined[:, first:last]
        minima = columns[:full * width].view(full, width, last - first).amin(dim=1)
        if full * width < n:
            minima = torch.cat([minima, columns[full * width:].amin(dim=0, keepdim=True)])
        return columns.amax(dim=0), minima

    if width == 1:
        column_max, minima = joined.amax(dim=0), joined
    else:  # column slices on the kernel's threads: one pass over D, which is read along its rows
        pieces = workers.map([partial(reduce_columns, first, last)
                              for first, last in split(n, workers.parts(joined.device))])
        column_max = torch.cat([piece[0] for piece in pieces])
        minima = torch.cat([piece[1] for piece in pieces], dim=1)
    column_min = minima.amin(dim=0)
    check_finite(name, column_max, column_min)
    # float32(max d^2) = max float32(d^2): the reference's column maximum of the squared matrix.
    scale = torch.maximum(column_max.pow(2), column_min.pow(2)).float()
    if bool((scale == 0).any()):
        bad = int((scale == 0).nonzero()[0])
        raise ValueError(f"column {bad} of the joined distance matrix is all zeros; re-ranking needs "
                         f"at least two distinct items")

    fetch = normalised_gather(joined, scale)
    rank = torch.empty((n, k), dtype=torch.long, device=joined.device)
    parts = split(n, workers.parts(joined.device))
    step = max(1, min(_MAX_ROWS_PER_STEP, chunk_rows(n, minima.shape[0] + 40 * k * width, budget_mb / len(parts))))

    def rank_rows(first: int, last: int) -> None:
        for start in range(first, last, step):
            stop = min(start + step, last)
            rows = torch.arange(start, stop, device=joined.device)
            block_min = minima[:, start:stop].T.pow(2).float().div_(scale[start:stop, None])
            _, index, unresolved = _smallest(block_min, fetch, rows, n, width, k)
            if bool(unresolved.any()):
                tied = rows[unresolved]
                index[unresolved] = torch.sort(joined[:, tied].T.pow(2).float() / scale[tied, None], dim=1,
                                               stable=True).indices[:, :k]
            rank[start:stop] = index

    workers.map([partial(rank_rows, first, last) for first, last in parts])
    return rank, scale


