"""Bounded-memory k-reciprocal re-ranking for large galleries: all-vs-all for one set without an
N x N matrix (kNN lists from chunked matrix products, the k-reciprocal encoding and Jaccard sums
only over kNN-list candidates). The algorithm and its conventions are stated in
jaguar/retrieval/post/rerank.py (which exports `k_reciprocal_rerank_topm`); the encoding is the
kernel's (jaguar/retrieval/post/rerank_kernel), used through its public names only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jaguar.retrieval.post.rerank_kernel import (BYTES_PER_DENSE_CELL, ArrayLike, Workers, as_tensor, check_finite,
                                            check_params, chunk_rows, encode, like, run_on_workers, stable_smallest)

_BYTES_PER_PAIR = 40  # one inverted-index visit: int64 row and target, float32 value and minimum
_MAX_PADDING_WASTE = 6.0  # padded visits may exceed exact ones by this factor (hub columns); a padded
# visit costs several times less than an exact one, measured at N = 10,000


class _InvertedIndex:
    """Non-zeros of V by column (CSC: column c holds rows[ptr[c]:ptr[c+1]]), for the Jaccard sums.

    Two ways to visit them, same numbers: a padded (n + 1) x max-column-length table (one gather
    a query entry; fast when columns have similar lengths), or exact visits laid out with
    repeat_interleave (no padding; used when a few hub columns would make padding wasteful)."""

    def __init__(self, v_index: torch.Tensor, v_value: torch.Tensor, n: int) -> None:
        row, slot = (v_index < n).nonzero(as_tuple=True)
        col = v_index[row, slot]
        order = torch.sort(col, stable=True).indices
        self.flat_rows, self.flat_values = row[order], v_value[row, slot][order]
        counts = torch.bincount(col, minlength=n)
        self.ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.length = torch.cat([counts, counts.new_zeros(1)])  # padding column n lists nobody
        self.n = n
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        exact_visits = int(self.length[v_index].sum())
        self.padded = int((v_index < n).sum()) * width <= _MAX_PADDING_WASTE * max(exact_visits, 1)
        if self.padded:
            slots = torch.arange(width, device=v_index.device)
            present = slots[None, :] < counts[:, None]
            start = (self.ptr[:-1, None] + slots[None, :]).clamp(max=max(self.flat_rows.numel() - 1, 0))
            self.rows = torch.full((n + 1, width), n, dtype=torch.long, device=v_index.device)
            self.values = torch.zeros((n + 1, width), dtype=v_value.dtype, device=v_index.device)
            if self.flat_rows.numel():
                self.rows[:n] = torch.where(present, self.flat_rows[start], n)
                self.values[:n] = torch.where(present, self.flat_values[start], 0.0)

    def overlap(self, q_index: torch.Tensor, q_value: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """sum_c min(V[q, c], V[j, c]) for each given row q (B x W sparse) and every j, added into
        the first B rows of `scratch` (a zero (>= B) x (n + 1) table; column n takes nothing
        real). Returns the flat positions written: `reset` them to zero after reading, so a call
        costs its visits, not B x n."""
        n_rows = q_index.shape[0]
        total = scratch[:n_rows]
        query_row, slot = (q_index < self.n).nonzero(as_tuple=True)
        col = q_index[query_row, slot]
        if self.padded:
            others = self.rows.index_select(0, col)  # entries x column width
            contribution = torch.minimum(self.values.index_select(0, col), q_value[query_row, slot][:, None])
            target = query_row[:, None] * (self.n + 1) + others
            target = target.view(-1)
            total.view(-1).scatter_add_(0, target, contribution.view(-1))
            return target
        lengths = self.length.index_select(0, col)
        entry = torch.repeat_interleave(torch.arange(col.numel(), device=col.device), lengths)
        first_visit = torch.cumsum(lengths, 0) - lengths
        position = (torch.arange(entry.numel(), device=col.device)
                    + (self.ptr.index_select(0, col) - first_visit).index_select(0, entry))
        others = self.flat_rows.index_select(0, position)
        contribution = torch.minimum(q_value[query_row, slot].index_select(0, entry),
                                     self.flat_values.index_select(0, position))
        target = query_row.index_select(0, entry) * (self.n + 1) + others
        total.view(-1).scatter_add_(0, target, contribution)
        return target

    @staticmethod
    def reset(scratch: torch.Tensor, written: torch.Tensor) -> None:
        scratch.view(-1).index_fill_(0, written, 0.0)

    def row_chunks(self, v_index: torch.Tensor, n_rows: int, budget_mb: float) -> list[tuple[int, int]]:
        """Row ranges whose B x n block and visits together fit the budget."""
        if self.padded:
            visits = (v_index[:n_rows] < self.n).sum(dim=1).cpu() * self.rows.shape[1]
        else:
            visits = self.length[v_index[:n_rows]].sum(dim=1).cpu()
        cost = torch.cumsum(visits * _BYTES_PER_PAIR + self.n * BYTES_PER_DENSE_CELL, 0)
        budget = max(float(budget_mb), 1e-3) * 2**20
        chunks, start = [], 0
        while start < n_rows:
            spent = int(cost[start - 1]) if start else 0
            stop = max(int(torch.searchsorted(cost, spent + budget, right=True)), start + 1)
            chunks.append((start, min(stop, n_rows)))
            start = stop
        return chunks


@dataclass(frozen=True)
class OriginalNeighbours:
    """Each item's nearest items by original distance, itself among them, from one chunked pass over
    the set: everything the bounded re-ranking reads of the N x N distances, so that one pass serves
    any number of (k1, k2, lambda) settings (tune-post's grid)."""

    features: torch.Tensor  # (N, D) float32, L2-normalised
    rank: torch.Tensor  # (N, W) int64, nearest first, equal distances by index (a stable sort's first W)
    square: torch.Tensor  # (N, W) float32 their squared distances s = max(2 - 2 cos, 0), ascending
    row_max: torch.Tensor  # (N,) float32 each row's largest squared distance over all N items

    @property
    def width(self) -> int:
        return self.rank.shape[1]


def original_neighbours(features: ArrayLike, width: int, chunk: int = 1024) -> OriginalNeighbours:
    """The pass behind `k_reciprocal_rerank_topm`: features (N x D, numpy or torch, finite) are
    L2-normalised, and chunk x N squared-distance rows are held at a time. width is capped at N.
    Raises ValueError on non-finite features or when every distance is 0."""
    matrix = as_tensor("features", features)
    check_finite("features", matrix.amax(dim=0), matrix.amin(dim=0))
    feats = torch.nn.functional.normalize(matrix.float(), dim=1)
    n = feats.shape[0]
    width = min(int(width), n)
    rank = torch.empty((n, width), dtype=torch.long, device=feats.device)
    square_out = torch.empty((n, width), dtype=torch.float32, device=feats.device)
    row_max = torch.empty(n, dtype=torch.float32, device=feats.device)
    for start in range(0, n, max(1, int(chunk))):
        stop = min(start + max(1, int(chunk)), n)
        square = torch.addmm(torch.tensor(2.0, device=feats.device), feats[start:stop], feats.T,
                             alpha=-2.0).clamp_(min=0)
        row_max[start:stop] = square.amax(dim=1)
        square_out[start:stop], rank[start:stop] = stable_smallest(square, width)
    if bool((row_max == 0).any()):
        raise ValueError("all features are identical (every distance is 0); re-ranking needs distinct items")
    return OriginalNeighbours(feats, rank, square_out, row_max)


class _Encoded:
    """The k-reciprocal encoding V of one (k1, k2) over a set's `nearest` lists and its inverted
    index: what both the top-M terms and the exact top-M lists read."""

    def __init__(self, nearest: OriginalNeighbours, k1: int, k2: int, memory_budget_mb: float,
                 workers: Workers | None) -> None:
        check_params(k1, k2, 0.0)
        feats, row_max = nearest.features, nearest.row_max
        n = feats.shape[0]
        if nearest.width < min(max(k1 + 1, k2), n):
            raise ValueError(f"neighbour lists of width {nearest.width} are too short for k1 = {k1}, k2 = {k2}; "
                             f"search them with width >= {max(k1 + 1, k2)}")

        def pair_dist(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            out = torch.empty(cols.shape, dtype=torch.float32, device=feats.device)
            # The gathered B x W x D neighbour features are the big temporary: bound them.
            block = chunk_rows(rows.numel(), cols.shape[1] * feats.shape[1], memory_budget_mb, 8)
            for start in range(0, rows.numel(), block):
                part_rows, part_cols = rows[start:start + block], cols[start:start + block]
                dots = torch.einsum("bd,bwd->bw", feats[part_rows], feats[part_cols])
                out[start:start + block] = (2 - 2 * dots).clamp_(min=0) / row_max[part_rows, None]
            return out

        self.nearest, self.n = nearest, n
        self.v_index, self.v_value = run_on_workers(workers, feats.device, encode, nearest.rank, pair_dist, int(k1),
                                                    int(k2), memory_budget_mb)
        self.inverted = _InvertedIndex(self.v_index, self.v_value, n)

    def overlaps(self, rows_per_chunk_mb: float):
        """(start, stop, B x n overlap sums) for row chunks in order; each block is valid until the
        next one is made. The scratch table is made once and reset by visit, so small chunks cost
        nothing extra."""
        chunks = self.inverted.row_chunks(self.v_index, self.n, rows_per_chunk_mb)
        scratch = torch.zeros((max(stop - start for start, stop in chunks), self.n + 1), dtype=self.v_value.dtype,
                              device=self.v_value.device)
        for start, stop in chunks:
            written = self.inverted.overlap(self.v_index[start:stop], self.v_value[start:stop], scratch)
            yield start, stop, scratch[:stop - start, :self.n]
            self.inverted.reset(scratch, written)


def k_reciprocal_terms_topm(nearest: OriginalNeighbours, k1: int, k2: int, top_m: int,
                            memory_budget_mb: float = 1024.0,
                            workers: Workers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Jaccard distance of each item to its M nearest: (candidates N x M int64, the first M of
    `nearest.rank`; Jaccard N x M float32), from lists searched once (`original_neighbours`, width
    >= max(k1 + 1, k2, M) or N). The normalised original distance of the same pairs is
    nearest.square[:, :M] / nearest.row_max[:, None]. Re-ranking within these candidates is what
    tune-post's grid scores; the exact re-ranked top M (items from beyond the M nearest can enter
    it) is `k_reciprocal_lists_topm`."""
    n = nearest.rank.shape[0]
    top_m = min(int(top_m), n)
    if nearest.width < top_m:
        raise ValueError(f"neighbour lists of width {nearest.width} are too short for M = {top_m}")
    encoded = _Encoded(nearest, k1, k2, memory_budget_mb, workers)
    candidates = nearest.rank[:, :top_m]
    jaccard = torch.empty((n, top_m), dtype=torch.float32, device=candidates.device)
    for start, stop, overlap in encoded.overlaps(min(memory_budget_mb, 64.0)):
        found = overlap.gather(1, candidates[start:stop])
        jaccard[start:stop] = 1 - found / (2.0 - found)
    return candidates, jaccard


def k_reciprocal_lists_topm(nearest: OriginalNeighbours, k1: int, k2: int, lambda_value: float, top_m: int,
                            blend: float = 1.0, exclude_self: bool = False, memory_budget_mb: float = 1024.0,
                            workers: Workers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's exact top M by final = (1 - blend) * (1 - cos) + blend * re-ranked distance,
    ascending, ties by index: (index N x M int64, final N x M float32); the item itself is left
    out when exclude_self. Row chunks of the final distances are made whole (the Jaccard sums of
    every column are in the overlap block already, the squared distances come from one matrix
    product), so any item can enter a top M: the dense path's lists and values, in O(chunk x N)
    memory and N^2 time."""
    check_params(k1, k2, lambda_value)
    feats, row_max = nearest.features, nearest.row_max
    n = feats.shape[0]
    top_m = min(int(top_m), n - int(exclude_self))
    encoded = _Encoded(nearest, k1, k2, memory_budget_mb, workers)
    index = torch.empty((n, top_m), dtype=torch.long, device=feats.device)
    final = torch.empty((n, top_m), dtype=torch.float32, device=feats.device)
    # Several B x n float32 blocks live at once: keep them within ~1/4 of the budget.
    for start, stop, overlap in encoded.overlaps(min(memory_budget_mb / 4, 64.0)):
        square = torch.addmm(torch.tensor(2.0, device=feats.device), feats[start:stop], feats.T,
                             alpha=-2.0).clamp_(min=0)
        block = (overlap / (overlap - 2.0)).add_(1.0).mul_(1 - lambda_value)  # Jaccard, weighted
        block.add_(square / row_max[start:stop, None], alpha=lambda_value)
        if blend != 1:
            block.mul_(blend).add_(square, alpha=(1 - blend) / 2)  # 1 - cos = s / 2
        if exclude_self:
            block[torch.arange(stop - start, device=feats.device), torch.arange(start, stop, device=feats.device)] = \
                float("inf")
        final[start:stop], index[start:stop] = stable_smallest(block, top_m)
    return index, final


def k_reciprocal_rerank_topm(features: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                             top_m: int = 100, chunk: int = 1024, memory_budget_mb: float = 1024.0,
                             workers: Workers | None = None) -> tuple[ArrayLike, ArrayLike]:
    """All-vs-all re-ranking of one set without an N x N matrix: (indices N x M, distances N x M),
    each row the item's M best items by re-ranked distance (itself included), ascending, ties by
    index: the dense path's top M, with its values.

    Definition: features are L2-normalised; the squared original distance is s = max(2 - 2 cos, 0)
    and it is divided by its row maximum over all N items, found exactly during the chunked kNN
    pass (`original_neighbours`). That is precisely the dense normalisation of
    `euclidean_distance(features)` (symmetric, so column max = row max), and the kNN lists are
    exact, so the k-reciprocal sets, V, the expansion and the Jaccard terms equal the dense ones (up
    to float rounding of the distances); the final rows are then made a chunk at a time
    (`k_reciprocal_lists_topm`).

    features: N x D, numpy or torch, finite. Returns int64 and float32, numpy in -> numpy out.
    Memory: O(N * (M + k1 * k2)) tables, `chunk` x N distance rows and about `memory_budget_mb`;
    never N x N. The kNN pass and the Jaccard sums run on torch's own threads (large matrix
    products and scatters), the encoding on `workers` (made for the call when not given)."""
    check_params(k1, k2, lambda_value)
    nearest = original_neighbours(features, max(k1 + 1, k2), chunk)
    index, final = k_reciprocal_lists_topm(nearest, k1, k2, lambda_value, top_m, memory_budget_mb=memory_budget_mb,
                                           workers=workers)
    return like(index, features), like(final, features)
