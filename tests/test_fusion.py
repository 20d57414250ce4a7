"""Calibration of scores to P(same individual) and their fusion (WildFusion): monotone into [0, 1],
stored as strict JSON, weight 1 or 0 giving the global or local evidence alone, rows comparable
outside the shortlist, and a weight chosen on validation that uses an informative local score."""

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from jaguar.core.evaluator import evaluate
from jaguar.retrieval.post.fusion import FusionError, FusionModel, IsotonicCalibrator, fit_fusion, shortlist_pairs


def noisy_pairs(rng, count=2000):
    same = rng.random(count) < 0.3
    return rng.normal(same * 1.0, 0.8), same


def test_calibration_is_monotone_into_0_1_agrees_with_scikit_learn_and_stores_as_strict_json():
    rng = np.random.default_rng(0)
    scores, same = noisy_pairs(rng)
    calibrator = IsotonicCalibrator.fit(scores, same)
    probe = np.linspace(scores.min() - 5, scores.max() + 5, 5001)
    probability = calibrator(probe)
    assert np.all(np.diff(probability) >= 0) and probability.min() >= 0 and probability.max() <= 1
    assert probability[0] < 0.15 and probability[-1] > 0.85
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, same.astype(float))
    np.testing.assert_allclose(probability, reference.predict(probe), atol=1e-12)
    text = json.dumps(calibrator.to_dict(), allow_nan=False)
    restored = IsotonicCalibrator.from_dict(json.loads(text))
    np.testing.assert_array_equal(restored(probe), probability)


