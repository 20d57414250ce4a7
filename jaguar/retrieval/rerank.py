"""k-reciprocal encoding re-ranking (Zhong et al., CVPR 2017) as a batched torch kernel.

Three entry points share one core:

* `k_reciprocal_rerank(q_g, q_q, g_g, ...)` -- the query x gallery contract of the widely used
  python version: the three matrices are joined into one (Q+G)^2 matrix D, which is squared, each
  column divided by its maximum and transposed: orig[i, j] = D[j, i]^2 / max_k D[k, i]^2.
* `k_reciprocal_rerank_single(dist, ...)` -- one set, all-vs-all: the joined matrix *is* `dist`
  (N x N); every row is a query, every column a gallery item (the item itself included; drop the
  diagonal downstream). This is not the general call with Q = G = the set, which would hold every
  image twice at distance 0 from itself.
* `k_reciprocal_rerank_topm(features, ...)` in jaguar/retrieval/rerank_bounded.py -- bounded
  memory, never holds N x N: kNN lists from chunked matrix products, re-ranked distances for each
  item's top-M original neighbours.

No Python loop over rows. The dense path reads D three times (column maxima, minima of 8-row
blocks, the final blend) and never builds the normalised N x N matrix: row i of it is column i
of D over a per-row constant, so the k smallest per row are found from the block minima (the k
blocks with the smallest minima, then the k smallest of their entries, both by introselect).
k-reciprocal sets are gathers over the N x (k1+1) neighbour table; V is a sparse (index, value)
table deduplicated through a scratch row; the Jaccard sums visit, for each entry (a, c) of V,
the rows b of column c (b >= a in single-set mode, where the result is symmetric and its upper
triangle is mirrored; sum_c nnz(c)^2 visits, or about half) and scatter-add min(V[a, c], V[b, c])
into the output, block of output rows by block so the adds stay in cache. Work is chunked so
its memory stays within `memory_budget_mb` beyond the input, the output and O(N * k) tables;
the chunks of rows are shared out to as many Python threads as torch had intra-op threads
(`single_thread_below`), each running its ops on one thread; each output row is written by one
thread, so they never add into the same cell. Ties in the initial ranking are broken by index
(a stable sort), as in tests/rerank_reference.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Fetch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_BYTES_PER_DENSE_CELL = 16  # B x N working rows: float32 scatter target, Jaccard, blend, mask
_BYTES_PER_PAIR = 40  # one inverted-index visit: int64 row and target, float32 value and minimum
_BYTES_PER_VISIT = 24  # dense Jaccard: int64 target, float32 minimum, their broadcast inputs
_MAX_VISITS_PER_STEP = 1 << 18  # keeps the visit temporaries (~6 MB) cache- and allocator-friendly
_MAX_PADDING_WASTE = 6.0  # padded visits may exceed exact ones by this factor (hub columns); a padded
# visit costs several times less than an exact one, measured at N = 10,000
_OUTPUT_BLOCK_BYTES = 1 << 21  # Jaccard scatter-adds run through the output in row blocks of about this size
_BLOCK = 8  # columns per block whose minimum prefilters the k smallest of a row
_MAX_ROWS_PER_STEP = 512  # rows per chunk of the O(N * k) passes: scratch rows stay in cache
_SENTINEL = torch.iinfo(torch.int32).max
_T = TypeVar("_T")
_kernel_workers = 1  # Python threads for the kernel's row loops; set by single_thread_below
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process id, size): a forked child makes its own


@contextmanager
def single_thread_below(n_items: int, limit: int = 16384) -> Iterator[None]:
    """Run torch on one intra-op thread while n_items < limit, restoring the setting after; the
    kernel's row loops then run on as many Python threads as torch had (`_in_parallel`).

    The dense kernel is hundreds of ops on tensors of ~N x 100 elements. torch's own intra-op
    threads wake for every op and spin until all arrive: on a busy 2-core machine a descheduled
    thread made each op wait (N=371: 0.69 s with 2 threads, 0.04 s with 1; a 371-image tune-post
    29 s vs 1.9 s). Python threads that each run whole chunks of rows, on one intra-op thread
    apiece, need no such rendezvous: torch releases the GIL inside each op, and a thread that is
    descheduled holds up nobody until the chunks are joined. Not for concurrent callers."""
    global _kernel_workers
    previous = torch.get_num_threads()
    if n_items >= limit or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    saved, _kernel_workers = _kernel_workers, previous
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        _kernel_workers = saved


def _on_host(device: torch.device) -> bool:
    """Whether the CPU-only shortcuts apply (numpy selections and sorts, Python worker threads);
    elsewhere the same kernel runs on torch ops alone. The tests turn it off to run that path on
    the CPU."""
    return device.type == "cpu"


def _workers(device: torch.device) -> int:
    """How many parts a row loop is split into: the kernel's threads on CPU, one elsewhere (a
    GPU queues the ops of one thread asynchronously already)."""
    return _kernel_workers if _on_host(device) else 1


def _in_parallel(jobs: list[Callable[[], _T]]) -> list[_T]:
    """Run the jobs, the first in this thread and the others on worker threads; their results
    in order. An exception in any job is raised here, after all of them have stopped."""
    if len(jobs) == 1:
        return [jobs[0]()]
    key = (os.getpid(), len(jobs) - 1)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools.setdefault(key, ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="jaguar-rerank"))
    futures = [pool.submit(job) for job in jobs[1:]]
    try:
        first = jobs[0]()
    finally:
        wait(futures)
    return [first, *(future.result() for future in futures)]


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """range(n) as `parts` contiguous (start, stop) pieces of near-equal size (fewer when n is small)."""
    parts = max(1, min(parts, n))
    edges = [n * p // parts for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


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
    return tensor


def _check_finite(name: str, *reductions: torch.Tensor) -> None:
    # Column maxima and minima propagate NaN and show every +-inf: no separate N x N pass.
    if not all(bool(torch.isfinite(r).all()) for r in reductions):
        raise ValueError(f"{name} contains NaN or infinite distances; fix the features before re-ranking")


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"re-ranking lambda_value must be in [0, 1], got {lambda_value}")


def _chunk_rows(n_rows: int, n_cols: int, budget_mb: float, bytes_per_cell: int = _BYTES_PER_DENSE_CELL) -> int:
    budget = max(float(budget_mb), 1e-3) * 2**20
    return int(max(1, min(n_rows, budget // max(1, n_cols * bytes_per_cell))))


# ---------------------------------------------------------------- the k smallest of each row


def _k_smallest_set(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, tied): the columns of the k smallest entries of each row (in column order), and
    the rows where that set is not unique, i.e. the (k+1)-th smallest equals the k-th; those rows
    come back with their first k columns, for the caller to redo. numpy's introselect has a far
    smaller per-row cost than torch.topk/kthvalue on CPU (0.8 vs 5.5 ms for 2,000 x 250)."""
    n_rows, width = values.shape
    if k >= width:
        return (torch.arange(width, device=values.device).expand(n_rows, -1),
                torch.zeros(n_rows, dtype=torch.bool, device=values.device))
    if _on_host(values.device):
        parted = torch.from_numpy(np.partition(values.contiguous().numpy(), k - 1, axis=1))
        kth, following = parted[:, k - 1], parted[:, k:].amin(dim=1)
    else:
        two = torch.topk(values, k + 1, dim=1, largest=False, sorted=True).values
        kth, following = two[:, k - 1], two[:, k]
    tied = following == kth
    # Exactly k entries are <= the k-th smallest where the (k+1)-th is larger.
    member = (values <= kth[:, None]) if not bool(tied.any()) else torch.where(
        tied[:, None], torch.arange(width, device=values.device) < k, values <= kth[:, None])
    return member.nonzero()[:, 1].view(n_rows, k), tied


