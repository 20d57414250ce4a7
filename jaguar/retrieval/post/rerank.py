"""k-reciprocal encoding re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification
with k-reciprocal Encoding", CVPR 2017), with the conventions of the authors' published python
code (`re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`). Public functions here;
the batched kernel is in jaguar/retrieval/post/rerank_kernel/, the bounded mode in rerank_bounded.py.

Algorithm, for a joined matrix D of all N items (rows and columns in the same order):
1. orig[i, j] = D[j, i]^2 / max_k D[k, i]^2 -- D squared, each column divided by its maximum,
   transposed (the published code's normalisation; on a symmetric D it is row i over its max).
2. N(i, k): the first k of row i of orig in ascending order (i itself is normally first). R(i) = the j in N(i, k1 + 1) with i
   in N(j, k1 + 1) (k1-reciprocal). Each c in R(i) adds its round(k1/2)-reciprocal set when more
   than 2/3 of that set already lies in R(i).
3. V[i, j] = exp(-orig[i, j]) over j in the expanded set, normalised to sum 1; local query
   expansion replaces V[i] by the mean of V over N(i, k2) (k2 = 1: no expansion).
4. jaccard[i, j] = 1 - s / (2 - s) with s = sum_c min(V[i, c], V[j, c]), and
   final = (1 - lambda) * jaccard + lambda * orig.

Contract:
* Query x gallery (`k_reciprocal_rerank`): D = [[q_q, q_g], [q_g^T, g_g]], (Q + G)^2; queries
  are neighbours of each other, as in the published code; the result is final[query rows,
  gallery columns], Q x G. Single set (`k_reciprocal_rerank_single`, `k_reciprocal_terms_single`):
  D is the given N x N matrix, every row a query and every column a gallery item including the
  row's own item (drop the diagonal downstream); this is not the query x gallery call with
  Q = G = the set, which would hold every image twice at distance 0 from itself.
* Inputs: numpy arrays or torch tensors of any float dtype (integers become float64), finite;
  D need not be symmetric. Output: float32, numpy in -> numpy out, torch in -> torch out on the
  input's device (CPU or GPU; on a GPU the kernel is plain torch ops).
* k1 >= 1, k2 >= 1, 0 <= lambda <= 1 (0: Jaccard distance only, 1: the normalised original
  distance only); k1 + 1 and k2 are capped at N.
* Ties: the initial ranking breaks equal distances by index (a stable sort). That is the only
  deliberate difference from the published code (numpy's default, unstable argsort); the tests
  hold the kernel to the plain-loop reference tests/rerank_reference.py to 1e-4.
* Errors: ValueError naming the argument for a non-2-D, non-square or mismatched matrix, NaN or
  infinite distances, an all-zero column and k1/k2/lambda out of range; TypeError for an input
  that is neither numpy nor torch.
* Memory: the dense modes hold D, the output, O(N * k1 * k2) tables and about
  `memory_budget_mb` of working memory (at N = 70,000, D alone is ~20 GB in float32: use the
  bounded mode, `k_reciprocal_rerank_topm`, which never holds N x N).
* Threads: on the CPU the kernel's row loops run on `workers` (see
  rerank_kernel.threads.Workers), each thread on one torch intra-op thread; without one, a call
  makes its own with as many threads as the caller's torch intra-op count. The caller's torch
  thread settings are left as they were. Speed: ~30x the plain loop at N = 2,000 on a 2-core
  CPU (benchmarks/rerank.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from jaguar.retrieval.post.rerank_bounded import k_reciprocal_rerank_topm
from jaguar.retrieval.post.rerank_kernel import (ArrayLike, Workers, as_tensor, check_finite, check_params, dense_terms,
                                            like, run_on_workers)

__all__ = ("Workers", "euclidean_distance", "k_reciprocal_rerank", "k_reciprocal_rerank_single",
           "k_reciprocal_rerank_topm", "k_reciprocal_terms_single")


def k_reciprocal_rerank(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20,
                        k2: int = 6, lambda_value: float = 0.3, memory_budget_mb: float = 1024.0,
                        workers: Workers | None = None) -> ArrayLike:
    """Re-ranked query x gallery distances, Q x G float32, from the query x gallery (Q x G),
    query x query (Q x Q) and gallery x gallery (G x G) distances. Peak memory: the (Q + G)^2
    joined matrix, the output, O((Q + G) * k1 * k2) tables and about `memory_budget_mb`."""
    check_params(k1, k2, lambda_value)
    q_g = as_tensor("q_g_dist", q_g_dist)
    q_q = as_tensor("q_q_dist", q_q_dist, q_g.device)
    g_g = as_tensor("g_g_dist", g_g_dist, q_g.device)
    n_query, n_gallery = q_g.shape
    if q_q.shape != (n_query, n_query) or g_g.shape != (n_gallery, n_gallery):
        raise ValueError(f"shapes do not fit: q_g_dist {tuple(q_g.shape)} needs q_q_dist ({n_query}, {n_query}) "
                         f"and g_g_dist ({n_gallery}, {n_gallery}), got {tuple(q_q.shape)} and {tuple(g_g.shape)}")
    dtype = torch.promote_types(torch.promote_types(q_g.dtype, q_q.dtype), g_g.dtype)
    joined = torch.cat([torch.cat([q_q.to(dtype), q_g.to(dtype)], dim=1),
                        torch.cat([q_g.T.to(dtype), g_g.to(dtype)], dim=1)], dim=0)
    result, _ = run_on_workers(workers, joined.device, dense_terms, joined, n_query, int(k1), int(k2),
                            memory_budget_mb, "q_g_dist, q_q_dist or g_g_dist", float(lambda_value))
    return like(result, q_g_dist)


def _square(name: str, dist: ArrayLike) -> torch.Tensor:
    matrix = as_tensor(name, dist)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be square (N x N) for single-set re-ranking, got {tuple(matrix.shape)}")
    return matrix


def k_reciprocal_rerank_single(dist: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                               memory_budget_mb: float = 1024.0, workers: Workers | None = None) -> ArrayLike:
    """All-vs-all re-ranked distances for one set, N x N float32: the joined matrix is `dist`
    (N x N) itself, every row a query, every column a gallery item including the row's own item."""
    check_params(k1, k2, lambda_value)
    matrix = _square("dist", dist)
    result, _ = run_on_workers(workers, matrix.device, dense_terms, matrix, matrix.shape[0], int(k1), int(k2),
                            memory_budget_mb, "dist", float(lambda_value))
    return like(result, dist)


