"""The dense mode end to end: ranking, encoding, Jaccard sums and the final blend for the query
rows of a joined (all x all) distance matrix D.

D is read three times (column maxima and minima of 8-row blocks in one pass, gathers of the
candidates, the final blend) and the normalised N x N matrix is never built: orig[i, j] is
D[j, i]^2 / s[i], computed where it is needed. The Jaccard accumulator is the output itself."""

from __future__ import annotations

from functools import partial

import torch

from jaguar.retrieval.post.rerank_kernel.encode import encode
from jaguar.retrieval.post.rerank_kernel.threads import Workers, split
from jaguar.retrieval.post.rerank_kernel.overlaps import mirror_upper, pair_overlaps
from jaguar.retrieval.post.rerank_kernel.ranking import dense_rank, normalised_gather


def dense_terms(joined: torch.Tensor, n_query: int, k1: int, k2: int, budget_mb: float, name: str,
                lambda_value: float | None, workers: Workers) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With lambda_value: (re-ranked distance, None); without: (Jaccard distance, normalised
    original distance); float32, for the query rows (the first n_query) against the gallery
    columns (those after the queries, or all columns when every row is a query).

    joined: the N x N distance matrix D of all items, any float dtype; `name` is what errors
    call it. Row loops are shared out to `workers`; call this through `workers.run` so they
    run on one intra-op thread each."""
    joined = joined.contiguous()  # the kernel reads D through flat offsets
    n, device = joined.shape[0], joined.device
    rank, scale = dense_rank(joined, max(k1 + 1, k2), budget_mb, name, workers)
    v_index, v_value = encode(rank, normalised_gather(joined, scale), k1, k2, budget_mb, workers)
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
    pair_overlaps(v_index, v_value, n, row_offset, col_offset, storage, budget_mb, workers, upper=symmetric)
    out = storage[:cells].view(n_query, n_gallery)
    if symmetric:
        mirror_upper(out, workers)
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

    workers.map([partial(blend, first, last) for first, last in split(n_query, workers.parts(device))])
    return out, original