def _compact(keep: torch.Tensor, tables: list[torch.Tensor], pads: list[float | int]) -> list[torch.Tensor]:
    """Per row, the entries where keep is true, moved left (order kept), padded on the right."""
    # Kept entries go to their 1-based rank among the kept, the others to column 0, dropped.
    target = keep.cumsum(dim=1)
    width = max(int(target[:, -1].max()) if keep.numel() else 0, 1)
    target.mul_(keep)
    return [torch.full((keep.shape[0], width + 1), pad, dtype=table.dtype, device=table.device)
            .scatter_(1, target, table)[:, 1:] for table, pad in zip(tables, pads)]


def _order_by_value_then_column(values: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value, column) in one sort: the bits of a non-negative float32 order
    like its value, so (bits << 32) + column is an int64 key with the same order."""
    key = (values.contiguous().view(torch.int32).long() << 32) + cols
    order = key.sort(dim=1).indices
    return values.gather(1, order), cols.gather(1, order)


def _smallest(block_min: torch.Tensor, fetch: Fetch, rows: torch.Tensor, n: int, width: int,
              k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, index, unresolved) of the k smallest entries of each row, ordered by (value, column).

    block_min[b, s] is the minimum of row b over columns [s * width, (s + 1) * width), a
    non-negative float32. The k blocks with the smallest minima hold every entry below the k-th
    block minimum t, and the k-th smallest entry v_k is <= t; an entry equal to t can lie in a
    block left out only when another block's minimum ties with t. The k smallest of the fetched
    entries are then ordered by (value, column). Rows where either choice is not unique (a tie
    at its boundary) come back in `unresolved` for the caller to sort in full."""
    blocks, unresolved = _k_smallest_set(block_min, k)
    cols = (blocks[:, :, None] * width + torch.arange(width, device=block_min.device)).flatten(1)
    valid = cols < n
    values = fetch(rows, cols.clamp(max=n - 1)).masked_fill_(~valid, float("inf"))
    pick, tied = _k_smallest_set(values, k)
    unresolved |= tied
    return *_order_by_value_then_column(values.gather(1, pick), cols.gather(1, pick)), unresolved


