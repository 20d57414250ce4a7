"""k-reciprocal encoding re-ranking (Zhong et al., CVPR 2017) as a batched torch kernel.

Three entry points share one core:

* `k_reciprocal_rerank(q_g, q_q, g_g, ...)` -- the query x gallery contract of the widely used
  python version: the three matrices are joined into one (Q+G)^2 matrix D, which is squared, each
  column divided by its maximum and transposed: orig[i, j] = D[j, i]^2 / max_k D[k, i]^2.
* `k_reciprocal_rerank_single(dist, ...)` -- one set, all-vs-all: the joined matrix *is* `dist`
  (N x N); every row is a query, every column a gallery item (the item itself included; drop the
  diagonal downstream). This is not the general call with Q = G = the set, which would hold every
  image twice at distance 0 from itself.
* `k_reciprocal_rerank_topm(features, ...)` -- bounded memory, never holds N x N: kNN lists from
  chunked matrix products, re-ranked distances for each item's top-M original neighbours.

The core never loops over individual rows: k-reciprocal sets are gathers over the forward lists
(B x (k1+1) x (k1+1)), the expansion test a broadcast compare, the sparse V rows are (index, value)
pairs, local query expansion and the Jaccard sums are scatter-adds over an inverted index. Work is
chunked over rows so its memory stays within `memory_budget_mb` (beyond the N x N input, its
float32 normalised copy and the output; the bounded mode holds no N x N at all). Ties in the initial ranking are broken by index (a stable sort), as in tests/rerank_reference.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_BYTES_PER_DENSE_CELL = 16  # B x N working rows: float32 scatter target, Jaccard, blend, mask
_BYTES_PER_PAIR = 40  # one inverted-index visit: int64 row and target, float32 value and minimum
_MAX_PADDING_WASTE = 6.0  # padded visits may exceed exact ones by this factor (hub columns); a padded
# visit costs several times less than an exact one, measured at N = 10,000


@contextmanager
def single_thread_below(n_items: int, limit: int = 16384) -> Iterator[None]:
    """Run torch on one intra-op thread while n_items < limit, restoring the setting after.

    The dense kernel is hundreds of ops on tensors of ~N x 100 elements; on a busy 2-core machine,
    waking the second thread for each op cost more than the op (N=371: 0.69 s with 2 threads,
    0.04 s with 1; N=5,000: 3.4 s vs 1.8 s; a 371-image tune-post: 29 s vs 1.9 s). Not for
    concurrent torch threads."""
    previous = torch.get_num_threads()
    if n_items >= limit or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _as_tensor(name: str, value: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if device is not None:
        tensor = tensor.to(device)
    if not torch.is_floating_point(tensor):
        tensor = tensor.double()
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite distances; fix the features before re-ranking")
    return tensor


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"re-ranking lambda_value must be in [0, 1], got {lambda_value}")


def _chunk_rows(n_rows: int, n_cols: int, budget_mb: float, bytes_per_cell: int = _BYTES_PER_DENSE_CELL) -> int:
    budget = max(float(budget_mb), 1e-3) * 2**20
    return int(max(1, min(n_rows, budget // max(1, n_cols * bytes_per_cell))))


def stable_smallest(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, ordered by (value, column): a stable argsort's first k.

    topk is O(N) a row but unordered among ties. It is asked for k + 1 entries: a left-out entry
    ties with the k-th exactly when the (k+1)-th smallest equals the k-th, and only those rows
    fall back to a full stable sort, so the result always equals `argsort(kind="stable")[:, :k]`."""
    k = min(k, rows.shape[1])
    extra = min(k + 1, rows.shape[1])
    values, index = torch.topk(rows, extra, dim=1, largest=False, sorted=True)
    tied_boundary = values[:, k] == values[:, k - 1] if extra > k else torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    values, index = values[:, :k], index[:, :k]
    index, perm = index.sort(dim=1)
    values = values.gather(1, perm)
    values, order = torch.sort(values, dim=1, stable=True)
    index = index.gather(1, order)
    if bool(tied_boundary.any()):
        full_values, full_index = torch.sort(rows[tied_boundary], dim=1, stable=True)
        values[tied_boundary] = full_values[:, :k]
        index[tied_boundary] = full_index[:, :k]
    return values, index


# ---------------------------------------------------------------- the shared core


