"""Identity-balanced mAP and query/gallery mAP, CMC and mINP on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaguar.retrieval.metrics import (all_vs_all_summary, evaluate_retrieval, identity_balanced_map,
                                      per_identity_ap)

# Five images: identities 0, 0, 1, 1 and a singleton 2 (index 4). Row = query.
HAND_SIM = np.array([
    [0.0, 0.9, 0.8, 0.1, 0.95],  # ranking 4, 1*, 2, 3        -> AP 1/2
    [0.2, 0.0, 0.9, 0.5, 0.0],   # ranking 2, 3, 0*, 4        -> AP 1/3
    [0.7, 0.1, 0.0, 0.6, 0.0],   # ranking 0, 3*, 1, 4        -> AP 1/2
    [0.3, 0.3, 0.3, 0.0, 0.0],   # tie: 0, 1, 2* by index     -> AP 1/3
    [0.5, 0.4, 0.3, 0.2, 0.0],   # singleton: no true match   -> skipped
])
HAND_LABELS = [0, 0, 1, 1, 2]


def test_identity_balanced_map_hand_case():
    per_identity = per_identity_ap(HAND_SIM, HAND_LABELS)
    assert per_identity.keys() == {0, 1}  # the singleton identity has no query with a match
    assert per_identity[0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert per_identity[1] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert identity_balanced_map(HAND_SIM, HAND_LABELS) == pytest.approx(5 / 12)


def test_ties_are_broken_by_index():
    # All scores equal: each query ranks the others in index order. Query 0 sees 1, 2* (AP 1/2),
    # query 2 sees 0*, 1 (AP 1); identity 1 is a singleton and is skipped.
    sim = np.full((3, 3), 0.5)
    assert per_identity_ap(sim, [0, 1, 0]) == {0: pytest.approx((1 / 2 + 1) / 2)}
    assert identity_balanced_map(sim, [0, 1, 0]) == pytest.approx(3 / 4)
    # The same images in another order (match before the non-match for query 0) score higher.
    assert identity_balanced_map(sim, [0, 0, 1]) == pytest.approx(1.0)


def test_balanced_differs_from_plain_map_and_weighs_identities_equally():
    # Identity 0 has 3 perfect queries, identity 1 has 2 queries with AP 1/3 each... balanced
    # mAP is (1 + 1/3)/2 while the per-query mean is (3 + 2/3)/5.
    labels = [0, 0, 0, 1, 1, 2, 2]
    features = torch.eye(7)
    sim = features @ features.T
    sim[:3, :3] += 1.0
    sim[3, 4] = sim[4, 3] = -1.0  # identity 1's match ranked last among six others
    sim[5, 6] = sim[6, 5] = 2.0
    summary = all_vs_all_summary(sim, labels)
    ap_one = 1 / 6
    assert summary["mAP_balanced"] == pytest.approx((1 + ap_one + 1) / 3)
    assert summary["mAP"] == pytest.approx((5 + 2 * ap_one) / 7)
    assert summary["rank1"] == pytest.approx(5 / 7)


def test_perfect_and_reversed_rankings():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    same = (labels[:, None] == labels[None, :]).double()
    assert identity_balanced_map(same, labels) == pytest.approx(1.0)
    # Reversed: each query's single match is ranked last of five.
    assert identity_balanced_map(-same, labels) == pytest.approx(1 / 5)


def test_nan_and_shape_errors():
    with pytest.raises(ValueError, match="NaN"):
        identity_balanced_map(np.array([[0, np.nan], [1, 0]]), [0, 0])
    with pytest.raises(ValueError, match="square"):
        identity_balanced_map(np.zeros((2, 3)), [0, 0])
    with pytest.raises(ValueError, match="no query has a true match"):
        identity_balanced_map(np.zeros((2, 2)), [0, 1])


def test_evaluate_retrieval_with_cameras_hand_case():
    # Query 0: id 0, camera 0. Gallery: g0 same id+camera (ignored with cameras), g1 other, g2 match,
    # g3 other, g4 match. Query 1: id 1, camera 1; its only match g1 shares its camera.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                     [0.5, 0.1, 0.2, 0.3, 0.4]])
    q_labels, g_labels = [0, 1], [0, 1, 0, 2, 0]
    q_cams, g_cams = [0, 1], [0, 1, 1, 0, 2]
    with_cams = evaluate_retrieval(dist, q_labels, g_labels, q_cams, g_cams)
    assert with_cams["num_queries"] == 1
    assert with_cams["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert (with_cams["rank1"], with_cams["rank5"], with_cams["rank10"]) == (0.0, 1.0, 1.0)
    assert with_cams["mINP"] == pytest.approx(2 / 4)

    no_cams = evaluate_retrieval(dist, q_labels, g_labels)
    assert no_cams["num_queries"] == 2
    assert no_cams["mAP"] == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 1) / 2)
    assert no_cams["rank1"] == 1.0
    assert no_cams["mINP"] == pytest.approx((3 / 5 + 1) / 2)
    # The same scores as similarities (negated) give the same numbers.
    as_similarity = evaluate_retrieval(-dist, q_labels, g_labels, kind="similarity")
    assert as_similarity == pytest.approx(no_cams)
