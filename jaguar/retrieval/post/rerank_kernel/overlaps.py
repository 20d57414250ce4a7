"""The Jaccard sums of the dense mode: sum_c min(V[a, c], V[b, c]) for every pair (a, b), through
the columns of V (an inverted index), and the mirror that completes a symmetric result."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from jaguar.retrieval.post.rerank_kernel.threads import Workers, stable_order

_BYTES_PER_VISIT = 24  # dense Jaccard: int64 target, float32 minimum, their broadcast inputs
_MAX_VISITS_PER_STEP = 1 << 18  # keeps the visit temporaries (~6 MB) cache- and allocator-friendly
_OUTPUT_BLOCK_BYTES = 1 << 21  # Jaccard scatter-adds run through the output in row blocks of about this size


def pair_overlaps(v_index: torch.Tensor, v_value: torch.Tensor, n: int, row_offset: torch.Tensor,
                  col_offset: torch.Tensor, out: torch.Tensor, budget_mb: float, workers: Workers,
                  upper: bool = False) -> None:
    """out.view(-1)[row_offset[a] + col_offset[b]] += min(V[a, c], V[b, c]) for every column c and
    every pair (a, b) of rows in it; a sum at or beyond out.numel() - 1 lands in the last cell,
    a dump. With upper=True only the pairs with a <= b (half the work when the result is
    symmetric; `mirror_upper` completes it).

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
    by_column = stable_order(col)
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
        rows, values, first, span, row_offsets = (t.index_select(0, keep)
                                                  for t in (rows, values, first, span, row_offsets))
    if rows.numel() == 0:
        return
    # Steps: blocks of output rows (at least 64), then classes of visit counts in ratios of 5/4
    # (a width never exceeds 5/4 of an entry's span, so reads stay within its column's tail).
    n_cols = max(1, out.numel() // max(1, int((row_offset < dump).sum())))
    block_rows = max(64, _OUTPUT_BLOCK_BYTES // (out.element_size() * n_cols))
    width_class = torch.floor(torch.log2(span.double()) / np.log2(1.25)).long()
    key = torch.div(rows, block_rows, rounding_mode="floor") * (int(width_class.max()) + 1) + width_class
    order = stable_order(key)
    key, first, span, a_offset, a_value = (t.index_select(0, order) for t in (key, first, span, row_offsets, values))
    new_group = torch.ones(key.shape, dtype=torch.bool, device=device)
    torch.ne(key[1:], key[:-1], out=new_group[1:])
    group = torch.cumsum(new_group, 0) - 1
    widths = torch.zeros(int(group[-1]) + 1, dtype=span.dtype, device=device).scatter_reduce_(0, group, span, "amax")
    bounds = [*new_group.nonzero().view(-1).tolist(), key.numel()]
    parts = workers.parts(device)
    visit_budget = max(1, min(_MAX_VISITS_PER_STEP, int(budget_mb / parts * 2**20 // _BYTES_PER_VISIT)))
    flat = out.view(-1)
    groups = list(zip(bounds[:-1], bounds[1:], widths.tolist(),
                      torch.div(key[bounds[:-1]], int(width_class.max()) + 1, rounding_mode="floor").tolist()))
    # Whole row blocks go to threads, heaviest first to the least loaded (with upper=True the
    # first rows have the longest suffixes): no two threads add into the same output rows (the
    # dump cell aside, whose value is never read).
    block_visits: dict[int, int] = {}
    for group_start, group_stop, width, row_block in groups:
        block_visits[row_block] = block_visits.get(row_block, 0) + (group_stop - group_start) * width
    owner, load = {}, [0] * parts
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

    workers.map([partial(visit, worker) for worker in range(parts)])


def mirror_upper(square: torch.Tensor, workers: Workers, tile: int = 256) -> None:
    """Copy the upper triangle of a square matrix onto its (zero) lower triangle, in place, tile
    by tile so that the transposed reads stay in cache and no N x N copy is made. Tile rows are
    dealt out to the kernel's threads: a thread reads upper tiles of its rows and writes their
    mirror images, which no other thread reads."""
    n = square.shape[0]
    parts = workers.parts(square.device)

    def mirror(worker: int) -> None:
        for i in range(worker * tile, n, parts * tile):
            block = square[i:i + tile, i:i + tile]
            block.add_(block.T.tril(-1))
            for j in range(i + tile, n, tile):
                square[j:j + tile, i:i + tile].copy_(square[i:i + tile, j:j + tile].T)

    workers.map([partial(mirror, worker) for worker in range(parts)])