def _reciprocal_mask(forward: torch.Tensor, rows: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """mask[b, m]: row `rows[b]` is among the first lists.shape[1] neighbours of forward[b, m]."""
    backward = lists[forward]  # B x K x K
    return (backward == rows[:, None, None]).any(dim=-1)


def _compact_sorted_unique(members: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's distinct members (< n) in ascending order, padded with n on the right."""
    members = members.sort(dim=1).values
    duplicate = torch.zeros_like(members, dtype=torch.bool)
    duplicate[:, 1:] = members[:, 1:] == members[:, :-1]
    members = torch.where(duplicate, torch.full_like(members, n), members).sort(dim=1).values
    width = int((members < n).sum(dim=1).max()) if members.numel() else 0
    return members[:, :max(width, 1)]


def _sum_duplicates(index: torch.Tensor, value: torch.Tensor, n: int,
                    divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, merge equal indices by summing their values (then divide): a segment sum over
    each row's sorted indices, so the cost follows the number of entries, not n."""
    index, order = index.sort(dim=1)
    value = value.gather(1, order)
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[:, 1:] = index[:, 1:] != index[:, :-1]
    segment = torch.cumsum(starts, dim=1) - 1
    merged_value = torch.zeros_like(value).scatter_add_(1, segment, value) / divisor
    merged_index = torch.full_like(index, n).scatter_(1, segment, index)
    width = max(int((merged_index < n).sum(dim=1).max()), 1)
    return merged_index[:, :width], merged_value[:, :width]


def _pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(part[0].shape[1] for part in parts)
    index = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1]), value=n) for i, _ in parts])
    value = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=0.0) for _, v in parts])
    return index, value


