"""The batched k-reciprocal re-ranking kernel behind jaguar.retrieval.post.rerank (read that module
first: it states the algorithm and its contract). No Python loop over items.

Modules, in the order a dense call runs them:

* `inputs`   -- checks and conversions at the edge (numpy/torch in and out, finite, k1/k2/lambda).
* `threads`  -- the CPU-only parts: `Workers` (the Python threads that row loops are shared out
                to, each on one torch intra-op thread), numpy selection and sort; `on_host` is the
                switch, and on other devices the kernel is plain torch ops on the calling thread.
* `ranking`  -- the k nearest of every item, ties by index, from D's column minima over blocks of
                8 rows (dense) or from rows in memory (`stable_smallest`, the bounded mode).
* `encode`   -- the k-reciprocal sets, their expansion, Gaussian weights and local query
                expansion: the sparse V as padded (index, value) rows.
* `overlaps` -- the Jaccard sums sum_c min(V[a, c], V[b, c]) through V's columns, into the
                output block by block (half of them and a mirror when the result is symmetric).
* `dense`    -- the dense mode end to end, and the final blend.

Memory: the work is chunked so that its temporaries stay within `memory_budget_mb` beyond the
input, the output and O(N * k1 * k2) tables. Threads: every row chunk and every output row is
written by exactly one thread, so threads never add into the same cell; 1, 2 or 3 threads give
the same numbers to float rounding (a chunk's padded width can change the order of a row sum).
"""

from jaguar.retrieval.post.rerank_kernel.dense import dense_terms
from jaguar.retrieval.post.rerank_kernel.encode import encode
from jaguar.retrieval.post.rerank_kernel.threads import Workers, run_on_workers
from jaguar.retrieval.post.rerank_kernel.inputs import (BYTES_PER_DENSE_CELL, ArrayLike, as_tensor, check_finite,
                                                   check_params, chunk_rows, like)
from jaguar.retrieval.post.rerank_kernel.ranking import PairDistance, stable_smallest

__all__ = ("BYTES_PER_DENSE_CELL", "ArrayLike", "PairDistance", "Workers", "as_tensor", "check_finite",
           "check_params", "chunk_rows", "dense_terms", "encode", "like", "run_on_workers", "stable_smallest")
