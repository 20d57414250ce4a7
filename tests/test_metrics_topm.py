"""The evaluator from ranked top-M lists equals the dense evaluator, true matches beyond M
ranked exactly (ties included), and says when lists were re-ordered within the top M."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaguar.core.knn import knn
from jaguar.core.evaluator import MetricsError, evaluate
from jaguar.core.evaluator_ranked import RankedEvaluator
from tests.test_knn import clustered



def evaluate_ranked(ranked, query_features, query_labels, gallery_features=None, gallery_labels=None, *,
                    reordered=False, chunk=1024):
    """The figures of one set of top-M lists through the ranked evaluator."""
    evaluator = RankedEvaluator(ranked, query_features, query_labels, gallery_features, gallery_labels, chunk=chunk)
    return evaluator.evaluate(ranked, reordered)

def assert_same(a, b):
    for name in ("mAP_balanced", "mAP", "rank1", "rank5", "rank10", "mINP"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-9), name
    np.testing.assert_allclose(a.query_ap, b.query_ap, atol=1e-9)
    np.testing.assert_allclose(a.query_inp, b.query_inp, atol=1e-9)
    np.testing.assert_array_equal(a.first_match_rank, b.first_match_rank)
    assert a.per_identity_ap.keys() == b.per_identity_ap.keys()
    assert a.num_queries == b.num_queries and a.num_skipped == b.num_skipped


@pytest.mark.parametrize("top_m", [1, 3, 10, 200])
def test_all_vs_all_equals_dense_with_matches_beyond_m(top_m):
    features, labels = clustered(per_identity=8, dim=8, duplicates=40)  # noisy: many matches far down
    labels[::7] = 1000 + torch.arange(len(labels[::7]))  # single-image identities: skipped queries
    ranked = knn(features, k=top_m, exclude_self=True).index
    result = evaluate_ranked(ranked, features, labels, chunk=17)
    assert_same(result, evaluate(features @ features.T, labels, kind="similarity"))
    assert result.reordered_top_m is None and "every candidate" in result.describe_basis()


def test_query_gallery_equals_dense():
    features, labels = clustered(seed=5, dim=8)
    queries, gallery = features[:60], features[60:]
    ranked = knn(queries, gallery, k=4).index
    result = evaluate_ranked(ranked, queries, labels[:60], gallery, labels[60:])
    assert_same(result, evaluate(queries @ gallery.T, labels[:60], labels[60:], kind="similarity"))


def test_reordered_lists_rank_their_items_by_list_order_and_say_so():
    features, labels = clustered(seed=2, dim=8)
    ranked = knn(features, k=6, exclude_self=True).index
    flipped = ranked.flip(1)
    result = evaluate_ranked(flipped, features, labels, reordered=True)
    # The dense equivalent: the list in its new order first, then the rest by score.
    scores = features @ features.T
    order_key = torch.full_like(scores, 0.0)
    order_key.scatter_(1, flipped, 10.0 + torch.arange(6, 0, -1, dtype=torch.float32).expand(len(labels), 6))
    assert_same(result, evaluate(scores + order_key, labels, kind="similarity"))
    assert result.reordered_top_m == 6 and "top-6" in result.describe_basis()


def test_bad_lists_are_refused():
    features, labels = clustered(n_identities=3, per_identity=3, duplicates=0)
    with pytest.raises(MetricsError, match="itself"):
        evaluate_ranked(knn(features, k=2).index, features, labels)
    with pytest.raises(MetricsError, match="Q x M"):
        evaluate_ranked(torch.zeros((2, 2), dtype=torch.long), features, labels)


def _dense_of_lists(scores, lists):
    """The dense ranking a set of lists stands for: each list in its order first, the rest by score."""
    order_key = torch.zeros_like(scores)
    width = lists.shape[1]
    order_key.scatter_(1, lists, 10.0 + torch.arange(width, 0, -1, dtype=torch.float32).expand(len(lists), width))
    return scores + order_key


@pytest.mark.parametrize("seed", [4, 5])
def test_ranked_evaluator_scores_lists_that_reorder_or_swap_in_items_from_beyond_m(seed):
    from jaguar.core.evaluator_ranked import RankedEvaluator

    features, labels = clustered(seed=seed, dim=8, duplicates=20)  # ties: duplicate images
    scores = features @ features.T
    ranked = knn(features, k=5, exclude_self=True).index
    built = RankedEvaluator(ranked, features, labels)
    assert_same(built.evaluate(ranked), evaluate_ranked(ranked, features, labels))
    _, evaluator = RankedEvaluator.search(features, labels, 5)
    # Re-ranking style lists: some rows swap items (true matches among them) for items beyond M.
    generator = torch.Generator().manual_seed(seed)
    swapped = ranked.clone()
    beyond = knn(features, k=15, exclude_self=True).index[:, 5:]
    rows = torch.randperm(len(labels), generator=generator)[:len(labels) // 2]
    for row in rows.tolist():
        n_swap = int(torch.randint(1, 4, (1,), generator=generator))
        slots = torch.randperm(5, generator=generator)[:n_swap]
        swapped[row, slots] = beyond[row, torch.randperm(10, generator=generator)[:n_swap]]
        swapped[row] = swapped[row, torch.randperm(5, generator=generator)]
    scores.fill_diagonal_(float("-inf"))
    result = evaluator.evaluate(swapped, reordered=True)
    assert_same(result, evaluate(_dense_of_lists(scores, swapped), labels, kind="similarity"))
    with pytest.raises(MetricsError, match="entries a query"):
        evaluator.evaluate(swapped[:, 1:])
    with pytest.raises(MetricsError, match="other items"):  # the caller's lists: beyond M is unknown
        built.evaluate(swapped)


@pytest.mark.parametrize("top_m,chunk", [(1, 7), (5, 1024), (30, 13)])
def test_search_finds_the_knn_lists_and_their_exact_figures_in_one_pass(top_m, chunk):
    from jaguar.core.evaluator_ranked import RankedEvaluator

    features, labels = clustered(per_identity=8, dim=8, duplicates=40)  # ties: duplicate images
    labels[::7] = 1000 + torch.arange(len(labels[::7]))
    neighbours, evaluator = RankedEvaluator.search(features, labels, top_m, chunk=chunk)
    expected = knn(features, k=top_m, exclude_self=True, backend="torch")
    assert torch.equal(neighbours.index, expected.index)
    torch.testing.assert_close(neighbours.similarity, expected.similarity, atol=1e-6, rtol=0)  # block sizes differ
    assert_same(evaluator.evaluate(neighbours.index), evaluate(features @ features.T, labels, kind="similarity"))


@pytest.mark.parametrize("n_targets", [1, 6, 40])
def test_counting_at_or_above_per_row_thresholds_equals_the_plain_count(n_targets):
    from jaguar.core.ranks import count_at_or_above

    generator = torch.Generator().manual_seed(3)
    scores = (torch.randn(40, 300, generator=generator) * 0.05).round(decimals=1)  # many exact ties
    counted = torch.rand(40, 300, generator=generator) > 0.3
    thresholds = scores.gather(1, torch.randint(0, 300, (40, n_targets), generator=generator)).sort(dim=1).values
    expected = ((scores[:, None, :] >= thresholds[:, :, None]) & counted[:, None, :]).sum(-1)
    assert torch.equal(count_at_or_above(scores, counted, thresholds), expected)
