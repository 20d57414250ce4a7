"""k-reciprocal re-ranking: the batched kernel equals the plain-loop reference, in every mode."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from rerank_reference import re_ranking, re_ranking_single

from jaguar.core.evaluator import identity_balanced_map
from jaguar.retrieval.post.rerank import (
    Workers,
    euclidean_distance,
    k_reciprocal_rerank,
    k_reciprocal_rerank_single,
    k_reciprocal_rerank_topm,
    k_reciprocal_terms_single,
)
from jaguar.retrieval.post.rerank_kernel import stable_smallest


def _distances(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(2 - 2 * features @ features.T, 0))
    np.fill_diagonal(dist, 0)
    return dist


def _clusters(n_ids: int, per_id: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, dim, generator=generator)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    features = centres[labels] + spread * torch.randn(n_ids * per_id, dim, generator=generator)
    return torch.nn.functional.normalize(features, dim=1), labels


@pytest.mark.parametrize("n_query,n_gallery,k1,k2,lam", [
    (5, 30, 6, 3, 0.3), (12, 50, 20, 6, 0.3), (20, 60, 8, 1, 0.5), (3, 12, 20, 6, 0.0), (15, 40, 5, 2, 1.0)])
def test_query_gallery_matches_reference(n_query, n_gallery, k1, k2, lam):
    dist = _distances(n_query + n_gallery, 16, seed=n_query)
    q_g, q_q, g_g = dist[:n_query, n_query:], dist[:n_query, :n_query], dist[n_query:, n_query:]
    expected = re_ranking(q_g, q_q, g_g, k1, k2, lam)
    result = k_reciprocal_rerank(q_g, q_q, g_g, k1, k2, lam)
    assert isinstance(result, np.ndarray) and result.shape == (n_query, n_gallery)
    np.testing.assert_allclose(result, expected, atol=1e-4, rtol=0)


def test_torch_in_torch_out_float32_and_float64():
    dist = _distances(40, 8, seed=3)
    expected = re_ranking(dist[:10, 10:], dist[:10, :10], dist[10:, 10:], 6, 3, 0.3)
    for dtype in (torch.float32, torch.float64):
        tensor = torch.tensor(dist, dtype=dtype)
        result = k_reciprocal_rerank(tensor[:10, 10:], tensor[:10, :10], tensor[10:, 10:], 6, 3, 0.3)
        assert isinstance(result, torch.Tensor) and result.device == tensor.device
        np.testing.assert_allclose(result.numpy(), expected, atol=1e-4, rtol=0)


def test_asymmetric_input_uses_column_max_then_transpose():
    # The reference divides each column by its maximum and transposes: with a non-symmetric
    # matrix, a row-max implementation would disagree.
    rng = np.random.default_rng(7)
    dist = rng.uniform(0.1, 2.0, size=(30, 30))
    np.fill_diagonal(dist, 0)
    np.testing.assert_allclose(k_reciprocal_rerank_single(dist, 6, 3, 0.3), re_ranking_single(dist, 6, 3, 0.3),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("n,k1,k2", [(25, 4, 2), (60, 20, 6), (80, 7, 1)])
def test_single_set_matches_reference(n, k1, k2):
    dist = _distances(n, 12, seed=n)
    result = k_reciprocal_rerank_single(torch.tensor(dist), k1, k2, 0.3)
    assert result.shape == (n, n)
    np.testing.assert_allclose(result.numpy(), re_ranking_single(dist, k1, k2, 0.3), atol=1e-4, rtol=0)


def test_terms_blend_to_the_reranked_distance():
    dist = _distances(30, 8, seed=2)
    jaccard, original = k_reciprocal_terms_single(dist, 6, 3)
    for lam in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(jaccard * (1 - lam) + original * lam, re_ranking_single(dist, 6, 3, lam),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("output_block_bytes", [1, 1 << 21])
def test_tiny_memory_budget_gives_the_same_numbers(monkeypatch, output_block_bytes):
    # The Jaccard sums run through the output in row blocks (1 byte: the 64-row minimum, so 70
    # rows make two blocks) and in steps of at most the budget's visits: neither may matter.
    monkeypatch.setattr("jaguar.retrieval.post.rerank_kernel.overlaps._OUTPUT_BLOCK_BYTES", output_block_bytes)
    dist = _distances(70, 12, seed=11)
    roomy = k_reciprocal_rerank_single(dist, 10, 4, 0.3)
    tight = k_reciprocal_rerank_single(dist, 10, 4, 0.3, memory_budget_mb=0.005)
    np.testing.assert_allclose(tight, roomy, atol=1e-6, rtol=0)
    q_g = k_reciprocal_rerank(dist[:9, 9:], dist[:9, :9], dist[9:, 9:], 10, 4, 0.3, memory_budget_mb=0.005)
    np.testing.assert_allclose(q_g, re_ranking(dist[:9, 9:], dist[:9, :9], dist[9:, 9:], 10, 4, 0.3), atol=1e-4)


def test_reranking_keeps_or_improves_map_on_clusters():
    features, labels = _clusters(8, 6, 16, spread=0.9, seed=0)
    dist = euclidean_distance(features)
    reranked = k_reciprocal_rerank_single(dist, 5, 2, 0.3)
    np.testing.assert_allclose(reranked.numpy(), re_ranking_single(dist.numpy(), 5, 2, 0.3), atol=1e-4)
    before = identity_balanced_map(-dist, labels)
    after = identity_balanced_map(-reranked, labels)
    assert after >= before - 1e-9 and after > 0.5


def test_bounded_mode_equals_dense_on_its_top_m():
    features, _ = _clusters(10, 12, 24, spread=0.8, seed=1)
    n = features.shape[0]
    dense = k_reciprocal_rerank_single(euclidean_distance(features), 10, 4, 0.3)
    # M = N: the whole dense row, same order (ties broken by index in both).
    index, value = k_reciprocal_rerank_topm(features, 10, 4, 0.3, top_m=n, chunk=17, memory_budget_mb=0.01)
    assert torch.equal(index, torch.sort(dense, dim=1, stable=True).indices)
    torch.testing.assert_close(value, dense.gather(1, index), atol=1e-5, rtol=0)
    # M < N: the dense top M, with the dense values, though items beyond the 25 nearest enter it.
    index, value = k_reciprocal_rerank_topm(features, 10, 4, 0.3, top_m=25, chunk=40)
    dense_values, dense_index = torch.sort(dense, dim=1, stable=True)
    torch.testing.assert_close(value, dense.gather(1, index), atol=1e-5, rtol=0)
    torch.testing.assert_close(value, dense_values[:, :25], atol=1e-5, rtol=0)
    step_tied = (dense_values[:, 1:26] - dense_values[:, :25]).abs() < 1e-6  # place j ties with j + 1
    tied = step_tied.clone()
    tied[:, 1:] |= step_tied[:, :-1]
    assert not bool(((index != dense_index[:, :25]) & ~tied).any())  # order differs only within ties
    euclid_rank = torch.sort(euclidean_distance(features), dim=1, stable=True).indices[:, :25]
    assert not torch.equal(index.sort(dim=1).values, euclid_rank.sort(dim=1).values)  # some were brought in
    numpy_index, _ = k_reciprocal_rerank_topm(features.numpy(), 10, 4, 0.3, top_m=25)
    assert isinstance(numpy_index, np.ndarray) and np.array_equal(numpy_index, index.numpy())


@pytest.mark.parametrize("padding_waste", [0.0, float("inf")])
def test_bounded_mode_both_ways_of_visiting_its_index(monkeypatch, padding_waste):
    # The bounded mode visits its inverted index either through a padded table or exactly (when
    # a few hub columns would make the padding wasteful): both must give the dense numbers.
    monkeypatch.setattr("jaguar.retrieval.post.rerank_bounded._MAX_PADDING_WASTE", padding_waste)
    features, _ = _clusters(9, 10, 16, spread=0.9, seed=2)
    dense = k_reciprocal_rerank_single(euclidean_distance(features), 8, 3, 0.3)
    index, value = k_reciprocal_rerank_topm(features, 8, 3, 0.3, top_m=30, chunk=25, memory_budget_mb=0.01)
    torch.testing.assert_close(value, dense.gather(1, index), atol=1e-5, rtol=0)


def test_stable_smallest_equals_stable_argsort_prefix_with_ties():
    rows = torch.tensor([[3.0, 1.0, 1.0, 0.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    values, index = stable_smallest(rows, 3)
    assert index.tolist() == [[3, 1, 2], [5, 4, 3]]
    assert values.tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
    generator = torch.Generator().manual_seed(0)
    for width, levels in ((12, 4), (60, 40)):  # wide tie groups (full sort), pairs and triples (the margin)
        for k in range(1, width + 1):
            rows = torch.randint(0, levels, (9, width), generator=generator).float()
            expected = torch.sort(rows, dim=1, stable=True)
            values, index = stable_smallest(rows, k)
            assert torch.equal(index, expected.indices[:, :k]) and torch.equal(values, expected.values[:, :k])


@pytest.mark.parametrize("on_host", [True, False])
def test_wide_single_set_and_query_gallery_match_reference(monkeypatch, on_host):
    # N >= 16 (k1 + 1): the dense ranking runs on 8-row block minima of D, not on full rows.
    # on_host=False: the path a GPU takes (topk and torch.sort, no numpy, no worker threads),
    # run here on the CPU.
    if not on_host:
        monkeypatch.setattr("jaguar.retrieval.post.rerank_kernel.threads.on_host", lambda device: False)
    dist = _distances(360, 16, seed=5)
    np.testing.assert_allclose(k_reciprocal_rerank_single(dist, 20, 6, 0.3), re_ranking_single(dist, 20, 6, 0.3),
                               atol=1e-4, rtol=0)
    q_g, q_q, g_g = dist[:50, 50:], dist[:50, :50], dist[50:, 50:]
    np.testing.assert_allclose(k_reciprocal_rerank(q_g, q_q, g_g, 20, 6, 0.3), re_ranking(q_g, q_q, g_g, 20, 6, 0.3),
                               atol=1e-4, rtol=0)
    # Few distinct values: tied block minima and tied candidates, the full-sort fallback; N = 341
    # also leaves a partial last block.
    rng = np.random.default_rng(3)
    tied = rng.integers(1, 8, size=(341, 341)).astype(float)
    tied = (tied + tied.T) / 2
    np.fill_diagonal(tied, 0)
    np.testing.assert_allclose(k_reciprocal_rerank_single(tied, 20, 6, 0.3), re_ranking_single(tied, 20, 6, 0.3),
                               atol=1e-4, rtol=0)


def test_tied_distances_match_the_stable_reference():
    rng = np.random.default_rng(0)
    dist = rng.integers(1, 6, size=(30, 30)).astype(float)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0)
    np.testing.assert_allclose(k_reciprocal_rerank_single(dist, 6, 3, 0.3), re_ranking_single(dist, 6, 3, 0.3),
                               atol=1e-4, rtol=0)


def test_bad_inputs_are_named():
    dist = _distances(10, 4, 0)
    with pytest.raises(ValueError, match="g_g_dist"):
        k_reciprocal_rerank(dist[:3, 3:], dist[:3, :3], dist[:5, :5])
    bad = dist.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_rerank_single(bad)
    bad[1, 2] = -np.inf
    with pytest.raises(ValueError, match="infinite"):
        k_reciprocal_rerank_single(bad)
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank_single(dist, lambda_value=1.5)


def test_worker_threads_give_the_same_numbers(monkeypatch):
    # The kernel shares its row chunks out to as many Python threads as torch had intra-op
    # threads; 1, 2 and 3 threads must agree (to float rounding: a chunk's padded width changes
    # the order of a row sum). Small output blocks and a tight budget make many blocks and chunks.
    monkeypatch.setattr("jaguar.retrieval.post.rerank_kernel.overlaps._OUTPUT_BLOCK_BYTES", 1)
    dist = _distances(300, 12, seed=4)
    q_g, q_q, g_g = dist[:40, 40:], dist[:40, :40], dist[40:, 40:]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((k_reciprocal_rerank_single(dist, 20, 6, 0.3, memory_budget_mb=0.05),
                            k_reciprocal_rerank(q_g, q_q, g_g, 20, 6, 0.3, memory_budget_mb=0.05),
                            k_reciprocal_terms_single(dist, 8, 3)[0]))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(results[0][0], re_ranking_single(dist, 20, 6, 0.3), atol=1e-4, rtol=0)
    np.testing.assert_allclose(results[0][1], re_ranking(q_g, q_q, g_g, 20, 6, 0.3), atol=1e-4, rtol=0)
    for other in results[1:]:
        for one, many in zip(results[0], other):
            np.testing.assert_allclose(one, many, atol=1e-6, rtol=0)


def test_workers_leave_the_callers_thread_settings_alone():
    # The kernel's threads each run torch on one intra-op thread; the caller's count, and the
    # default that a thread starting later gets, stay as they were (no process-wide switch).
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with Workers() as workers:
            assert workers.threads == 2 and torch.get_num_threads() == 2
            assert workers.run(torch.device("cpu"), torch.get_num_threads) == 1
            later: list[int] = []
            thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
            thread.start()
            thread.join()
            assert later == [2]
        k_reciprocal_rerank_single(_distances(20, 4, 0), 4, 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_workers_shared_by_concurrent_callers():
    # Several threads may share one Workers: each call's jobs that no worker has started run on
    # the caller, so nobody waits on another call's jobs (no deadlock), and the numbers agree.
    dist = _distances(200, 12, seed=6)
    expected = re_ranking_single(dist, 10, 4, 0.3)
    with Workers(2) as workers, ThreadPoolExecutor(3) as callers:
        calls = [callers.submit(k_reciprocal_rerank_single, dist, 10, 4, 0.3, 0.05, workers) for _ in range(4)]
        for call in calls:
            np.testing.assert_allclose(call.result(timeout=120), expected, atol=1e-4, rtol=0)