def _encode(rank: torch.Tensor, pair_dist: PairDistance, k1: int, k2: int,
            budget_mb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse V (after local query expansion) as padded (index, value) rows, index n = padding."""
    n, device = rank.shape[0], rank.device
    forward_lists = rank[:, :min(k1 + 1, n)]
    half_lists = rank[:, :min(int(np.around(k1 / 2.0)) + 1, n)]
    k_fwd, k_half = forward_lists.shape[1], half_lists.shape[1]
    # Bytes a row needs: the candidate-overlap test (K1 x Kh x K1 booleans, twice) and the member
    # list (K1 + K1 x Kh int64, about three live copies while it is sorted).
    bytes_per_row = k_fwd * k_half * k_fwd * 2 + (k_fwd + k_fwd * k_half) * 24
    step = max(1, int(budget_mb * 2**20 // bytes_per_row))

    half_reciprocal = torch.cat([
        _reciprocal_mask(half_lists[s:s + step], torch.arange(s, min(s + step, n), device=device), half_lists)
        for s in range(0, n, step)])

    parts = []
    for start in range(0, n, step):
        rows = torch.arange(start, min(start + step, n), device=device)
        forward = forward_lists[rows]
        # R(i): forward neighbours that also have i among their k1 + 1 nearest.
        reciprocal = _reciprocal_mask(forward, rows, forward_lists)
        # Each candidate c in R(i) brings its round(k1/2)-reciprocal set when more than 2/3 of
        # that set already lies in R(i); V's support is the union, without duplicates.
        cand_sets = half_lists[forward]  # B x K1 x Kh: each candidate's half-size forward list
        cand_valid = half_reciprocal[forward]
        in_own_set = ((cand_sets[..., None] == forward[:, None, None, :])
                      & reciprocal[:, None, None, :]).any(dim=-1)
        overlap = (in_own_set & cand_valid).sum(dim=-1)
        cand_size = cand_valid.sum(dim=-1)
        accept = reciprocal & (overlap.double() > 2.0 / 3 * cand_size.double())
        members = torch.cat([
            torch.where(reciprocal, forward, n),
            torch.where(accept[..., None] & cand_valid, cand_sets, n).flatten(1)], dim=1)
        members = _compact_sorted_unique(members, n)
        valid = members < n
        weight = torch.exp(-pair_dist(rows, members.clamp(max=n - 1))) * valid
        parts.append((members, weight / weight.sum(dim=1, keepdim=True)))
    v_index, v_value = _pad_cat(parts, n)
    if k2 == 1:
        return v_index, v_value
    return _local_query_expansion(rank, v_index, v_value, k2, step)


def _local_query_expansion(rank: torch.Tensor, v_index: torch.Tensor, v_value: torch.Tensor, k2: int,
                           step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each V row becomes the mean of the V rows of its k2 nearest neighbours (itself included)."""
    n, device = rank.shape[0], rank.device
    k_qe = min(k2, n)
    v_index_pad = torch.cat([v_index, torch.full((1, v_index.shape[1]), n, device=device)])
    v_value_pad = torch.cat([v_value, torch.zeros((1, v_value.shape[1]), dtype=v_value.dtype, device=device)])
    qe_parts = []
    block = max(1, step // max(1, k_qe))
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=device)
        neighbours = rank[rows, :k_qe]
        qe_parts.append(_sum_duplicates(v_index_pad[neighbours].flatten(1), v_value_pad[neighbours].flatten(1),
                                        n, k_qe))
    return _pad_cat(qe_parts, n)


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

    def overlap(self, q_index: torch.Tensor, q_value: torch.Tensor) -> torch.Tensor:
        """sum_c min(V[q, c], V[j, c]) for each given row q (B x W sparse) and every j: B x n."""
        n_rows = q_index.shape[0]
        total = torch.zeros((n_rows, self.n + 1), dtype=q_value.dtype, device=q_value.device)
        query_row, slot = (q_index < self.n).nonzero(as_tuple=True)
        col = q_index[query_row, slot]
        if self.padded:
            others = self.rows.index_select(0, col)  # entries x column width
            contribution = torch.minimum(self.values.index_select(0, col), q_value[query_row, slot][:, None])
            target = query_row[:, None] * (self.n + 1) + others
            total.view(-1).scatter_add_(0, target.view(-1), contribution.view(-1))
            return total[:, :self.n]
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
        return total[:, :self.n]

    def row_chunks(self, v_index: torch.Tensor, n_rows: int, budget_mb: float) -> list[tuple[int, int]]:
        """Row ranges whose B x n block and visits together fit the budget."""
        if self.padded:
            visits = (v_index[:n_rows] < self.n).sum(dim=1).cpu() * self.rows.shape[1]
        else:
            visits = self.length[v_index[:n_rows]].sum(dim=1).cpu()
        cost = torch.cumsum(visits * _BYTES_PER_PAIR + self.n * _BYTES_PER_DENSE_CELL, 0)
        budget = max(float(budget_mb), 1e-3) * 2**20
        chunks, start = [], 0
        while start < n_rows:
            spent = int(cost[start - 1]) if start else 0
            stop = max(int(torch.searchsorted(cost, spent + budget, right=True)), start + 1)
            chunks.append((start, min(stop, n_rows)))
            start = stop
        return chunks


def _jaccard(overlap: torch.Tensor) -> torch.Tensor:
    return 1 - overlap / (2.0 - overlap)


# ---------------------------------------------------------------- dense entry points


def _normalised_square(joined: torch.Tensor, budget_mb: float) -> torch.Tensor:
    """orig[i, j] = D[j, i]^2 / max_k D[k, i]^2 in float32, built a block of rows at a time."""
    column_max = joined.abs().amax(dim=0).pow(2).float()
    if bool((column_max == 0).any()):
        bad = int((column_max == 0).nonzero()[0])
        raise ValueError(f"column {bad} of the joined distance matrix is all zeros; re-ranking needs "
                         f"at least two distinct items")
    n = joined.shape[0]
    out = torch.empty((n, n), dtype=torch.float32, device=joined.device)
    block = _chunk_rows(n, n, budget_mb, 8)
    for start in range(0, n, block):
        stop = min(start + block, n)
        out[start:stop] = joined[:, start:stop].T.pow(2).float() / column_max[start:stop, None]
    return out


def _rerank_dense(joined: torch.Tensor, n_query: int, k1: int, k2: int, lambda_value: float,
                  budget_mb: float) -> torch.Tensor:
    with single_thread_below(joined.shape[0]):
        return _dense_terms(joined, n_query, k1, k2, budget_mb, lambda_value)[0]


def _dense_terms(joined: torch.Tensor, n_query: int, k1: int, k2: int, budget_mb: float,
                 lambda_value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Jaccard distance, normalised original distance) for the query rows; with lambda_value the
    blend is done in place chunk by chunk and returned as the first item, saving a Q x G copy."""
    n = joined.shape[0]
    orig = _normalised_square(joined, budget_mb)
    width = max(k1 + 1, k2)
    block = _chunk_rows(n, n, budget_mb)
    rank = torch.cat([stable_smallest(orig[s:s + block], width)[1] for s in range(0, n, block)])

    def pair_dist(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return orig[rows[:, None], cols]

    v_index, v_value = _encode(rank, pair_dist, k1, k2, budget_mb)
    inverted = _InvertedIndex(v_index, v_value, n)
    # Single-set mode keeps every column; the query x gallery mode keeps the gallery columns.
    first_col = 0 if n_query == n else n_query
    out = torch.empty((n_query, n - first_col), dtype=torch.float32, device=joined.device)
    for start, stop in inverted.row_chunks(v_index, n_query, budget_mb):
        jaccard = _jaccard(inverted.overlap(v_index[start:stop], v_value[start:stop]))[:, first_col:]
        if lambda_value is None:
            out[start:stop] = jaccard
        else:
            out[start:stop] = jaccard * (1 - lambda_value) + orig[start:stop, first_col:] * lambda_value
    return out, orig[:n_query, first_col:]


def _back(result: torch.Tensor, like: ArrayLike) -> ArrayLike:
    return result.cpu().numpy() if isinstance(like, np.ndarray) else result


def k_reciprocal_rerank(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20,
                        k2: int = 6, lambda_value: float = 0.3, memory_budget_mb: float = 1024.0) -> ArrayLike:
    """Re-ranked query x gallery distances (Q x G, float32), numpy in -> numpy out, torch in -> torch
    out on the input's device. Peak memory: the (Q+G)^2 joined matrix plus one float32 copy, the
    output, and about `memory_budget_mb` of working memory."""
    _check_params(k1, k2, lambda_value)
    q_g = _as_tensor("q_g_dist", q_g_dist)
    q_q = _as_tensor("q_q_dist", q_q_dist, q_g.device)
    g_g = _as_tensor("g_g_dist", g_g_dist, q_g.device)
    n_query, n_gallery = q_g.shape
    if q_q.shape != (n_query, n_query) or g_g.shape != (n_gallery, n_gallery):
        raise ValueError(f"shapes do not fit: q_g_dist {tuple(q_g.shape)} needs q_q_dist ({n_query}, {n_query}) "
                         f"and g_g_dist ({n_gallery}, {n_gallery}), got {tuple(q_q.shape)} and {tuple(g_g.shape)}")
    dtype = torch.promote_types(torch.promote_types(q_g.dtype, q_q.dtype), g_g.dtype)
    joined = torch.cat([torch.cat([q_q.to(dtype), q_g.to(dtype)], dim=1),
                        torch.cat([q_g.T.to(dtype), g_g.to(dtype)], dim=1)], dim=0)
    result = _rerank_dense(joined, n_query, int(k1), int(k2), float(lambda_value), memory_budget_mb)
    return _back(result, q_g_dist)


def k_reciprocal_rerank_single(dist: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                               memory_budget_mb: float = 1024.0) -> ArrayLike:
    """All-vs-all re-ranked distances for one set (N x N, float32): the joined matrix is `dist`
    itself, every row a query, every column a gallery item including the row's own item."""
    _check_params(k1, k2, lambda_value)
    matrix = _as_tensor("dist", dist)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"dist must be square (N x N) for single-set re-ranking, got {tuple(matrix.shape)}")
    result = _rerank_dense(matrix, matrix.shape[0], int(k1), int(k2), float(lambda_value), memory_budget_mb)
    return _back(result, dist)