def _block_width(n: int, k: int) -> int:
    return _BLOCK if n >= 16 * k else 1


def stable_smallest(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, ordered by (value, column): a stable argsort's first k.

    topk is O(N) a row but unordered among ties (on contiguous rows it beats a block prefilter,
    whose inner-axis minimum costs as much). It is asked for k + 1 entries: a left-out entry
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


def _fill_at(table: torch.Tensor, index: torch.Tensor, value: float | int) -> torch.Tensor:
    """table.scatter_(1, index, value) with the value as a broadcast tensor: torch's scalar
    overload of scatter_ is ~2.5x slower on CPU (0.78 vs 0.31 ms for 512 x 606 indices)."""
    return table.scatter_(1, index, torch.tensor(value, dtype=table.dtype, device=table.device).expand(index.shape))


def _one_of_each(index: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """keep[b, m]: true for exactly one m among the entries of row b with equal index. scratch is
    a B x (n + 1) int32 table with any contents: every cell read here is written first, so it
    is never reset (the cost follows the entries, not n). Which of the duplicates is kept is
    left to scatter_, which is fine where they carry the same thing."""
    position = torch.arange(index.shape[1], dtype=torch.int32, device=index.device).expand_as(index)
    scratch.scatter_(1, index, position)
    return scratch.gather(1, index) == position


def _rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an integer index of any shape: index_select, several times faster on CPU
    than advanced indexing."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


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
    # A row's bytes: its int32 scratch row over all n items, and ~6 live copies of its member
    # list (K1 + K1 x Kh int64 entries).
    parts = _split(n, _workers(device))
    step = max(1, min(_MAX_ROWS_PER_STEP,
                      int(budget_mb / len(parts) * 2**20 // ((n + 1) * 8 + k_fwd * (k_half + 1) * 48))))
    everyone = torch.arange(n, device=device)
    # The round(k1/2)-reciprocal set of every item: its half list where it is on the other side's.
    half_reciprocal = torch.cat([(_rows_of(half_lists, half_lists[s:s + step]) == everyone[s:s + step, None, None]).any(dim=-1)
                                 for s in range(0, n, step)])
    half_size = half_reciprocal.sum(dim=1)

    def encode_rows(first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        scratch = torch.full((min(step, last - first), n + 1), _SENTINEL, dtype=torch.int32, device=device)
        owner = torch.empty_like(scratch)  # for _one_of_each
        pieces = []
        for start in range(first, last, step):
            rows = everyone[start:min(start + step, last)]
            marks = scratch[:rows.numel()]
            forward = forward_lists[rows]
            # R(i): forward neighbours that also have i among their k1 + 1 nearest.
            reciprocal = (_rows_of(forward_lists, forward) == rows[:, None, None]).any(dim=-1)
            own = torch.where(reciprocal, forward, n)
            # Each candidate c in R(i) brings its half-size reciprocal set when more than 2/3 of
            # it already lies in R(i): membership in R(i) is looked up in the scratch row.
            cand_sets = _rows_of(half_lists, forward).flatten(1)  # B x (K1 * Kh)
            cand_valid = _rows_of(half_reciprocal, forward).flatten(1)
            _fill_at(marks, own, 0)
            in_own = marks.gather(1, cand_sets) == 0
            _fill_at(marks, own, _SENTINEL)
            overlap = (in_own & cand_valid).view(-1, k_fwd, k_half).sum(dim=-1)
            accept = reciprocal & (overlap.double() > 2.0 / 3 * _rows_of(half_size, forward).double())
            members = torch.cat([own, torch.where(cand_valid & accept.repeat_interleave(k_half, dim=1), cand_sets, n)],
                                dim=1)
            keep = _one_of_each(members, owner[:rows.numel()]) & (members < n)
            (members,) = _compact(keep, [members], [n])
            weight = torch.exp(-pair_dist(rows, members.clamp(max=n - 1))) * (members < n)
            pieces.append((members, weight / weight.sum(dim=1, keepdim=True)))
        return pieces

    v_index, v_value = _pad_cat([piece for pieces in _in_parallel([partial(encode_rows, first, last)
                                                                   for first, last in parts]) for piece in pieces], n)
    if k2 == 1:
        return v_index, v_value
    return _local_query_expansion(rank, v_index, v_value, k2, step, parts)


def _local_query_expansion(rank: torch.Tensor, v_index: torch.Tensor, v_value: torch.Tensor, k2: int,
                           step: int, parts: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each V row becomes the mean of the V rows of its k2 nearest neighbours (itself included):
    the neighbours' entries are summed per column in a dense scratch row, then compacted."""
    n, device = rank.shape[0], rank.device
    k_qe = min(k2, n)
    v_index = torch.cat([v_index, torch.full((1, v_index.shape[1]), n, device=device)])
    v_value = torch.cat([v_value, torch.zeros((1, v_value.shape[1]), dtype=v_value.dtype, device=device)])

    def expand_rows(first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sums = torch.zeros((min(step, last - first), n + 1), dtype=v_value.dtype, device=device)
        owner = torch.empty(sums.shape, dtype=torch.int32, device=device)  # for _one_of_each
        pieces = []
        for start in range(first, last, step):
            neighbours = rank[start:min(start + step, last), :k_qe]
            index, value = _rows_of(v_index, neighbours).flatten(1), _rows_of(v_value, neighbours).flatten(1)
            row_sums = sums[:index.shape[0]]
            row_sums.scatter_add_(1, index, value)
            total = row_sums.gather(1, index)
            _fill_at(row_sums, index, 0.0)
            keep = _one_of_each(index, owner[:index.shape[0]]) & (index < n)
            pieces.append(tuple(_compact(keep, [index, total / k_qe], [n, 0.0])))
        return pieces

    return _pad_cat([piece for pieces in _in_parallel([partial(expand_rows, first, last) for first, last in parts])
                     for piece in pieces], n)


def _jaccard(overlap: torch.Tensor) -> torch.Tensor:
    return 1 - overlap / (2.0 - overlap)


def _stable_order(key: torch.Tensor) -> torch.Tensor:
    if _on_host(key.device) and key.numel() and int(key.max()) < 1 << 16:
        # numpy sorts 16-bit keys with a stable radix sort: ~10x torch.sort at N = 2,000.
        return torch.from_numpy(np.argsort(key.numpy().astype(np.uint16), kind="stable"))
    return torch.sort(key, stable=True).indices


def _pair_overlaps(v_index: torch.Tensor, v_value: torch.Tensor, n: int, row_offset: torch.Tensor,
                   col_offset: torch.Tensor, out: torch.Tensor, budget_mb: float, upper: bool = False) -> None:
    """out.view(-1)[row_offset[a] + col_offset[b]] += min(V[a, c], V[b, c]) for every column c and
    every pair (a, b) of rows in it; a sum at or beyond out.numel() - 1 lands in the last cell,
    a dump. With upper=True only the pairs with a <= b (half the work when the result is
    symmetric; `_mirror_upper` completes it).

    Each entry (a, c) of V visits the rows b of column c: all of them, or with upper=True the
    column's suffix from a on (a column's rows are ascending). Entries of similar visit counts
    (within 1/4) are padded to a common width and done as one step, reading their column
    suffixes as rows of a sliding window over the CSC arrays (one row copy each, no per-visit
    index). Every column is followed by zero-valued slots, so a padded read adds 0. Steps run
    through the output in blocks of rows a (~2 MB), so the scatter-adds stay in cache: at
    N = 2,000 the 2.3 M scatter-adds take ~6 ms this way against ~15 ms in the order of
    column pairs, where consecutive visits land in different rows."""
    device, dump = out.device, out.numel() - 1
    # V by column (CSC): the entries in row-major order, then stably by column, so that each
    # column's rows are ascending. (index_select throughout: advanced indexing is ~5x slower.)
    present = (v_index.view(-1) < n).nonzero().view(-1)
    col = v_index.view(-1).index_select(0, present)
    by_column = _stable_order(col)
    present, col = present.index_select(0, by_column), col.index_select(0, by_column)
    rows = torch.div(present, v_index.shape[1], rounding_mode="floor")
    values = v_value.view(-1).index_select(0, present)
    length = torch.bincount(col, minlength=n)
    # The CSC arrays of output column offsets and values, with a zero tail of ceil(length / 4) + 1
    # slots after each column: entry e of the CSC order sits at e + shift[its column].
    tail = (length + 3) // 4 + 1
    shift = (torch.cumsum(tail, 0) - tail).index_select(0, col)
    placed = torch.arange(rows.numel(), device=device) + shift
    target_col = torch.zeros(rows.numel() + int(tail.sum()), dtype=torch.long, device=device)
    target_value = torch.zeros(target_col.shape, dtype=values.dtype, device=device)
    target_col.index_copy_(0, placed, col_offset.index_select(0, rows))
    target_value.index_copy_(0, placed, values)
    # Entry e visits from its own slot (upper) or its column's first slot to the column's end.
    end = (torch.cumsum(length, 0) + torch.cumsum(tail, 0) - tail).index_select(0, col)
    first = placed if upper else end - length.index_select(0, col)
    span = end - first
    row_offsets = row_offset.index_select(0, rows)
    # Rows that are not queries would only feed the dump: drop their entries. Columns that are
    # not gallery items still appear in the suffixes: their sums are clamped into the dump.
    some_rows_out, some_cols_out = bool((row_offset[:n] >= dump).any()), bool((col_offset[:n] >= dump).any())
    if some_rows_out:
        keep = (row_offsets < dump).nonzero().view(-1)
        rows, values, first, span, row_offsets = (t.index_select(0, keep) for t in (rows, values, first, span, row_offsets))
    if rows.numel() == 0:
        return
    # Steps: blocks of output rows (at least 64), then classes of visit counts in ratios of 5/4
    # (a width never exceeds 5/4 of an entry's span, so reads stay within its column's tail).
    n_cols = max(1, out.numel() // max(1, int((row_offset < dump).sum())))
    block_rows = max(64, _OUTPUT_BLOCK_BYTES // (out.element_size() * n_cols))
    width_class = torch.floor(torch.log2(span.double()) / np.log2(1.25)).long()
    key = torch.div(rows, block_rows, rounding_mode="floor") * (int(width_class.max()) + 1) + width_class
    order = _stable_order(key)
    key, first, span, a_offset, a_value = (t.index_select(0, order) for t in (key, first, span, row_offsets, values))
    new_group = torch.ones(key.shape, dtype=torch.bool, device=device)
    torch.ne(key[1:], key[:-1], out=new_group[1:])
    group = torch.cumsum(new_group, 0) - 1
    widths = torch.zeros(int(group[-1]) + 1, dtype=span.dtype, device=device).scatter_reduce_(0, group, span, "amax")
    bounds = [*new_group.nonzero().view(-1).tolist(), key.numel()]
    workers = _workers(device)
    visit_budget = max(1, min(_MAX_VISITS_PER_STEP, int(budget_mb / workers * 2**20 // _BYTES_PER_VISIT)))
    flat = out.view(-1)
    groups = list(zip(bounds[:-1], bounds[1:], widths.tolist(),
                      torch.div(key[bounds[:-1]], int(width_class.max()) + 1, rounding_mode="floor").tolist()))
    # Whole row blocks go to threads, heaviest first to the least loaded (with upper=True the
    # first rows have the longest suffixes): no two threads add into the same output rows (the
    # dump cell aside, whose value is never read).
    block_visits: dict[int, int] = {}
    for group_start, group_stop, width, row_block in groups:
        block_visits[row_block] = block_visits.get(row_block, 0) + (group_stop - group_start) * width
    owner, load = {}, [0] * workers
    for row_block in sorted(block_visits, key=block_visits.__getitem__, reverse=True):
        owner[row_block] = load.index(min(load))
        load[owner[row_block]] += block_visits[row_block]

    def visit(worker: int) -> None:
        for group_start, group_stop, width, row_block in groups:
            if owner[row_block] != worker:
                continue
            step = max(1, visit_budget // width)
            windows = (target_col.unfold(0, width, 1), target_value.unfold(0, width, 1))
            for start in range(group_start, group_stop, step):
                stop = min(start + step, group_stop)
                starts = first[start:stop]
                target = windows[0].index_select(0, starts).add_(a_offset[start:stop, None])
                if some_cols_out:
                    target.clamp_(max=dump)
                contribution = torch.minimum(windows[1].index_select(0, starts), a_value[start:stop, None])
                flat.scatter_add_(0, target.view(-1), contribution.view(-1))

    _in_parallel([partial(visit, worker) for worker in range(workers)])


def _mirror_upper(square: torch.Tensor, tile: int = 256) -> None:
    """Copy the upper triangle of a square matrix onto its (zero) lower triangle, in place, tile
    by tile so that the transposed reads stay in cache and no N x N copy is made. Tile rows are
    dealt out to the kernel's threads: a thread reads upper tiles of its rows and writes their
    mirror images, which no other thread reads."""
    n = square.shape[0]
    workers = _workers(square.device)

    def mirror(worker: int) -> None:
        for i in range(worker * tile, n, workers * tile):
            block = square[i:i + tile, i:i + tile]
            block.add_(block.T.tril(-1))
            for j in range(i + tile, n, tile):
                square[j:j + tile, i:i + tile].copy_(square[i:i + tile, j:j + tile].T)

    _in_parallel([partial(mirror, worker) for worker in range(workers)])


# ---------------------------------------------------------------- dense entry points


def _normalised_gather(joined: torch.Tensor, scale: torch.Tensor) -> PairDistance:
    """(rows, cols) -> orig[rows[:, None], cols] = D[cols, rows]^2 / scale[rows], from D itself."""
    flat = joined.view(-1)

    def gather(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        cells = cols * joined.shape[1] + rows[:, None]
        return flat.index_select(0, cells.view(-1)).view(cells.shape).pow(2).float().div_(scale[rows, None])
    return gather


def _dense_rank(joined: torch.Tensor, k: int, budget_mb: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each item (rank, N x k) and the scale s with orig[i, j] = D[j, i]^2 / s[i].

    Row i of the normalised matrix is column i of D over a constant, so its ranking comes from
    D's column-wise minima over blocks of rows: a reduction along D's contiguous axis, one pass."""
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
        pieces = _in_parallel([partial(reduce_columns, first, last) for first, last in _split(n, _workers(joined.device))])
        column_max = torch.cat([piece[0] for piece in pieces])
        minima = torch.cat([piece[1] for piece in pieces], dim=1)
    column_min = minima.amin(dim=0)
    _check_finite(name, column_max, column_min)
    # float32(max d^2) = max float32(d^2): the reference's column maximum of the squared matrix.
    scale = torch.maximum(column_max.pow(2), column_min.pow(2)).float()
    if bool((scale == 0).any()):
        bad = int((scale == 0).nonzero()[0])
        raise ValueError(f"column {bad} of the joined distance matrix is all zeros; re-ranking needs "
                         f"at least two distinct items")

    fetch = _normalised_gather(joined, scale)
    rank = torch.empty((n, k), dtype=torch.long, device=joined.device)
    parts = _split(n, _workers(joined.device))
    step = max(1, min(_MAX_ROWS_PER_STEP, _chunk_rows(n, minima.shape[0] + 40 * k * width, budget_mb / len(parts))))

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

    _in_parallel([partial(rank_rows, first, last) for first, last in parts])
    return rank, scale


def _dense_terms(joined: torch.Tensor, n_query: int, k1: int, k2: int, budget_mb: float, name: str,
                 lambda_value: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With lambda_value: (re-ranked distance, None); without: (Jaccard distance, normalised
    original distance), for the query rows against the gallery columns (all columns when every
    row is a query)."""
    joined = joined.contiguous()  # the kernel reads D through flat offsets
    n, device = joined.shape[0], joined.device
    rank, scale = _dense_rank(joined, max(k1 + 1, k2), budget_mb, name)

    v_index, v_value = _encode(rank, _normalised_gather(joined, scale), k1, k2, budget_mb)
    first_col = 0 if n_query == n else n_query
    n_gallery = n - first_col
    cells = n_query * n_gallery
    # The output is the Jaccard accumulator: row a's offset plus column b's offset, or past the
    # end (the dump cell) when a is not a query or b not a gallery item.
    row_offset = torch.full((n + 1,), cells, dtype=torch.long, device=device)
    row_offset[:n_query] = torch.arange(n_query, device=device) * n_gallery
    col_offset = torch.full((n + 1,), cells, dtype=torch.long, device=device)
    col_offset[first_col:n] = torch.arange(n_gallery, device=device)
    storage = torch.zeros(cells + 1, dtype=torch.float32, device=device)
    # Every row a query and every column a gallery item: the overlaps are symmetric.
    symmetric = n_query == n
    _pair_overlaps(v_index, v_value, n, row_offset, col_offset, storage, budget_mb, upper=symmetric)
    out = storage[:cells].view(n_query, n_gallery)
    if symmetric:
        _mirror_upper(out)
    original = None if lambda_value is not None else torch.empty_like(out)
    # Blend a few rows at a time so the two row blocks stay in cache.
    step = max(1, min(n_query, 2**18 // max(1, n_gallery)))

    def blend(first: int, last: int) -> None:
        denominator = torch.empty((min(step, last - first), n_gallery), dtype=torch.float32, device=device)
        for start in range(first, last, step):
            stop = min(start + step, last)
            block, spare = out[start:stop], denominator[:stop - start]
            torch.sub(2.0, block, out=spare)
            block.div_(spare)  # overlap / (2 - overlap)
            target = spare if original is None else original[start:stop]
            torch.pow(joined[first_col:, start:stop].T, 2, out=target)
            target.div_(scale[start:stop, None])
            if original is None:
                block.mul_(lambda_value - 1.0).add_(1.0 - lambda_value).add_(target, alpha=lambda_value)
            else:
                block.neg_().add_(1.0)

    _in_parallel([partial(blend, first, last) for first, last in _split(n_query, _workers(device))])
    return out, original


def _back(result: torch.Tensor, like: ArrayLike) -> ArrayLike:
    return result.cpu().numpy() if isinstance(like, np.ndarray) else result


def k_reciprocal_rerank(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20,
                        k2: int = 6, lambda_value: float = 0.3, memory_budget_mb: float = 1024.0) -> ArrayLike:
    """Re-ranked query x gallery distances (Q x G, float32), numpy in -> numpy out, torch in -> torch
    out on the input's device. Peak memory: the (Q+G)^2 joined matrix, the output, O((Q+G) * k1 * k2)
    tables and about `memory_budget_mb` of working memory."""
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
    with single_thread_below(joined.shape[0]):
        result, _ = _dense_terms(joined, n_query, int(k1), int(k2), memory_budget_mb,
                                 "q_g_dist, q_q_dist or g_g_dist", float(lambda_value))
    return _back(result, q_g_dist)


def _square(name: str, dist: ArrayLike) -> torch.Tensor:
    matrix = _as_tensor(name, dist)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be square (N x N) for single-set re-ranking, got {tuple(matrix.shape)}")
    return matrix


def k_reciprocal_rerank_single(dist: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                               memory_budget_mb: float = 1024.0) -> ArrayLike:
    """All-vs-all re-ranked distances for one set (N x N, float32): the joined matrix is `dist`
    itself, every row a query, every column a gallery item including the row's own item."""
    _check_params(k1, k2, lambda_value)
    matrix = _square("dist", dist)
    with single_thread_below(matrix.shape[0]):
        result, _ = _dense_terms(matrix, matrix.shape[0], int(k1), int(k2), memory_budget_mb, "dist",
                                 float(lambda_value))
    return _back(result, dist)


def k_reciprocal_terms_single(dist: ArrayLike, k1: int = 20, k2: int = 6,
                              memory_budget_mb: float = 1024.0) -> tuple[ArrayLike, ArrayLike]:
    """(Jaccard distance, normalised squared original distance), both N x N, for one set: the
    re-ranked distance for any lambda is jaccard * (1 - lambda) + original * lambda, so a search
    over lambda needs one call."""
    _check_params(k1, k2, 0.0)
    matrix = _square("dist", dist)
    with single_thread_below(matrix.shape[0]):
        jaccard, original = _dense_terms(matrix, matrix.shape[0], int(k1), int(k2), memory_budget_mb, "dist")
    assert original is not None
    return _back(jaccard, dist), _back(original, dist)


def euclidean_distance(features: ArrayLike) -> ArrayLike:
    """sqrt(max(2 - 2 cos, 0)) between L2-normalised rows: the dense input that matches the
    bounded mode (`k_reciprocal_rerank_single(euclidean_distance(f))`)."""
    matrix = _as_tensor("features", features)
    _check_finite("features", matrix.amax(dim=0), matrix.amin(dim=0))
    tensor = torch.nn.functional.normalize(matrix.float(), dim=1)
    result = (2 - 2 * tensor @ tensor.T).clamp_(min=0).sqrt_()
    return _back(result, features)