def k_reciprocal_terms_single(dist: ArrayLike, k1: int = 20, k2: int = 6, memory_budget_mb: float = 1024.0,
                              workers: Workers | None = None) -> tuple[ArrayLike, ArrayLike]:
    """(Jaccard distance, normalised squared original distance), both N x N float32, for one set:
    the re-ranked distance for any lambda is jaccard * (1 - lambda) + original * lambda, so a
    search over lambda needs one call."""
    check_params(k1, k2, 0.0)
    matrix = _square("dist", dist)
    jaccard, original = run_on_workers(workers, matrix.device, dense_terms, matrix, matrix.shape[0], int(k1), int(k2),
                                    memory_budget_mb, "dist", None)
    return like(jaccard, dist), like(original, dist)


def euclidean_distance(features: ArrayLike) -> ArrayLike:
    """sqrt(max(2 - 2 cos, 0)) between L2-normalised rows of features (N x D): N x N float32, the
    dense input that matches the bounded mode (`k_reciprocal_rerank_single(euclidean_distance(f))`)."""
    matrix = as_tensor("features", features)
    check_finite("features", matrix.amax(dim=0), matrix.amin(dim=0))
    tensor = torch.nn.functional.normalize(matrix.float(), dim=1)
    result = (2 - 2 * tensor @ tensor.T).clamp_(min=0).sqrt_()
    return like(result, features)