def k_reciprocal_terms_single(dist: ArrayLike, k1: int = 20, k2: int = 6,
                              memory_budget_mb: float = 1024.0) -> tuple[ArrayLike, ArrayLike]:
    """(Jaccard distance, normalised squared original distance), both N x N, for one set: the
    re-ranked distance for any lambda is jaccard * (1 - lambda) + original * lambda, so a search
    over lambda needs one call."""
    _check_params(k1, k2, 0.0)
    matrix = _as_tensor("dist", dist)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"dist must be square (N x N) for single-set re-ranking, got {tuple(matrix.shape)}")
    with single_thread_below(matrix.shape[0]):
        jaccard, original = _dense_terms(matrix, matrix.shape[0], int(k1), int(k2), memory_budget_mb)
    return _back(jaccard, dist), _back(original, dist)


# ---------------------------------------------------------------- bounded-memory mode


def euclidean_distance(features: ArrayLike) -> ArrayLike:
    """sqrt(max(2 - 2 cos, 0)) between L2-normalised rows: the dense input that matches the
    bounded mode (`k_reciprocal_rerank_single(euclidean_distance(f))`)."""
    tensor = torch.nn.functional.normalize(_as_tensor("features", features).float(), dim=1)
    result = (2 - 2 * tensor @ tensor.T).clamp_(min=0).sqrt_()
    return _back(result, features)


