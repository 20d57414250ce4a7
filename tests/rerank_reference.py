"""Plain-loop reference of k-reciprocal re-ranking (Zhong et al., CVPR 2017), one row at a time.

Written from the paper and the contract of its widely used python version: joined (Q+G)^2 matrix,
squared, each column divided by its maximum then transposed, k1-reciprocal sets with expansion by
the round(k1/2)-reciprocal sets of candidates, Gaussian weights, local query expansion over k2
neighbours, Jaccard distance through an inverted index. Slow on purpose: the tests and the
benchmark compare the batched kernel (jaguar.retrieval.post.rerank) against it. The only deliberate
difference from that code is a stable argsort, so ties are broken by index in both implementations.
"""

from __future__ import annotations

import numpy as np


def _rerank_rows(original_dist: np.ndarray, query_num: int, k1: int, k2: int,
                 lambda_value: float) -> np.ndarray:
    """Re-rank rows 0..query_num-1 of an already joined (all x all) distance matrix."""
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    all_num = original_dist.shape[0]
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, axis=1, kind="stable").astype(np.int64)
    half = int(np.around(k1 / 2.0))

    for i in range(all_num):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            cand_forward = initial_rank[candidate, :half + 1]
            cand_backward = initial_rank[cand_forward, :half + 1]
            cand_reciprocal = cand_forward[np.where(cand_backward == candidate)[0]]
            overlap = len(np.intersect1d(cand_reciprocal, reciprocal))
            if overlap > 2.0 / 3 * len(cand_reciprocal):
                expansion = np.append(expansion, cand_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)

    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe

    inverted_index = [np.where(V[:, column] != 0)[0] for column in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        nonzero = np.where(V[i, :] != 0)[0]
        for column in nonzero:
            images = inverted_index[column]
            temp_min[0, images] = temp_min[0, images] + np.minimum(V[i, column], V[images, column])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    return jaccard_dist * (1 - lambda_value) + original_dist * lambda_value


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
               k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Query x gallery re-ranked distances (Q x G), float32."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1),
         np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    query_num = q_g_dist.shape[0]
    return _rerank_rows(original_dist, query_num, k1, k2, lambda_value)[:, query_num:]


def re_ranking_single(dist: np.ndarray, k1: int = 20, k2: int = 6,
                      lambda_value: float = 0.3) -> np.ndarray:
    """All-vs-all re-ranked distances for one set: the joined matrix is `dist` itself (N x N)."""
    return _rerank_rows(np.asarray(dist), dist.shape[0], k1, k2, lambda_value)