def test_calibration_refuses_what_it_cannot_fit_or_read():
    with pytest.raises(FusionError, match="same-individual and different-individual"):
        IsotonicCalibrator.fit([0.1, 0.2, 0.3], [True, True, True])
    with pytest.raises(FusionError, match="NaN"):
        IsotonicCalibrator.fit([0.1, np.nan, 0.3], [True, False, True])
    with pytest.raises(FusionError, match="3 scores but 2"):
        IsotonicCalibrator.fit([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(FusionError, match="post.json"):
        IsotonicCalibrator.from_dict({"scores": [0, 1]}, where="post.json")
    with pytest.raises(FusionError, match="non-decreasing"):
        IsotonicCalibrator.from_dict({"scores": [0, 1], "probabilities": [0.9, 0.1]})
    with pytest.raises(FusionError, match="weight"):
        FusionModel.from_dict({"weight": float("nan"), "global": {}, "local": {}})


def validation_set(rng, n_ids=12, per=4, global_noise=0.45, local_informative=True, width=10):
    """Labels, a global similarity matrix, its top-B shortlist (self excluded) and local scores."""
    labels = np.repeat(np.arange(n_ids), per)
    same = labels[:, None] == labels[None, :]
    global_scores = same * 0.5 + rng.normal(0, global_noise, same.shape)
    global_scores = (global_scores + global_scores.T) / 2
    np.fill_diagonal(global_scores, 1.0)
    masked = global_scores.copy()
    np.fill_diagonal(masked, -np.inf)
    shortlist = np.argsort(-masked, axis=1, kind="stable")[:, :width]
    shortlisted_same = same[np.arange(len(labels))[:, None], shortlist]
    if local_informative:
        local = np.where(shortlisted_same, rng.poisson(30, shortlist.shape), rng.poisson(2, shortlist.shape))
    else:
        local = rng.poisson(5, shortlist.shape)
    return labels, global_scores, shortlist, local.astype(np.float32)


def test_weight_1_is_the_global_evidence_alone_and_0_the_local_alone():
    rng = np.random.default_rng(1)
    labels, global_scores, shortlist, local = validation_set(rng)
    g, l, same = shortlist_pairs(global_scores, shortlist, local, labels)
    global_calibrator, local_calibrator = IsotonicCalibrator.fit(g, same), IsotonicCalibrator.fit(l, same)
    only_global = FusionModel(global_calibrator, local_calibrator, 1.0)
    np.testing.assert_array_equal(only_global.fuse_dense(global_scores, shortlist, local, rank=False),
                                  global_calibrator(global_scores))
    only_local = FusionModel(global_calibrator, local_calibrator, 0.0).fuse_dense(global_scores, shortlist, local,
                                                                                   rank=False)
    rows = np.arange(len(labels))[:, None]
    np.testing.assert_array_equal(only_local[rows, shortlist], local_calibrator(local))
    outside = np.ones_like(only_local, dtype=bool)
    outside[rows, shortlist] = False
    assert np.all(only_local[outside] == local_calibrator(0.0))


def test_pairs_outside_the_shortlist_never_outrank_a_shortlisted_one_and_rows_share_one_scale():
    rng = np.random.default_rng(2)
    labels, global_scores, shortlist, local = validation_set(rng)
    search = fit_fusion(global_scores, labels, shortlist, local)
    fused = search.model.fuse_dense(global_scores, shortlist, local)
    rows = np.arange(len(labels))[:, None]
    inside = np.zeros_like(fused, dtype=bool)
    inside[rows, shortlist] = True
    np.fill_diagonal(inside, True)  # the query itself is no candidate
    for row in range(len(labels)):
        assert fused[row][~inside[row]].max() <= fused[row][shortlist[row]].min()
    # one function of (global, local) in every row: equal inputs, equal fused scores across rows
    probe = search.model.rank_scores(np.array([0.2, 0.2]), np.array([7.0, 7.0]))
    assert probe[0] == probe[1]


def test_the_weight_chosen_on_validation_uses_an_informative_local_score_and_ignores_noise():
    rng = np.random.default_rng(3)
    labels, global_scores, shortlist, local = validation_set(rng)
    search = fit_fusion(global_scores, labels, shortlist, local)
    by_weight = {row["weight"]: row["mAP_balanced"] for row in search.table()}
    global_alone = evaluate(global_scores, labels, kind="similarity").mAP_balanced
    assert by_weight[1.0] == pytest.approx(global_alone)  # the tie-break keeps the global order
    assert search.folds == 2 and search.model.weight < 1.0
    assert by_weight[search.model.weight] > global_alone + 0.15
    assert json.loads(json.dumps(search.model.to_dict(), allow_nan=False))["weight"] == search.model.weight
    assert FusionModel.from_dict(search.model.to_dict()).weight == search.model.weight
    labels, global_scores, shortlist, noise = validation_set(rng, local_informative=False)
    noisy = fit_fusion(global_scores, labels, shortlist, noise)
    noisy_by_weight = {row["weight"]: row["mAP_balanced"] for row in noisy.table()}
    # cross-fitted: noise calibrated on some identities does not pass for evidence on the others
    assert noisy_by_weight[noisy.model.weight] < noisy_by_weight[1.0] + 0.1
    assert noisy_by_weight[0.0] < noisy_by_weight[1.0]


def test_a_validation_split_too_small_to_cross_fit_is_fitted_in_sample():
    labels = np.array([0, 0, 1, 1])
    global_scores = np.array([[1, .9, .2, .1], [.9, 1, .3, .2], [.6, .5, 1, .4], [.5, .6, .4, 1]])
    # identity 0's queries shortlist only their own kind, identity 1's only strangers: no fold has both
    shortlist = np.array([[1], [0], [0], [1]])
    search = fit_fusion(global_scores, labels, shortlist, np.array([[20.0], [25.0], [3.0], [1.0]]))
    assert search.folds == 1 and 0.0 <= search.model.weight <= 1.0


def test_a_query_found_in_its_own_shortlist_and_unlabelled_queries_do_not_bend_the_calibration():
    rng = np.random.default_rng(5)
    labels, global_scores, shortlist, local = validation_set(rng)
    clean = fit_fusion(global_scores, labels, shortlist, local)
    with_self = np.column_stack([np.arange(len(labels)), shortlist])  # each query first in its own list
    self_scores = np.column_stack([np.full(len(labels), 1000.0), local])
    polluted = fit_fusion(global_scores, labels, with_self, self_scores)
    np.testing.assert_array_equal(polluted.model.local_calibrator.scores, clean.model.local_calibrator.scores)
    np.testing.assert_array_equal(polluted.model.local_calibrator.probabilities,
                                  clean.model.local_calibrator.probabilities)
    assert polluted.model.weight == clean.model.weight
    unlabelled = labels.copy()
    unlabelled[:2] = -1  # queries of unknown identity: no pairs to fit, still fused and scored
    partial = fit_fusion(global_scores, unlabelled, shortlist, local)
    assert partial.folds == 2 and all(np.isfinite(row["mAP_balanced"]) for row in partial.table())


def test_top_m_lists_and_the_dense_path_fuse_every_pair_alike():
    rng = np.random.default_rng(6)
    labels, global_scores, shortlist, local = validation_set(rng, width=6)
    model = fit_fusion(global_scores, labels, shortlist, local).model
    dense = model.fuse_dense(global_scores, shortlist, local)
    masked = global_scores.copy()
    np.fill_diagonal(masked, -np.inf)
    top_m = np.argsort(-masked, axis=1, kind="stable")[:, :15]  # M = 15 > B = 6: some listed pairs unmatched
    top_m[0, -1] = -1  # a short list
    rows = np.arange(len(labels))[:, None]
    listed = model.fuse_lists(global_scores[rows, top_m], top_m, shortlist, local)
    valid = top_m >= 0
    np.testing.assert_array_equal(listed[valid], dense[rows, top_m][valid])
    assert listed[0, -1] == -np.inf
    with pytest.raises(FusionError, match="list"):
        model.fuse_lists(global_scores[:, :3], top_m, shortlist, local)