def k_reciprocal_rerank_topm(features: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                             top_m: int = 100, chunk: int = 1024,
                             memory_budget_mb: float = 1024.0) -> tuple[ArrayLike, ArrayLike]:
    """All-vs-all re-ranking of one set without an N x N matrix: (indices N x M, distances N x M),
    each row the item's M nearest original neighbours (itself included) re-ordered by re-ranked
    distance, ascending, ties by index.

    Definition: features are L2-normalised; the squared original distance is s = max(2 - 2 cos, 0)
    and it is divided by its row maximum over all N items, found exactly during the chunked kNN
    pass. That is precisely the dense normalisation of `euclidean_distance(features)` (symmetric,
    so column max = row max), and the kNN lists are exact, so the k-reciprocal sets, V, the
    expansion and the Jaccard terms equal the dense ones (up to float rounding of the distances).
    The returned values therefore equal the dense re-ranked distances at the same (row, column) pairs; what the bounded mode gives up is
    only columns outside the top-M original neighbours (the dense row may rank one of those higher)."""
    _check_params(k1, k2, lambda_value)
    matrix = _as_tensor("features", features)
    feats = torch.nn.functional.normalize(matrix.float(), dim=1)
    n = feats.shape[0]
    top_m = min(int(top_m), n)
    width = min(max(k1 + 1, k2, top_m), n)
    rank = torch.empty((n, width), dtype=torch.long, device=feats.device)
    knn_square = torch.empty((n, width), dtype=torch.float32, device=feats.device)
    row_max = torch.empty(n, dtype=torch.float32, device=feats.device)
    for start in range(0, n, max(1, int(chunk))):
        stop = min(start + max(1, int(chunk)), n)
        square = torch.addmm(torch.tensor(2.0, device=feats.device), feats[start:stop], feats.T,
                             alpha=-2.0).clamp_(min=0)
        row_max[start:stop] = square.amax(dim=1)
        knn_square[start:stop], rank[start:stop] = stable_smallest(square, width)
    if bool((row_max == 0).any()):
        raise ValueError("all features are identical (every distance is 0); re-ranking needs distinct items")

    def pair_dist(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        out = torch.empty(cols.shape, dtype=torch.float32, device=feats.device)
        # The gathered B x W x D neighbour features are the big temporary: bound them.
        block = _chunk_rows(rows.numel(), cols.shape[1] * feats.shape[1], memory_budget_mb, 8)
        for start in range(0, rows.numel(), block):
            part_rows, part_cols = rows[start:start + block], cols[start:start + block]
            dots = torch.einsum("bd,bwd->bw", feats[part_rows], feats[part_cols])
            out[start:start + block] = (2 - 2 * dots).clamp_(min=0) / row_max[part_rows, None]
        return out

    v_index, v_value = _encode(rank, pair_dist, int(k1), int(k2), memory_budget_mb)
    inverted = _InvertedIndex(v_index, v_value, n)
    out_index = torch.empty((n, top_m), dtype=torch.long, device=feats.device)
    out_dist = torch.empty((n, top_m), dtype=torch.float32, device=feats.device)
    for start, stop in inverted.row_chunks(v_index, n, memory_budget_mb):
        candidates = rank[start:stop, :top_m]
        overlap = inverted.overlap(v_index[start:stop], v_value[start:stop]).gather(1, candidates)
        original = knn_square[start:stop, :top_m] / row_max[start:stop, None]
        final = _jaccard(overlap) * (1 - lambda_value) + original * lambda_value
        candidates, order = candidates.sort(dim=1)
        final = final.gather(1, order)
        final, order = torch.sort(final, dim=1, stable=True)
        out_index[start:stop], out_dist[start:stop] = candidates.gather(1, order), final
    return _back(out_index, features), _back(out_dist, features)
